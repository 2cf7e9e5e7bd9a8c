"""Artifact store: atomic objects, committed directory artifacts, verification."""

from __future__ import annotations

import json
import os

import pytest

from rlhf.adapters.settings import Settings
from rlhf.adapters.store import COMMIT_MARKER, LocalStore, S3Store, StoreError, open_store, sha256_file


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


@pytest.fixture
def src_dir(tmp_path):
    d = tmp_path / "src"
    (d / "sub").mkdir(parents=True)
    (d / "weights.bin").write_bytes(bytes(range(256)) * 4)
    (d / "config.json").write_text('{"a": 1}')
    (d / "sub" / "notes.txt").write_text("hello\n")
    return d


# ----------------------------------------------------------------------------- objects


def test_write_read_bytes(store):
    store.write_bytes("a/b/c.bin", b"\x00\x01payload")
    assert store.read_bytes("a/b/c.bin") == b"\x00\x01payload"
    assert store.exists("a/b/c.bin")
    assert (store.root / "a" / "b" / "c.bin").read_bytes() == b"\x00\x01payload"
    # Overwrite.
    store.write_bytes("a/b/c.bin", b"new")
    assert store.read_bytes("a/b/c.bin") == b"new"
    # No temp files left behind.
    assert sorted(p.name for p in (store.root / "a" / "b").iterdir()) == ["c.bin"]


def test_write_read_json(store):
    obj = {"x": [1, 2.5, None], "y": {"z": "w"}}
    store.write_json("meta/info.json", obj)
    assert store.read_json("meta/info.json") == obj
    assert json.loads(store.read_bytes("meta/info.json")) == obj


def test_read_missing_raises(store):
    assert not store.exists("nothing")
    with pytest.raises(StoreError, match="no object"):
        store.read_bytes("nothing")


def test_leading_slash_stays_inside_root(store):
    store.write_bytes("/x/y", b"1")
    assert (store.root / "x" / "y").read_bytes() == b"1"


@pytest.mark.parametrize("key", ["../x", "a/../../x", "../store-sibling/x"])
def test_keys_escaping_root_raise(store, key):
    with pytest.raises(StoreError, match="escapes"):
        store.write_bytes(key, b"bad")
    with pytest.raises(StoreError, match="escapes"):
        store.read_bytes(key)
    assert not (store.root.parent / "x").exists()


def test_uri_is_file_uri(store):
    assert store.uri("a/b") == (store.root / "a" / "b").as_uri()
    assert store.uri("a/b").startswith("file://")


# ----------------------------------------------------------------------------- directory artifacts


def test_put_dir_writes_manifest_and_marker(store, src_dir):
    manifest = store.put_dir(src_dir, "models/sft")
    assert set(manifest) == {"weights.bin", "config.json", "sub/notes.txt"}
    assert manifest["weights.bin"] == sha256_file(src_dir / "weights.bin")
    dest = store.root / "models" / "sft"
    assert json.loads((dest / "MANIFEST.json").read_text()) == manifest
    assert (dest / COMMIT_MARKER).is_file()
    assert store.is_committed("models/sft")
    assert (dest / "sub" / "notes.txt").read_text() == "hello\n"
    # No staging folder left behind.
    assert sorted(p.name for p in (store.root / "models").iterdir()) == ["sft"]


def test_get_dir_verifies_and_copies(store, src_dir, tmp_path):
    store.put_dir(src_dir, "models/sft")
    out = store.get_dir("models/sft", tmp_path / "copy")
    assert out == tmp_path / "copy"
    assert (out / "weights.bin").read_bytes() == (src_dir / "weights.bin").read_bytes()
    assert (out / "sub" / "notes.txt").read_text() == "hello\n"



def test_a_reader_keeps_its_version_while_a_writer_replaces_it(store, src_dir, tmp_path):
    """Without a destination a local store hands out a view (hard links, no copy): a new
    version committed meanwhile, which removes the old folder, leaves it as it was."""
    store.put_dir(src_dir, "models/sft")
    view = store.get_dir("models/sft")
    assert view.parent == store.root / "models" and view.name.startswith(".sft.view-")
    assert os.stat(view / "weights.bin").st_ino == os.stat(store.root / "models/sft/weights.bin").st_ino
    assert store.get_dir("models/sft") == view  # unchanged artifact: the same view
    old = (src_dir / "weights.bin").read_bytes()
    (src_dir / "weights.bin").write_bytes(b"version two")
    (src_dir / "sub" / "notes.txt").unlink()
    store.put_dir(src_dir, "models/sft")
    assert (view / "weights.bin").read_bytes() == old and (view / "sub" / "notes.txt").read_text() == "hello\n"
    new = store.get_dir("models/sft")
    assert new != view and (new / "weights.bin").read_bytes() == b"version two"
    assert not (new / "sub").exists()
    assert store.list_dirs("models") == ["sft"]  # views are hidden
    # views are removed when the process exits; one a kill left behind is gc's to collect
    from rlhf.ops.gc import leftovers
    assert {x.prefix for x in leftovers(store, older_than_s=0)} >= {f"models/{view.name}", f"models/{new.name}"}


def test_get_dir_detects_corruption(store, src_dir, tmp_path):
    store.put_dir(src_dir, "models/sft")
    f = store.root / "models" / "sft" / "weights.bin"
    data = bytearray(f.read_bytes())
    data[10] ^= 0xFF
    f.write_bytes(bytes(data))
    assert store.is_committed("models/sft")  # still marked, but corrupted
    with pytest.raises(StoreError, match="checksum") as ei:
        store.get_dir("models/sft", tmp_path / "copy")
    assert "weights.bin" in str(ei.value)
    assert not (tmp_path / "copy").exists()  # nothing handed out


def test_get_dir_missing_file_is_store_error(store, src_dir, tmp_path):
    store.put_dir(src_dir, "models/sft")
    (store.root / "models" / "sft" / "sub" / "notes.txt").unlink()
    with pytest.raises(StoreError):
        store.get_dir("models/sft", tmp_path / "copy")


def test_prefix_without_marker_is_not_committed(store, tmp_path):
    half = store.root / "models" / "half"
    half.mkdir(parents=True)
    (half / "weights.bin").write_bytes(b"partial")
    (half / "MANIFEST.json").write_text(json.dumps({"weights.bin": "0" * 64}))
    assert not store.is_committed("models/half")
    with pytest.raises(StoreError, match="commit marker"):
        store.get_dir("models/half", tmp_path / "copy")
    with pytest.raises(StoreError):
        store.get_dir("models/absent")


def test_removing_marker_uncommits(store, src_dir):
    store.put_dir(src_dir, "a")
    (store.root / "a" / COMMIT_MARKER).unlink()
    assert not store.is_committed("a")
    with pytest.raises(StoreError):
        store.get_dir("a")


def test_put_dir_replaces_existing_artifact(store, src_dir, tmp_path):
    store.put_dir(src_dir, "models/sft")
    other = tmp_path / "other"
    other.mkdir()
    (other / "only.txt").write_text("v2")
    manifest = store.put_dir(other, "models/sft")
    assert set(manifest) == {"only.txt"}
    dest = store.root / "models" / "sft"
    assert sorted(p.name for p in dest.iterdir()) == sorted(["only.txt", "MANIFEST.json", COMMIT_MARKER])
    out = store.get_dir("models/sft", tmp_path / "copy")
    assert (out / "only.txt").read_text() == "v2"
    assert not (out / "weights.bin").exists()


def test_put_dir_same_folder_raises(store, src_dir):
    store.put_dir(src_dir, "a")
    with pytest.raises(StoreError, match="same folder"):
        store.put_dir(store.root / "a", "a")
    assert store.is_committed("a")


def test_list_dirs_and_delete(store, src_dir):
    store.put_dir(src_dir, "runs/b")
    store.put_dir(src_dir, "runs/a")
    (store.root / "runs" / ".hidden").mkdir()
    store.write_bytes("runs/file.txt", b"x")
    assert store.list_dirs("runs") == ["a", "b"]
    assert store.list_dirs("absent") == []
    store.delete("runs/a")
    assert store.list_dirs("runs") == ["b"]
    assert not store.is_committed("runs/a")
    store.delete("runs/file.txt")
    assert not store.exists("runs/file.txt")
    store.delete("runs/never")  # deleting nothing is fine


# ----------------------------------------------------------------------------- open_store


def test_open_store_local(tmp_path):
    s = open_store(tmp_path / "root")
    assert isinstance(s, LocalStore)
    assert s.root == (tmp_path / "root").resolve()
    assert s.root.is_dir()
    s2 = open_store(str(tmp_path / "root2"))
    assert s2.root == (tmp_path / "root2").resolve()


def test_open_store_s3_returns_s3_store():
    # Building the store makes no request: no server is needed here.
    settings = Settings.from_env({"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k",
                                  "AWS_SECRET_ACCESS_KEY": "s", "RLHF_S3_MAX_ATTEMPTS": "3"})
    s = open_store("s3://bucket/some/prefix/", settings)
    assert isinstance(s, S3Store)
    assert (s.bucket, s.prefix) == ("bucket", "some/prefix")
    assert s.uri("models/sft") == "s3://bucket/some/prefix/models/sft"
    assert s.uri("s3://other/x") == "s3://other/x"
    assert not hasattr(s, "local_path")
    with pytest.raises(StoreError, match="escapes"):
        s.uri("../x")
    with pytest.raises(StoreError, match="bucket name is missing"):
        open_store("s3:///prefix", settings)


def test_local_store_rejects_other_schemes_clearly(tmp_path):
    store = LocalStore(tmp_path)
    with pytest.raises(StoreError, match="S3 store"):
        store.write_bytes("s3://bucket/data.jsonl", b"x")
    with pytest.raises(StoreError, match="unsupported scheme"):
        store.fetch("gs://bucket/model", tmp_path / "out")


# ----------------------------------------------------------------------------- move and fetch


def test_put_dir_move_renames_files(store, src_dir, tmp_path):
    expected = {p.relative_to(src_dir).as_posix(): p.read_bytes() for p in src_dir.rglob("*") if p.is_file()}
    inode = (src_dir / "weights.bin").stat().st_ino
    manifest = store.put_dir(src_dir, "models/sft", move=True)
    assert set(manifest) == set(expected)
    dest = store.root / "models" / "sft"
    # Renamed, not copied: same inode, and the source no longer has the files.
    assert (dest / "weights.bin").stat().st_ino == inode
    assert not [p for p in src_dir.rglob("*") if p.is_file()]
    out = store.get_dir("models/sft", tmp_path / "copy")
    assert {rel: (out / rel).read_bytes() for rel in expected} == expected


def test_put_dir_move_copies_symlinks(store, src_dir):
    (src_dir / "link.json").symlink_to("config.json")
    store.put_dir(src_dir, "a", move=True)
    dest = store.root / "a"
    assert not (dest / "link.json").is_symlink()
    assert (dest / "link.json").read_text() == '{"a": 1}'


def test_fetch_plain_folder_and_file_uri(store, src_dir, tmp_path):
    out = store.fetch(str(src_dir), tmp_path / "plain")
    assert (out / "sub" / "notes.txt").read_text() == "hello\n"
    # A file:// URI with an escaped space, as Path.as_uri() writes it.
    spaced = tmp_path / "my model"
    spaced.mkdir()
    (spaced / "w.bin").write_bytes(b"w")
    out2 = store.fetch(spaced.as_uri(), tmp_path / "spaced")
    assert (out2 / "w.bin").read_bytes() == b"w"
    with pytest.raises(StoreError, match="nothing to fetch"):
        store.fetch(str(tmp_path / "absent"), tmp_path / "x")


def test_fetch_verifies_a_manifest_when_there_is_one(store, src_dir, tmp_path):
    store.put_dir(src_dir, "models/sft")
    out = store.fetch(store.uri("models/sft"), tmp_path / "ok")
    assert (out / "weights.bin").read_bytes() == (src_dir / "weights.bin").read_bytes()
    (store.root / "models" / "sft" / "config.json").write_text('{"a": 2}')
    with pytest.raises(StoreError, match="checksum mismatch.*config.json"):
        store.fetch(str(store.root / "models" / "sft"), tmp_path / "bad")


def test_manifest_entries_cannot_escape(store, src_dir, tmp_path):
    store.put_dir(src_dir, "a")
    (store.root / "a" / "MANIFEST.json").write_text(json.dumps({"../../etc/passwd": "0" * 64}))
    with pytest.raises(StoreError, match="not a plain relative path"):
        store.get_dir("a", tmp_path / "copy")


def test_a_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    """A write that fails half-way (here: the disk fills at fsync) leaves neither the new
    object nor a `.tmp` file, and the old object stays."""
    import os

    store = LocalStore(tmp_path)
    store.write_bytes("a/x.json", b"old")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        store.write_bytes("a/x.json", b"new")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.json"]
    assert (tmp_path / "a" / "x.json").read_bytes() == b"old"
