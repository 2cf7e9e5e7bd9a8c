"""Artifact store: where stages read and write bytes (datasets, checkpoints, models).

Keys are '/'-separated paths relative to the store root. A *directory artifact* is
complete only once its commit marker (``_COMMITTED``) exists: writers put every file
first, then ``MANIFEST.json`` ({relative path: sha256}), and the marker last; readers
refuse prefixes without it and check every file against the manifest. A crash
mid-write therefore never leaves something that looks complete, and a flipped bit in
storage is caught before a model is loaded from it. Writing over a committed artifact
never removes it before the new version is committed (a local rename; on S3 a version
beside it and a conditional switch of the marker), and `get_dir` hands a reader a view
that no later commit changes.

`LocalStore` is a folder; `S3Store` is a bucket prefix (AWS S3 or any S3-compatible
server such as SeaweedFS or MinIO). Both have the same methods, plus `fetch` for
folders that users upload themselves (no manifest, no marker). Both read absolute
``s3://bucket/key`` URIs, so a local run can still read user data kept in S3.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Protocol
from urllib.parse import urlparse
from urllib.request import url2pathname

if TYPE_CHECKING:
    from rlhf.adapters.settings import Settings

COMMIT_MARKER = "_COMMITTED"
MANIFEST = "MANIFEST.json"
MiB = 1 << 20
DELETE_BATCH = 1000
"""S3 DeleteObjects takes at most 1000 keys per request."""
VERSION_PREFIX = ".v-"
"""S3: a version written over a committed artifact lives in `<prefix>/.v-<id>/` (see put_dir)."""


class StoreError(RuntimeError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ArtifactStore(Protocol):
    def uri(self, key: str) -> str: ...
    def exists(self, key: str) -> bool: ...
    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def write_json(self, key: str, obj) -> None: ...
    def read_json(self, key: str): ...
    def put_dir(self, local_dir: Path, prefix: str, move: bool = False) -> dict: ...
    def get_dir(self, prefix: str, local_dir: Path | None = None) -> Path: ...
    def read_artifact_file(self, prefix: str, rel: str) -> bytes: ...
    def is_committed(self, prefix: str) -> bool: ...
    def list_dirs(self, prefix: str) -> list[str]: ...
    def delete(self, prefix: str) -> None: ...
    def fetch(self, uri: str, local_dir: Path) -> Path: ...
    def walk(self, prefix: str = "") -> Iterator[tuple[str, float, int]]: ...
    def read_versioned(self, key: str) -> tuple[bytes, str] | None: ...
    def write_if(self, key: str, data: bytes, expected: str | None) -> str | None: ...


# ----------------------------------------------------------------------------- shared helpers


def split_s3_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b'). The key part may be empty."""
    if not uri.startswith("s3://"):
        raise StoreError(f"{uri}: not an s3:// URI (expected s3://bucket/prefix)")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StoreError(f"{uri}: the bucket name is missing (expected s3://bucket/prefix)")
    return bucket, key.strip("/")


def _child(base: str, name: str) -> str:
    """Object key of `name` under `base` ('' is the bucket root)."""
    return f"{base}/{name}" if base else name


def _folder_keys(deleted: list[str], base: str, keep: set[str] = frozenset()) -> list[str]:
    """The "dir/" keys to delete after `deleted`, deepest first, up to and including `base/`.

    SeaweedFS keeps a filer directory for every '/' level of a key and still lists it as
    a CommonPrefix once its objects are gone (AWS has no such thing), so a deleted
    artifact would linger in `list_dirs`. Deleting the folder keys, children before
    parents, removes the empty ones; a non-empty one is left alone. On AWS these keys do
    not exist and deleting them is a no-op. Folders that still hold a key in `keep` are
    skipped.
    """
    kept = {key[:i + 1] for key in keep for i, ch in enumerate(key) if ch == "/"}
    folders: set[str] = set()
    for key in deleted:
        for i, ch in enumerate(key):
            if ch == "/" and i >= len(base):
                folders.add(key[:i + 1])
    return sorted(folders - kept, key=lambda f: (-f.count("/"), f))


def _safe_rel(rel: str, where: str) -> str:
    """A manifest or listing entry as a relative path that cannot leave its folder."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or ".." in parts or rel.startswith("/"):
        raise StoreError(f"{where}: entry {rel!r} is not a plain relative path; the artifact is corrupted or hostile")
    return "/".join(parts)


def _fsync_path(path: Path) -> None:
    """fsync a file or a folder (its entries); a no-op where the OS cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root`, then `root` itself."""
    for p in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
        if not p.is_symlink():
            _fsync_path(p)
    _fsync_path(root)


def _parse_manifest(data: bytes, uri: str) -> dict[str, str]:
    try:
        manifest = json.loads(data)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or not all(isinstance(v, str) for v in manifest.values()):
        raise StoreError(f"{uri}/{MANIFEST} is not a {{path: sha256}} JSON object; the artifact is corrupted")
    return {_safe_rel(rel, f"{uri}/{MANIFEST}"): digest for rel, digest in manifest.items()}


def _verify_folder(folder: Path, manifest: dict[str, str], uri: str) -> None:
    """Every manifest entry exists in `folder` with its sha256; `uri` names the artifact in errors."""
    for rel, digest in manifest.items():
        f = folder / rel
        if not f.is_file():
            raise StoreError(f"{uri}/{rel} is listed in the manifest but missing; the artifact is corrupted "
                             "(write it again, e.g. rerun the stage that produced it)")
        if sha256_file(f) != digest:
            raise StoreError(f"checksum mismatch for {uri}/{rel}: the artifact is corrupted "
                             "(write it again, e.g. rerun the stage that produced it)")


def _move_tree(staging: Path, dest: Path) -> Path:
    """Hand a verified staging folder over to `dest` (same filesystem: renames only)."""
    dest = Path(dest)
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(dest)
        return dest
    for src in sorted(staging.rglob("*")):
        if src.is_file():
            out = dest / src.relative_to(staging)
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, out)
    shutil.rmtree(staging, ignore_errors=True)
    return dest


_VIEWS: list[Path] = []
"""Read-only views handed out by LocalStore.get_dir in this process (removed at exit)."""


@atexit.register
def _remove_views() -> None:
    for view in _VIEWS:
        shutil.rmtree(view, ignore_errors=True)


def _link_or_copy(dir_fd: int, rel: str, dest: Path, link: bool) -> None:
    """`rel` of the open folder `dir_fd` at `dest`: a hard link when `link` (same inode: no
    bytes copied, and the file outlives its removal from the artifact) and the
    filesystem has them, else a copy of the file as opened."""
    if link:
        try:
            os.link(rel, dest, src_dir_fd=dir_fd)
            return
        except FileNotFoundError:
            raise
        except OSError:  # no hard links here (or across devices): copy
            pass
    with open(os.open(rel, os.O_RDONLY, dir_fd=dir_fd), "rb") as f, open(dest, "wb") as out:
        shutil.copyfileobj(f, out, 16 * MiB)


def _staging_for(dest: Path) -> Path:
    """A fresh folder next to `dest`, so the final hand-over is a rename."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-"))


def _local_path_of(uri: str) -> Path:
    """A local path or file:// URI as a Path (percent-escapes decoded, as in `Path.as_uri()`)."""
    if uri.startswith("file://"):
        return Path(url2pathname(urlparse(uri).path))  # url2pathname also decodes %-escapes
    return Path(uri).expanduser()


def _fetch_local(uri: str, local_dir: Path) -> Path:
    """Copy a local folder, verified against its MANIFEST.json when it has one."""
    src = _local_path_of(uri)
    if not src.is_dir():
        raise StoreError(f"nothing to fetch at {uri}: expected a folder (check the path)")
    if (src / MANIFEST).is_file():
        _verify_folder(src, _parse_manifest((src / MANIFEST).read_bytes(), src.as_uri()), src.as_uri())
    shutil.copytree(src, local_dir, dirs_exist_ok=True)
    return Path(local_dir)


class _JsonMixin:
    def write_json(self, key: str, obj) -> None:
        self.write_bytes(key, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, key: str):
        data = self.read_bytes(key)
        try:
            return json.loads(data)
        except ValueError as e:
            raise StoreError(f"{self.uri(key)} is not valid JSON ({e}); the object is corrupted") from None


# ----------------------------------------------------------------------------- local folder


class LocalStore(_JsonMixin):
    """A store rooted at a local folder. Writes are atomic (temp file + rename)."""

    def __init__(self, root: str | Path, settings: "Settings | None" = None):
        self.root = _local_path_of(str(root)).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._settings = settings
        self._s3_stores: dict[str, S3Store] = {}
        self._views: dict[Path, tuple[bytes, Path]] = {}

    def _path(self, key: str) -> Path:
        if key.startswith("file://"):
            key = key[len("file://"):]
        elif "://" in key:
            raise StoreError(f"{key}: this is a local store rooted at {self.root}; "
                             f"{key.split('://')[0]}:// URIs need an S3 store (set the output to s3://...)")
        key = key.strip("/")
        p = (self.root / key).resolve()
        if p != self.root and self.root not in p.parents:
            raise StoreError(f"key {key!r} escapes the store root {self.root}")
        return p

    def _s3(self, uri: str) -> "S3Store":
        """An S3 store for the bucket of an absolute s3:// URI (user data read by a local run)."""
        bucket, _ = split_s3_uri(uri)
        if bucket not in self._s3_stores:
            self._s3_stores[bucket] = S3Store(f"s3://{bucket}", self._settings)
        return self._s3_stores[bucket]

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def local_path(self, key: str) -> Path:
        """Local stores can hand out paths directly (no copy)."""
        return self._path(key)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def read_bytes(self, key: str) -> bytes:
        if key.startswith("s3://"):
            return self._s3(key).read_bytes(key)
        p = self._path(key)
        if not p.is_file():
            raise StoreError(f"no object at {self.uri(key)}")
        return p.read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:  # a full disk, a kill: no .tmp file left behind
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """The object and its version token (sha256 of its bytes), or None when absent."""
        try:
            data = self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return None
        return data, hashlib.sha256(data).hexdigest()

    def write_if(self, key: str, data: bytes, expected: str | None) -> str | None:
        """Compare-and-swap: write only if the object's version is still `expected` (None:
        only if it does not exist). Returns the new version token, or None when another
        writer came first. Processes on one machine are serialised by a lock file beside
        the object."""
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p.with_name(f".{p.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = self.read_versioned(key)
                if (current[1] if current else None) != expected:
                    return None
                self.write_bytes(key, data)
                return hashlib.sha256(data).hexdigest()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def put_dir(self, local_dir: Path, prefix: str, move: bool = False) -> dict:
        """Copy a folder under `prefix` with a sha256 manifest and the commit marker.

        Returns the manifest ({relative path: sha256}). The new version is built complete
        (files, manifest, marker, fsynced) in a staging folder of its own, then takes the
        prefix by rename: an existing artifact stays committed until that moment, and two
        writers of one prefix (two runs preparing the same data) each commit a whole
        version, the last one winning, neither failing. `move=True` renames the files
        instead of copying them when both folders share a filesystem (a multi-GB
        checkpoint is not written twice); `local_dir` is left without those files.
        """
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise StoreError(f"put_dir: {local_dir} is not a folder (nothing to store at {self.uri(prefix)})")
        dest = self._path(prefix)
        src_resolved = local_dir.resolve()
        if dest.exists() and dest.resolve() == src_resolved:
            raise StoreError("put_dir source and destination are the same folder")
        if dest in src_resolved.parents:
            raise StoreError(f"put_dir: {local_dir} lies inside {self.uri(prefix)}, which is replaced; "
                             "write the new files somewhere else first")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.staging-"))
        try:
            manifest: dict[str, str] = {}
            files = [src for src in sorted(local_dir.rglob("*")) if src.is_file()]
            # Symlinks first: with `move`, their targets may be renamed away a moment later.
            for src in sorted(files, key=lambda f: not f.is_symlink()):
                rel = src.relative_to(local_dir).as_posix()
                manifest[rel] = sha256_file(src)
                out = staging / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                _move_or_copy(src, out) if move else shutil.copy2(src, out)
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            (staging / COMMIT_MARKER).write_bytes(b"ok\n")  # hidden until the rename makes it the prefix's
            # durable before the commit: a power loss must not leave a committed artifact whose
            # files (or manifest) never reached the disk
            _fsync_tree(staging)
            self._swap_in(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone after a swap; a failed write leaves nothing
        return manifest

    def _swap_in(self, staging: Path, dest: Path) -> None:
        """Rename `staging` to `dest`; an existing `dest` is renamed aside first and removed
        after. A concurrent writer may swap in between: then try again (bounded)."""
        aside = []
        try:
            for _ in range(100):
                try:
                    staging.rename(dest)
                    _fsync_path(dest.parent)
                    return
                except OSError as e:
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                        raise
                old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:12]}"
                try:
                    dest.rename(old)
                    aside.append(old)
                except FileNotFoundError:  # the other writer moved it aside already
                    pass
            raise StoreError(f"put_dir: {self.uri(str(dest.relative_to(self.root)))} kept changing under "
                             "100 attempts to commit it; another process is rewriting it in a loop")
        finally:
            for old in aside:
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink(missing_ok=True)

    def get_dir(self, prefix: str, local_dir: Path | None = None) -> Path:
        """A local folder holding the committed artifact at `prefix`, verified.

        Into `local_dir` (a copy), or when None a read-only *view*: hard links to the
        committed files in a hidden folder beside the artifact (`.<name>.view-<id>`, no copy
        of the bytes), removed when the process exits. The view is immutable: a writer
        that commits a new version meanwhile (put_dir renames it in and removes the old
        folder) does not change or remove what a reader was handed. A view of an unchanged
        artifact is made once per store object."""
        uri = self.uri(prefix)
        src = self._path(prefix)
        for _ in range(5):  # a writer may swap a new version in meanwhile: then take that one
            try:  # everything below is read through this folder handle: one version, even if renamed away
                fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
            except (FileNotFoundError, NotADirectoryError):
                raise StoreError(f"no complete artifact at {uri} (commit marker missing)") from None
            try:
                got = self._linked(fd, src, uri, local_dir)
            finally:
                os.close(fd)
            if got is not None:
                return got
        raise StoreError(f"{uri} kept changing while it was read (5 attempts); another process is "
                         "rewriting it in a loop")

    def _linked(self, fd: int, src: Path, uri: str, local_dir: Path | None) -> Path | None:
        """get_dir from the open folder `fd`; None when its version was removed meanwhile."""
        try:
            os.stat(COMMIT_MARKER, dir_fd=fd)
        except FileNotFoundError:
            if (src / COMMIT_MARKER).is_file():
                return None  # this folder was replaced (moved aside) between open and stat
            raise StoreError(f"no complete artifact at {uri} (commit marker missing)") from None
        try:
            with open(os.open(MANIFEST, os.O_RDONLY, dir_fd=fd), "rb") as f:
                manifest_bytes = f.read()
        except FileNotFoundError:
            raise StoreError(f"{uri}: MANIFEST.json is missing; the artifact is corrupted") from None
        manifest = _parse_manifest(manifest_bytes, uri)
        if local_dir is None:
            cached = self._views.get(src)
            if cached is not None and cached[0] == manifest_bytes and cached[1].is_dir():
                return cached[1]
            out = Path(tempfile.mkdtemp(dir=src.parent, prefix=f".{src.name}.view-"))
        else:
            out = _staging_for(Path(local_dir))
        try:
            for rel in manifest:
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(fd, rel, out / rel, link=local_dir is None)
            _verify_folder(out, manifest, uri)  # what is handed out is what was checked
            (out / MANIFEST).write_bytes(manifest_bytes)
            if local_dir is not None:
                (out / COMMIT_MARKER).write_bytes(b"ok\n")
                return _move_tree(out, Path(local_dir))
        except FileNotFoundError:  # the old version's files went (removed after a new commit)
            shutil.rmtree(out, ignore_errors=True)
            return None
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
        self._views[src] = (manifest_bytes, out)
        _VIEWS.append(out)
        return out

    def read_artifact_file(self, prefix: str, rel: str) -> bytes:
        """One file of the committed artifact at `prefix`."""
        if not self.is_committed(prefix):
            raise StoreError(f"no complete artifact at {self.uri(prefix)} (commit marker missing)")
        return self.read_bytes(f"{prefix}/{_safe_rel(rel, self.uri(prefix))}")

    def fetch(self, uri: str, local_dir: Path) -> Path:
        """Copy a folder given by an absolute URI (local path, file:// or s3://) into `local_dir`.

        For folders the user made (a model uploaded with `aws s3 sync`): verified when a
        MANIFEST.json is there, copied as is otherwise.
        """
        if uri.startswith("s3://"):
            return self._s3(uri).fetch(uri, local_dir)
        if "://" in uri and not uri.startswith("file://"):
            raise StoreError(f"{uri}: unsupported scheme; use a local path, file:// or s3://bucket/prefix")
        return _fetch_local(uri, local_dir)

    def is_committed(self, prefix: str) -> bool:
        return (self._path(prefix) / COMMIT_MARKER).is_file()

    def list_dirs(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))

    def walk(self, prefix: str = "") -> Iterator[tuple[str, float, int]]:
        """(key relative to the store root, modification time, size) of every file under
        `prefix`, hidden staging folders and temp files included."""
        base = self._path(prefix) if prefix else self.root
        for dirpath, _, files in os.walk(base):
            for name in files:
                path = Path(dirpath) / name
                with contextlib.suppress(FileNotFoundError):  # another process may be replacing it
                    st = path.lstat()
                    yield path.relative_to(self.root).as_posix(), st.st_mtime, st.st_size

    def delete(self, prefix: str) -> None:
        p = self._path(prefix)
        marker = p / COMMIT_MARKER
        if marker.exists():
            marker.unlink()
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _move_or_copy(src: Path, out: Path) -> None:
    """Rename when possible; copy across filesystems (EXDEV) and for symlinks (a moved
    relative link would dangle)."""
    if src.is_symlink():
        shutil.copy2(src, out)
        return
    try:
        os.replace(src, out)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        shutil.copy2(src, out)


# ----------------------------------------------------------------------------- S3


_ACCESS_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                 "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "InvalidSecurity", "403"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                   "TooManyRequests", "TooManyRequestsException", "RequestTimeout", "429", "503"}


def _outage_delay(attempts: int) -> float:
    """Seconds before the next try while the S3 server does not answer: 1, 2, 4, then 5."""
    return min(0.5 * 2 ** min(attempts, 4), 5.0)


def _client_error(exc: BaseException):
    """The botocore ClientError behind `exc`, if any. boto3's upload_file re-raises a
    ClientError as S3UploadFailedError with only a message, so follow the chain."""
    from botocore.exceptions import ClientError

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ClientError):
            return exc
        if getattr(exc, "last_exception", None) is not None:  # boto3 RetriesExceededError
            exc = exc.last_exception
        else:
            exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _error_code(exc: BaseException) -> str | None:
    ce = _client_error(exc)
    return str(ce.response.get("Error", {}).get("Code")) if ce is not None else None


class S3Store(_JsonMixin):
    """A store rooted at ``s3://bucket/prefix``, through boto3.

    Retries: botocore's "standard" mode retries throttling (503 SlowDown, 429,
    RequestTimeout) and dropped connections with exponential backoff and jitter, up to
    `settings.s3_max_attempts` attempts per request. Access and bucket errors are not
    retryable there, so they surface at once. Large files go through boto3's transfer
    manager (parallel multipart above `multipart_threshold`).

    Credentials come from `settings` when it carries them (tests pass the local stack's
    settings), else from boto3's usual chain (environment, ~/.aws, instance role).
    """

    def __init__(self, root: str, settings: "Settings | None" = None, *,
                 multipart_threshold: int = 64 * MiB, multipart_chunksize: int = 64 * MiB,
                 max_concurrency: int = 8, connect_timeout: float = 10, read_timeout: float = 120):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket, self.prefix = split_s3_uri(str(root))
        if settings is None:
            raise TypeError("S3Store needs the process settings (endpoint, region, credentials, retries): "
                            "pass the Settings read at the process entry point")
        self.settings = settings
        self.endpoint = self.settings.s3_endpoint_url
        config = Config(
            # total_max_attempts counts the first try; botocore's `max_attempts` key would
            # count retries only (N+1 requests), unlike AWS_MAX_ATTEMPTS and our setting.
            retries={"mode": "standard", "total_max_attempts": self.settings.s3_max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max(10, max_concurrency),
            # Newer botocore adds CRC trailers and checks response checksums by default;
            # S3-compatible servers (SeaweedFS, MinIO) do not all support that.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # Local servers have no per-bucket DNS names.
            s3={"addressing_style": "path"} if self.endpoint else None,
        )
        credentials = {}
        if self.settings.aws_access_key_id and self.settings.aws_secret_access_key:
            credentials = {"aws_access_key_id": self.settings.aws_access_key_id,
                           "aws_secret_access_key": self.settings.aws_secret_access_key,
                           "aws_session_token": self.settings.aws_session_token}
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=self.settings.aws_region, config=config, **credentials)
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency, preferred_transfer_client="classic")
        self.list_page_size = 1000  # keys per ListObjectsV2 page (S3's maximum); tests shrink it
        self._outage_said = False
        if self.settings.s3_outage_tolerance_s > 0:  # decides before botocore's own handler (first answer wins)
            self.client.meta.events.register_first("needs-retry.s3", self._through_outage)
        self._checked_buckets: set[str] = set()
        self._scratch: Path | None = None
        self._downloads: dict[str, tuple[bytes, Path]] = {}

    # -- addressing

    def _locate(self, key: str) -> tuple[str, str]:
        """(bucket, object key) of a store key, or of an absolute s3:// URI in any bucket."""
        if key.startswith("s3://"):
            return split_s3_uri(key)
        if "://" in key:
            raise StoreError(f"{key}: this is an S3 store at {self.uri('')}; give keys relative to it or s3:// URIs")
        parts = [p for p in key.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise StoreError(f"key {key!r} escapes the store root {self.uri('')}")
        return self.bucket, "/".join(([self.prefix] if self.prefix else []) + parts)

    def uri(self, key: str) -> str:
        if key.startswith("s3://"):
            return key.rstrip("/")
        bucket, obj = self._locate(key)
        return f"s3://{bucket}/{obj}".rstrip("/")

    # -- errors

    def _through_outage(self, attempts: int, caught_exception=None, request_dict=None, **_) -> float | None:
        """botocore's retry hook: while the server does not answer at all (a restarting
        pod refuses or times out connections), retry the request for up to
        `s3_outage_tolerance_s`, backing off to 5 s; botocore's own few quick attempts
        would give up within seconds. None leaves the decision to botocore."""
        from botocore.exceptions import ConnectionError, HTTPClientError

        if not isinstance(caught_exception, (ConnectionError, HTTPClientError)) or request_dict is None:
            return None
        began = request_dict.setdefault("context", {}).setdefault("rlhf_outage_began", time.monotonic())
        left = self.settings.s3_outage_tolerance_s - (time.monotonic() - began)
        if left <= 0:
            return None
        if not self._outage_said:
            self._outage_said = True
            print(f"store: S3 at {self.endpoint or 'AWS S3'} does not answer ({type(caught_exception).__name__}); "
                  f"retrying for up to {self.settings.s3_outage_tolerance_s:g} s (RLHF_S3_OUTAGE_TOLERANCE_S)",
                  file=sys.stderr, flush=True)
        return min(_outage_delay(attempts), left)

    def _translate(self, exc: BaseException, uri: str, bucket: str) -> StoreError:
        from botocore.exceptions import (ConnectionError, HTTPClientError, NoCredentialsError,
                                         PartialCredentialsError)

        where = self.endpoint or "AWS S3"
        code = _error_code(exc)
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StoreError(f"{uri}: no usable S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                              "(or AWS_PROFILE); for the local stack run `rlhf stack up` and paste its export lines")
        if code in _ACCESS_CODES:
            return StoreError(f"{uri}: access to bucket {bucket!r} at {where} was refused ({code}): check "
                              "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) and that they may use "
                              "this bucket, and AWS_ENDPOINT_URL_S3 (which server you talk to)")
        if code == "NoSuchBucket":
            return StoreError(f"{uri}: bucket {bucket!r} does not exist at {where}: create it or fix the URI; "
                              "check AWS_ENDPOINT_URL_S3 (which server you talk to)")
        if code in _THROTTLE_CODES:
            return StoreError(f"{uri}: S3 at {where} still throttled or timed out after "
                              f"{self.settings.s3_max_attempts} attempts ({code}): retry later or raise "
                              "RLHF_S3_MAX_ATTEMPTS")
        if isinstance(exc, (ConnectionError, HTTPClientError)):
            return StoreError(f"{uri}: cannot reach S3 at {where} after {self.settings.s3_max_attempts} attempts "
                              f"and {self.settings.s3_outage_tolerance_s:g} s ({type(exc).__name__}): check "
                              "AWS_ENDPOINT_URL_S3 and that the server is up (`rlhf stack status` for the local stack)")
        detail = str(_client_error(exc) or exc)
        return StoreError(f"{uri}: S3 request to {where} failed: {detail}")

    @contextmanager
    def _errors(self, uri: str, bucket: str) -> Iterator[None]:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except StoreError:
            raise
        except (ClientError, BotoCoreError, Boto3Error) as e:
            raise self._translate(e, uri, bucket) from e

    def _check_bucket(self, bucket: str, uri: str) -> None:
        """HEAD on a missing key answers a bare 404 whether or not the bucket exists;
        ask once per bucket so a wrong bucket fails loudly instead of looking empty."""
        if bucket in self._checked_buckets:
            return
        with self._errors(uri, bucket):
            try:
                self.client.head_bucket(Bucket=bucket)
            except Exception as e:
                if _error_code(e) in _MISSING_CODES:
                    raise StoreError(f"{uri}: bucket {bucket!r} does not exist at {self.endpoint or 'AWS S3'}: "
                                     "create it or fix the URI; check AWS_ENDPOINT_URL_S3") from None
                raise
        self._checked_buckets.add(bucket)

    # -- objects

    def _head(self, bucket: str, obj: str, uri: str) -> bool:
        with self._errors(uri, bucket):
            try:
                self.client.head_object(Bucket=bucket, Key=obj)
                return True
            except Exception as e:
                if _error_code(e) not in _MISSING_CODES:
                    raise
        self._check_bucket(bucket, uri)
        return False

    def _keys(self, bucket: str, prefix: str, uri: str) -> Iterator[str]:
        """Every object key under `prefix` ('/'-terminated, or '' for the whole bucket)."""
        with self._errors(uri, bucket):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": self.list_page_size})
            for page in pages:
                for obj in page.get("Contents", []):
                    yield obj["Key"]

    def exists(self, key: str) -> bool:
        """An object, or a "folder" (any object under key/)."""
        bucket, obj = self._locate(key)
        uri = self.uri(key)
        if obj and self._head(bucket, obj, uri):
            return True
        return next(self._keys(bucket, f"{obj}/" if obj else "", uri), None) is not None

    def read_bytes(self, key: str) -> bytes:
        bucket, obj = self._locate(key)
        uri = self.uri(key)
        with self._errors(uri, bucket):
            try:
                return self.client.get_object(Bucket=bucket, Key=obj)["Body"].read()
            except Exception as e:
                if _error_code(e) in _MISSING_CODES:
                    raise StoreError(f"no object at {uri}") from None
                raise

    def write_bytes(self, key: str, data: bytes) -> None:
        """One PUT: S3 objects appear whole or not at all."""
        bucket, obj = self._locate(key)
        with self._errors(self.uri(key), bucket):
            self.client.put_object(Bucket=bucket, Key=obj, Body=data)

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """The object and its version token (its ETag), or None when absent."""
        bucket, obj = self._locate(key)
        with self._errors(self.uri(key), bucket):
            try:
                got = self.client.get_object(Bucket=bucket, Key=obj)
            except Exception as e:
                if _error_code(e) in _MISSING_CODES:
                    return None
                raise
            return got["Body"].read(), got["ETag"]

    def write_if(self, key: str, data: bytes, expected: str | None) -> str | None:
        """Compare-and-swap by S3 conditional writes: If-Match on the expected ETag, or
        If-None-Match: * for "only if absent" (AWS S3, SeaweedFS, MinIO). Returns the new
        ETag, or None when another writer came first (412 Precondition Failed, 409)."""
        bucket, obj = self._locate(key)
        condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        with self._errors(self.uri(key), bucket):
            try:
                put = self.client.put_object(Bucket=bucket, Key=obj, Body=data, **condition)
            except Exception as e:
                if _error_code(e) in {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}:
                    return None
                raise
        if not put.get("ETag"):
            raise StoreError(f"{self.uri(key)}: S3 at {self.endpoint or 'AWS S3'} returned no ETag for a conditional "
                             "write; use an S3 server with conditional writes (AWS S3, SeaweedFS, MinIO)")
        return put["ETag"]

    def _delete_keys(self, bucket: str, keys: list[str], uri: str) -> None:
        """In batches of DELETE_BATCH keys (the most one DeleteObjects request takes)."""
        with self._errors(uri, bucket):
            for i in range(0, len(keys), DELETE_BATCH):
                batch = [{"Key": k} for k in keys[i:i + DELETE_BATCH]]
                resp = self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
                if resp.get("Errors"):
                    err = resp["Errors"][0]
                    raise StoreError(f"{uri}: could not delete s3://{bucket}/{err.get('Key')} "
                                     f"({err.get('Code')}: {err.get('Message')}); check delete permission "
                                     f"on bucket {bucket!r} and retry")

    def _download(self, bucket: str, obj: str, dest: Path, uri: str) -> bool:
        """Download one object; False when it does not exist."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._errors(uri, bucket):
            try:
                self.client.download_file(bucket, obj, str(dest), Config=self.transfer_config)
                return True
            except Exception as e:
                if _error_code(e) in _MISSING_CODES:
                    return False
                raise

    # -- directory artifacts

    def put_dir(self, local_dir: Path, prefix: str, move: bool = False) -> dict:
        """Upload a folder under `prefix`: files, then MANIFEST.json, then the commit marker.

        A prefix with nothing committed gets the files in place (`<prefix>/<path>`). Over a
        committed artifact the new version goes beside it (`<prefix>/.v-<id>/<path>`) and
        the marker switches to it in one conditional PUT (its body names the version):
        the committed version stays whole, for readers too, until the new one is
        committed, and the old objects are deleted after. One writer per prefix: a writer
        that finds the marker changed by another at the switch fails and leaves the
        other's version (prep's dataset lease keeps it to one). `move` is accepted for
        interface parity and ignored (the caller may delete `local_dir` afterwards).
        """
        local_dir = Path(local_dir)
        bucket, base = self._locate(prefix)
        uri = self.uri(prefix)
        if not local_dir.is_dir():
            raise StoreError(f"put_dir: {local_dir} is not a folder (nothing to store at {uri})")
        if not base:
            raise StoreError(f"put_dir needs a prefix under the bucket root {uri} (stale-file cleanup would "
                             "otherwise sweep the whole bucket)")
        files = {src.relative_to(local_dir).as_posix(): src for src in sorted(local_dir.rglob("*")) if src.is_file()}
        manifest = {rel: sha256_file(src) for rel, src in files.items()}
        self._forget_downloads(prefix)

        marker = f"s3://{bucket}/{_child(base, COMMIT_MARKER)}"
        current = self.read_versioned(marker)
        old = set(self._keys(bucket, f"{base}/", uri))
        version = None if current is None else f"{VERSION_PREFIX}{uuid.uuid4().hex[:12]}"
        at = base if version is None else f"{base}/{version}"
        mine = {f"{at}/{rel}" for rel in manifest} | {f"{at}/{MANIFEST}"}
        with self._errors(uri, bucket):
            for rel, src in files.items():
                self.client.upload_file(str(src), bucket, f"{at}/{rel}", Config=self.transfer_config)
            self.client.put_object(Bucket=bucket, Key=f"{at}/{MANIFEST}",
                                   Body=json.dumps(manifest, indent=2, sort_keys=True).encode())
        if version is None:  # nothing committed to keep: leftovers of an interrupted write go first
            stale = sorted(old - mine - {_child(base, COMMIT_MARKER)})
            self._delete_keys(bucket, stale + _folder_keys(stale, base, mine), uri)
        body = b"ok\n" if version is None else json.dumps({"version": version}).encode()
        if not self.write_if(marker, body, None if current is None else current[1]):
            if version is not None:
                self._delete_keys(bucket, sorted(mine), uri)
            raise StoreError(f"put_dir: another writer committed {uri} while this one uploaded; its version "
                             "stands (one writer per prefix: retry the step to use it)")
        if version is not None:  # the new version is committed: the old one goes
            stale = sorted(old - {_child(base, COMMIT_MARKER)})
            self._delete_keys(bucket, stale + _folder_keys(stale, base, mine), uri)
        return manifest

    def _committed_at(self, bucket: str, base: str, uri: str) -> tuple[str, bytes] | None:
        """(object prefix of the committed version, marker body), or None when uncommitted."""
        got = self.read_versioned(f"s3://{bucket}/{_child(base, COMMIT_MARKER)}")
        if got is None:
            return None
        body = got[0]
        if body.startswith(b"{"):
            try:
                version = json.loads(body)["version"]
            except (ValueError, KeyError, TypeError):
                raise StoreError(f"{uri}/{COMMIT_MARKER} is not a commit marker ({body[:80]!r}); the artifact is "
                                 "corrupted (write it again, e.g. rerun the stage that produced it)") from None
            if not (isinstance(version, str) and version.startswith(VERSION_PREFIX) and "/" not in version):
                raise StoreError(f"{uri}/{COMMIT_MARKER} names version {version!r}; the artifact is corrupted")
            return f"{base}/{version}", body
        return base, body

    def read_artifact_file(self, prefix: str, rel: str) -> bytes:
        """One file of the committed artifact at `prefix` (wherever its version lives)."""
        bucket, base = self._locate(prefix)
        where = self._committed_at(bucket, base, self.uri(prefix))
        if where is None:
            raise StoreError(f"no complete artifact at {self.uri(prefix)} (commit marker missing)")
        return self.read_bytes(f"s3://{bucket}/{where[0]}/{_safe_rel(rel, self.uri(prefix))}")

    def get_dir(self, prefix: str, local_dir: Path | None = None) -> Path:
        """Download the committed artifact at `prefix`, verified file by file.

        Into `local_dir`, or when None into this store's scratch folder (removed at
        interpreter exit; a prefix whose manifest has not changed is not downloaded
        twice). Nothing is handed out unless every file matches the manifest. A version
        committed over it while downloading (its files then disappear) is downloaded
        instead: the result is always one whole committed version.
        """
        bucket, base = self._locate(prefix)
        uri = self.uri(prefix)
        for _ in range(5):
            where = self._committed_at(bucket, base, uri)
            if where is None:
                raise StoreError(f"no complete artifact at {uri} (commit marker missing)")
            at, marker_body = where
            try:
                manifest_bytes = self.read_bytes(f"s3://{bucket}/{_child(at, MANIFEST)}")
            except StoreError as e:
                if not str(e).startswith("no object"):
                    raise
                if self._committed_at(bucket, base, uri) != where:
                    continue
                raise StoreError(f"{uri}: MANIFEST.json is missing; the artifact is corrupted") from None
            manifest = _parse_manifest(manifest_bytes, uri)
            cached = self._downloads.get(base) if local_dir is None else None
            if cached is not None and cached[0] == manifest_bytes and cached[1].is_dir():
                return cached[1]
            # A fresh scratch folder per download: a folder handed out earlier stays untouched.
            dest = Path(local_dir) if local_dir is not None else (
                Path(tempfile.mkdtemp(dir=self._scratch_dir())) / (base.rsplit("/", 1)[-1] or self.bucket))
            staging = _staging_for(dest)
            try:
                missing = [rel for rel in manifest if not self._download(bucket, _child(at, rel), staging / rel, uri)]
                if missing and self._committed_at(bucket, base, uri) != where:
                    continue  # a new version was committed and the old one removed meanwhile
                if missing:
                    raise StoreError(f"{uri}/{missing[0]} is listed in the manifest but missing; the artifact is "
                                     "corrupted (write it again, e.g. rerun the stage that produced it)")
                _verify_folder(staging, manifest, uri)
                (staging / MANIFEST).write_bytes(manifest_bytes)
                (staging / COMMIT_MARKER).write_bytes(b"ok\n")
                out = _move_tree(staging, dest)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            if local_dir is None:
                self._downloads[base] = (manifest_bytes, out)
            return out
        raise StoreError(f"{uri} kept changing while it was read (5 attempts); another process is "
                         "rewriting it in a loop")

    def fetch(self, uri: str, local_dir: Path) -> Path:
        """Copy everything under an absolute URI (s3://any-bucket/prefix, or a local path)
        into `local_dir`; verified when a MANIFEST.json is among the files.

        For folders users upload themselves (`aws s3 sync model/ s3://b/models/m`), which
        have no manifest and no commit marker.
        """
        if not uri.startswith("s3://"):
            if "://" in uri and not uri.startswith("file://"):
                raise StoreError(f"{uri}: unsupported scheme; use a local path, file:// or s3://bucket/prefix")
            return _fetch_local(uri, local_dir)
        bucket, base = split_s3_uri(uri)
        uri = f"s3://{bucket}/{base}".rstrip("/")
        listing = f"{base}/" if base else ""
        keys = [k for k in self._keys(bucket, listing, uri) if not k.endswith("/")]  # skip "folder" placeholders
        if not keys:
            self._check_bucket(bucket, uri)
            raise StoreError(f"nothing to fetch under {uri}: check the URI (`aws s3 ls {uri}/`)")
        if base and f"{listing}{COMMIT_MARKER}" in keys:  # one of our artifacts: its committed version
            return self.get_dir(uri, local_dir)
        local_dir = Path(local_dir)
        staging = _staging_for(local_dir)
        try:
            for key in keys:
                rel = _safe_rel(key[len(listing):], uri)
                if not self._download(bucket, key, staging / rel, uri):
                    raise StoreError(f"{uri}/{rel} disappeared while fetching; retry when the upload has finished")
            if (staging / MANIFEST).is_file():
                _verify_folder(staging, _parse_manifest((staging / MANIFEST).read_bytes(), uri), uri)
            return _move_tree(staging, local_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def is_committed(self, prefix: str) -> bool:
        bucket, base = self._locate(prefix)
        return self._head(bucket, _child(base, COMMIT_MARKER), self.uri(prefix))

    def list_dirs(self, prefix: str) -> list[str]:
        """Immediate sub-"folders" of `prefix` (S3 CommonPrefixes), hidden names excluded."""
        bucket, base = self._locate(prefix)
        listing = f"{base}/" if base else ""
        names = []
        with self._errors(self.uri(prefix), bucket):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=listing, Delimiter="/", PaginationConfig={"PageSize": self.list_page_size})
            for page in pages:
                for common in page.get("CommonPrefixes", []):
                    name = common["Prefix"][len(listing):].strip("/")
                    if name and not name.startswith("."):
                        names.append(name)
        return sorted(names)

    def walk(self, prefix: str = "") -> Iterator[tuple[str, float, int]]:
        """(key relative to the store root, last modified, size) of every object under `prefix`."""
        bucket, base = self._locate(prefix)
        listing = f"{base}/" if base else ""
        with self._errors(self.uri(prefix), bucket):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=listing, PaginationConfig={"PageSize": self.list_page_size})
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self.prefix) + 1:] if self.prefix else obj["Key"]
                    if key and not key.endswith("/"):
                        yield key, obj["LastModified"].timestamp(), obj["Size"]

    def delete(self, prefix: str) -> None:
        """Marker first (the artifact stops looking complete), then everything under it."""
        bucket, base = self._locate(prefix)
        uri = self.uri(prefix)
        if not base:
            raise StoreError(f"refusing to delete the whole store root {uri}; delete a prefix under it")
        self._forget_downloads(prefix)
        with self._errors(uri, bucket):
            self.client.delete_object(Bucket=bucket, Key=f"{base}/{COMMIT_MARKER}")
        keys = list(self._keys(bucket, f"{base}/", uri))
        if self._head(bucket, base, uri):
            keys.append(base)
        # `base/` also when no key is left: SeaweedFS may still hold the empty folder.
        self._delete_keys(bucket, keys + (_folder_keys(keys, base) or [f"{base}/"]), uri)

    # -- local scratch space

    def _scratch_dir(self) -> Path:
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="rlhf-s3-"))
            atexit.register(shutil.rmtree, self._scratch, True)
        return self._scratch

    def _forget_downloads(self, prefix: str) -> None:
        """The artifact changes: the next get_dir downloads again (old copies stay until exit)."""
        _, base = self._locate(prefix)
        for key in [k for k in self._downloads if not base or k == base or k.startswith(f"{base}/")]:
            del self._downloads[key]


def open_store(root: str | Path, settings: "Settings | None" = None) -> LocalStore | S3Store:
    """The store for a root: `s3://bucket/prefix` -> S3Store, anything else a local folder."""
    root = str(root)
    if root.startswith("s3://"):
        return S3Store(root, settings)
    return LocalStore(root, settings)
