"""Artifact store: where stages read and write bytes (datasets, checkpoints, models).

Keys are '/'-separated paths relative to the store root. A *directory artifact* is
complete only once its commit marker (``_COMMITTED``) exists: writers put every file
first and the marker last, readers ignore prefixes without it. A crash mid-write
therefore never leaves something that looks complete.

`LocalStore` is a folder. `S3Store` (boto3) arrives with the pipeline issue and
implements the same interface.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

COMMIT_MARKER = "_COMMITTED"


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
    def put_dir(self, local_dir: Path, prefix: str) -> dict: ...
    def get_dir(self, prefix: str, local_dir: Path) -> Path: ...
    def is_committed(self, prefix: str) -> bool: ...
    def list_dirs(self, prefix: str) -> list[str]: ...
    def delete(self, prefix: str) -> None: ...


class LocalStore:
    """A store rooted at a local folder. Writes are atomic (temp file + rename)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

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

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def local_path(self, key: str) -> Path:
        """Local stores can hand out paths directly (no copy)."""
        return self._path(key)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def read_bytes(self, key: str) -> bytes:
        p = self._path(key)
        if not p.is_file():
            raise StoreError(f"no object at {self.uri(key)}")
        return p.read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)

    def write_json(self, key: str, obj) -> None:
        self.write_bytes(key, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, key: str):
        return json.loads(self.read_bytes(key))

    def put_dir(self, local_dir: Path, prefix: str) -> dict:
        """Copy a folder under `prefix` with a sha256 manifest, then the commit marker.

        Returns the manifest ({relative path: sha256}). An existing artifact at the
        prefix is replaced: its marker is removed first so it never looks complete
        while half-overwritten.
        """
        local_dir = Path(local_dir)
        dest = self._path(prefix)
        if dest.exists() and dest.resolve() == local_dir.resolve():
            raise StoreError("put_dir source and destination are the same folder")
        self.delete(prefix)
        staging = dest.parent / f".{dest.name}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        manifest: dict[str, str] = {}
        for src in sorted(local_dir.rglob("*")):
            if src.is_file():
                rel = src.relative_to(local_dir).as_posix()
                manifest[rel] = sha256_file(src)
                out = staging / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out)
        (staging / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        staging.rename(dest)
        self.write_bytes(f"{prefix.strip('/')}/{COMMIT_MARKER}", b"ok\n")
        return manifest

    def get_dir(self, prefix: str, local_dir: Path | None = None) -> Path:
        """Return a local folder holding the committed artifact at `prefix`, verified."""
        if not self.is_committed(prefix):
            raise StoreError(f"no complete artifact at {self.uri(prefix)} (commit marker missing)")
        src = self._path(prefix)
        if not (src / "MANIFEST.json").is_file():
            raise StoreError(f"{self.uri(prefix)}: MANIFEST.json is missing; the artifact is corrupted")
        manifest = json.loads((src / "MANIFEST.json").read_text())
        for rel, digest in manifest.items():
            if not (src / rel).is_file():
                raise StoreError(f"{self.uri(prefix)}/{rel} is listed in the manifest but missing; the artifact is corrupted")
            if sha256_file(src / rel) != digest:
                raise StoreError(f"checksum mismatch for {self.uri(prefix)}/{rel}: the artifact is corrupted")
        if local_dir is None:
            return src
        shutil.copytree(src, local_dir, dirs_exist_ok=True)
        return Path(local_dir)

    def is_committed(self, prefix: str) -> bool:
        return (self._path(prefix) / COMMIT_MARKER).is_file()

    def list_dirs(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))

    def delete(self, prefix: str) -> None:
        p = self._path(prefix)
        marker = p / COMMIT_MARKER
        if marker.exists():
            marker.unlink()
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def open_store(root: str | Path) -> LocalStore:
    """Open the store for a root URI. `s3://` arrives with the pipeline issue."""
    root = str(root)
    if root.startswith("s3://"):
        raise StoreError("s3:// stores are not available yet in this build; use a local folder")
    return LocalStore(root)
