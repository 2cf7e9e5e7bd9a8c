"""S3Store and the local stack against a real SeaweedFS and a real MLflow server.

One stack serves the whole session (`local_stack`); each test works on its own
prefix (`s3_store`). Objects are also read and tampered with through plain boto3, the
way another tool (or bit rot) would.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest

import rlhf.adapters.store as store_mod
from rlhf.models.loading import resolve_source
from rlhf.adapters.settings import Settings
from rlhf.ops.stack import Stack, StackError, add_cli, handle_cli
from rlhf.adapters.store import COMMIT_MARKER, MANIFEST, MiB, LocalStore, S3Store, StoreError, sha256_file


def _keys(store: S3Store, prefix: str = "") -> list[str]:
    """Object keys under a store prefix, relative to it (through boto3 directly)."""
    base = store.uri(prefix)[len(f"s3://{store.bucket}/"):]
    pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=f"{base}/")
    return sorted(o["Key"][len(base) + 1:] for page in pages for o in page.get("Contents", []))


def _obj_key(store: S3Store, key: str) -> str:
    return store.uri(key)[len(f"s3://{store.bucket}/"):]


@pytest.fixture
def src_dir(tmp_path):
    d = tmp_path / "src"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text('{"a": 1}')
    (d / "sub" / "notes.txt").write_text("hello\n")
    (d / "weights.bin").write_bytes(os.urandom(300_000))
    return d


# ----------------------------------------------------------------------------- objects


def test_objects_roundtrip(s3_store):
    s3_store.write_bytes("a/b/c.bin", b"\x00\x01payload")
    assert s3_store.read_bytes("a/b/c.bin") == b"\x00\x01payload"
    assert s3_store.exists("a/b/c.bin")
    assert s3_store.exists("a/b")  # a "folder": something lies under it
    assert not s3_store.exists("a/nothing")
    s3_store.write_bytes("a/b/c.bin", b"new")
    assert s3_store.read_bytes("a/b/c.bin") == b"new"
    s3_store.write_json("meta/info.json", {"x": [1, 2.5, None]})
    assert s3_store.read_json("meta/info.json") == {"x": [1, 2.5, None]}
    assert s3_store.uri("a/b/c.bin") == f"s3://rlhf/{s3_store.prefix}/a/b/c.bin"
    with pytest.raises(StoreError, match=f"no object at s3://rlhf/{s3_store.prefix}/nope"):
        s3_store.read_bytes("nope")


# ----------------------------------------------------------------------------- directory artifacts


def test_put_get_dir_roundtrip_with_multipart(local_stack, s3_store, src_dir, tmp_path):
    # s3transfer never cuts parts below 5 MiB, so 6 MiB over a 1 MiB threshold is 2 parts.
    (src_dir / "big.safetensors").write_bytes(os.urandom(6 * MiB))
    store = S3Store(s3_store.uri(""), local_stack.settings(), multipart_threshold=1 * MiB,
                    multipart_chunksize=5 * MiB)
    manifest = store.put_dir(src_dir, "models/sft")
    assert set(manifest) == {"config.json", "sub/notes.txt", "weights.bin", "big.safetensors"}
    assert manifest["big.safetensors"] == sha256_file(src_dir / "big.safetensors")
    assert _keys(store, "models/sft") == sorted([*manifest, "MANIFEST.json", COMMIT_MARKER])
    assert json.loads(store.read_bytes("models/sft/MANIFEST.json")) == manifest
    etag = store.client.head_object(Bucket="rlhf", Key=_obj_key(store, "models/sft/big.safetensors"))["ETag"]
    assert etag.strip('"').endswith("-2"), f"expected a 2-part multipart upload, got ETag {etag}"
    small = store.client.head_object(Bucket="rlhf", Key=_obj_key(store, "models/sft/config.json"))["ETag"]
    assert "-" not in small

    out = store.get_dir("models/sft", tmp_path / "copy")
    assert out == tmp_path / "copy"
    for rel in manifest:
        assert (out / rel).read_bytes() == (src_dir / rel).read_bytes()
    # Without a destination: a scratch folder, downloaded once while the artifact is unchanged.
    scratch = store.get_dir("models/sft")
    assert (scratch / "big.safetensors").read_bytes() == (src_dir / "big.safetensors").read_bytes()
    assert store.get_dir("models/sft") == scratch
    assert not list(tmp_path.glob(".copy.partial-*"))  # no staging left behind


def test_marker_is_written_last_and_required(s3_store, src_dir, tmp_path, monkeypatch):
    calls: list[str] = []
    client = s3_store.client
    for name in ("put_object", "upload_file", "delete_object"):
        real = getattr(client, name)

        def spy(*args, _real=real, _name=name, **kw):
            key = kw.get("Key") or args[2]
            calls.append(f"{_name}:{key.rsplit('/', 1)[-1]}")
            return _real(*args, **kw)

        monkeypatch.setattr(client, name, spy)
    s3_store.put_dir(src_dir, "art")
    assert not any(c.startswith("delete_object") for c in calls)  # nothing was committed there
    assert calls[-2:] == ["put_object:MANIFEST.json", f"put_object:{COMMIT_MARKER}"]
    assert sorted(c for c in calls if c.startswith("upload_file")) == [
        "upload_file:config.json", "upload_file:notes.txt", "upload_file:weights.bin"]
    monkeypatch.undo()

    # An artifact whose marker is gone (a writer that crashed) is not complete.
    assert s3_store.is_committed("art")
    client.delete_object(Bucket="rlhf", Key=_obj_key(s3_store, f"art/{COMMIT_MARKER}"))
    assert not s3_store.is_committed("art")
    with pytest.raises(StoreError, match=r"no complete artifact at s3://rlhf/.*/art \(commit marker missing\)"):
        s3_store.get_dir("art", tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_corrupted_object_is_detected(s3_store, src_dir, tmp_path):
    s3_store.put_dir(src_dir, "art")
    s3_store.client.put_object(Bucket="rlhf", Key=_obj_key(s3_store, "art/sub/notes.txt"), Body=b"HELLO\n")
    with pytest.raises(StoreError, match=r"checksum mismatch for s3://rlhf/.*/art/sub/notes.txt: the artifact is corrupted"):
        s3_store.get_dir("art", tmp_path / "copy")
    assert not (tmp_path / "copy").exists()  # nothing handed out
    with pytest.raises(StoreError, match="checksum mismatch"):
        s3_store.get_dir("art")


def test_missing_file_is_detected(s3_store, src_dir, tmp_path):
    s3_store.put_dir(src_dir, "art")
    s3_store.client.delete_object(Bucket="rlhf", Key=_obj_key(s3_store, "art/weights.bin"))
    with pytest.raises(StoreError, match="art/weights.bin is listed in the manifest but missing"):
        s3_store.get_dir("art", tmp_path / "copy")


def test_list_dirs_paginates_and_delete_batches(s3_store, src_dir, monkeypatch):
    for name in ("b", "a", "d", "c", "e"):
        s3_store.put_dir(src_dir, f"runs/{name}")
    s3_store.write_bytes("runs/file.txt", b"x")
    s3_store.write_bytes("runs/.hidden/x", b"x")
    s3_store.list_page_size = 2  # force several ListObjectsV2 pages
    assert s3_store.list_dirs("runs") == ["a", "b", "c", "d", "e"]
    assert s3_store.list_dirs("absent") == []

    monkeypatch.setattr(store_mod, "DELETE_BATCH", 2)  # 6 objects -> 3 DeleteObjects calls
    s3_store.delete("runs/a")
    assert s3_store.list_dirs("runs") == ["b", "c", "d", "e"]
    assert not s3_store.is_committed("runs/a") and _keys(s3_store, "runs/a") == []
    s3_store.delete("runs/file.txt")
    assert not s3_store.exists("runs/file.txt")
    s3_store.delete("runs/never")  # deleting nothing is fine
    s3_store.delete("runs")
    assert _keys(s3_store, "runs") == []


def test_put_dir_replaces_stale_files(s3_store, src_dir, tmp_path):
    s3_store.put_dir(src_dir, "models/sft")
    s3_store.get_dir("models/sft")  # cached scratch copy of the first version
    other = tmp_path / "other"
    other.mkdir()
    (other / "only.txt").write_text("v2")
    manifest = s3_store.put_dir(other, "models/sft")
    assert set(manifest) == {"only.txt"}
    keys = _keys(s3_store, "models/sft")  # the new version beside the marker that names it; the old one gone
    version = json.loads(s3_store.read_bytes(f"models/sft/{COMMIT_MARKER}"))["version"]
    assert keys == sorted([f"{version}/only.txt", f"{version}/MANIFEST.json", COMMIT_MARKER])
    out = s3_store.get_dir("models/sft")  # the cache saw the new manifest
    assert (out / "only.txt").read_text() == "v2"
    assert not (out / "weights.bin").exists()
    assert json.loads(s3_store.read_artifact_file("models/sft", "MANIFEST.json")) == manifest
    fetched = s3_store.fetch(s3_store.uri("models/sft"), tmp_path / "fetched")  # a user pointing at it
    assert sorted(p.name for p in fetched.iterdir()) == sorted(["only.txt", "MANIFEST.json", COMMIT_MARKER])
    s3_store.put_dir(src_dir, "models/sft")  # and over a version again
    assert (s3_store.get_dir("models/sft", tmp_path / "v3") / "sub" / "notes.txt").read_text() == "hello\n"
    assert not [k for k in _keys(s3_store, "models/sft") if k.startswith(version)]


def test_replacing_keeps_the_committed_version_whole_until_the_new_one_is(s3_store, src_dir, tmp_path, monkeypatch):
    """put_dir over a committed artifact never removes or changes it before the new
    version is committed: a reader in the middle of the upload gets the old version
    whole, and a writer that loses the switch to another leaves the other's version."""
    s3_store.put_dir(src_dir, "data")
    old = {p.relative_to(src_dir).as_posix(): p.read_bytes() for p in src_dir.rglob("*") if p.is_file()}
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    (new_dir / "weights.bin").write_bytes(b"new weights")
    seen = []
    real_upload = s3_store.client.upload_file

    def upload_and_read(*args, **kw):
        real_upload(*args, **kw)
        reader = S3Store(s3_store.uri(""), s3_store.settings)  # another process, in effect
        assert reader.is_committed("data")
        got = reader.get_dir("data", tmp_path / f"read-{len(seen)}")
        seen.append({p.relative_to(got).as_posix(): p.read_bytes() for p in got.rglob("*")
                     if p.is_file() and p.name not in (MANIFEST, COMMIT_MARKER)})

    monkeypatch.setattr(s3_store.client, "upload_file", upload_and_read)
    s3_store.put_dir(new_dir, "data")
    monkeypatch.undo()
    assert seen == [old]  # mid-upload: the old version, whole
    assert (s3_store.get_dir("data", tmp_path / "after") / "weights.bin").read_bytes() == b"new weights"

    # a second writer whose switch finds the marker moved by another: refused, nothing of it left
    other = S3Store(s3_store.uri(""), s3_store.settings)
    real_write_if = other.write_if

    def someone_else_first(key, data, expected):
        s3_store.put_dir(src_dir, "data")  # the other writer commits while this one uploaded
        return real_write_if(key, data, expected)

    monkeypatch.setattr(other, "write_if", someone_else_first)
    with pytest.raises(StoreError, match="another writer committed .*/data while this one uploaded"):
        other.put_dir(new_dir, "data")
    monkeypatch.undo()
    got = s3_store.get_dir("data", tmp_path / "theirs")
    assert (got / "weights.bin").read_bytes() == old["weights.bin"]
    versions = {k.split("/")[0] for k in _keys(s3_store, "data") if k.startswith(".v-")}
    assert len(versions) == 1  # the loser's upload was removed


# ----------------------------------------------------------------------------- user folders (fetch)


def test_fetch_plain_prefix_without_manifest(local_stack, s3_store, tmp_path):
    """A model folder uploaded like `aws s3 sync`: no manifest, no marker, a folder placeholder."""
    base = _obj_key(s3_store, "user-model")
    c = s3_store.client
    c.put_object(Bucket="rlhf", Key=f"{base}/config.json", Body=b'{"model_type": "llama"}')
    c.put_object(Bucket="rlhf", Key=f"{base}/tokenizer/vocab.json", Body=b"{}")
    c.put_object(Bucket="rlhf", Key=f"{base}/empty/", Body=b"")  # console-made "folder"
    c.put_object(Bucket="rlhf", Key=f"{base}-v2/other.json", Body=b"not me")  # sibling, same prefix string
    uri = s3_store.uri("user-model")

    out = s3_store.fetch(uri, tmp_path / "m")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["config.json", "tokenizer/vocab.json"]
    # models.loading fetches s3:// model sources the same way, into a temp folder: once
    # per process however often a stage loads it, removed at exit
    from rlhf.models import loading

    local = resolve_source(uri, s3_store)
    assert (Path(local) / "config.json").read_text() == '{"model_type": "llama"}'
    calls = []
    fetch = s3_store.fetch
    s3_store.fetch = lambda *a: calls.append(a) or fetch(*a)
    assert resolve_source(uri, s3_store) == local and calls == []  # the tokenizer, then the weights: one download
    loading._remove_downloads()  # what the process's exit runs
    assert not Path(local).exists()
    s3_store.fetch = lambda *a: (_ for _ in ()).throw(StoreError("connection reset"))
    before = set(Path(tempfile.gettempdir()).glob("rlhf-model-*"))
    with pytest.raises(StoreError):
        resolve_source(uri, s3_store)
    assert set(Path(tempfile.gettempdir()).glob("rlhf-model-*")) == before  # a failed download leaves nothing
    s3_store.fetch = fetch
    with pytest.raises(StoreError, match="nothing to fetch under"):
        s3_store.fetch(s3_store.uri("no-such-model"), tmp_path / "none")


def test_fetch_verifies_a_manifest_when_present(s3_store, src_dir, tmp_path):
    s3_store.put_dir(src_dir, "art")
    out = s3_store.fetch(s3_store.uri("art"), tmp_path / "ok")
    assert (out / "weights.bin").read_bytes() == (src_dir / "weights.bin").read_bytes()
    s3_store.client.put_object(Bucket="rlhf", Key=_obj_key(s3_store, "art/config.json"), Body=b"{}")
    with pytest.raises(StoreError, match="checksum mismatch.*config.json"):
        s3_store.fetch(s3_store.uri("art"), tmp_path / "bad")


def test_local_store_reads_s3_uris(local_stack, s3_store, tmp_path):
    s3_store.write_bytes("data/sft.jsonl", b'{"prompt": "p", "completion": "c"}\n')
    s3_store.write_bytes("model/config.json", b"{}")
    local = LocalStore(tmp_path / "root", local_stack.settings())
    assert local.read_bytes(s3_store.uri("data/sft.jsonl")).startswith(b'{"prompt"')
    out = local.fetch(s3_store.uri("model"), tmp_path / "model")
    assert (out / "config.json").read_bytes() == b"{}"


# ----------------------------------------------------------------------------- failures


def test_wrong_credentials_fail_fast_naming_the_bucket(local_stack, s3_store):
    env = {**local_stack.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret-xyz", "RLHF_S3_MAX_ATTEMPTS": "8"}
    bad = S3Store(s3_store.uri(""), Settings.from_env(env))
    t0 = time.monotonic()
    with pytest.raises(StoreError) as ei:
        bad.read_bytes("anything")
    elapsed = time.monotonic() - t0
    msg = str(ei.value)
    assert "bucket 'rlhf'" in msg and "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in msg
    assert "SignatureDoesNotMatch" in msg
    assert "wrong-secret-xyz" not in msg
    # 8 throttling-style attempts would back off for several seconds; this is one request.
    assert elapsed < 2.0, elapsed
    env["AWS_ACCESS_KEY_ID"] = "nobody"
    with pytest.raises(StoreError, match="InvalidAccessKeyId"):
        S3Store(s3_store.uri(""), Settings.from_env(env)).list_dirs("")
    # HEAD answers carry no error body: the bare status still reads as refused access.
    with pytest.raises(StoreError, match=r"bucket 'rlhf' .* refused \(403\)"):
        S3Store(s3_store.uri(""), Settings.from_env(env)).is_committed("x")


def test_missing_bucket_is_named(local_stack):
    store = S3Store("s3://no-such-bucket-rlhf/p", local_stack.settings())
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-rlhf' does not exist"):
        store.is_committed("art")  # a HEAD 404 alone would look like "not committed"
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-rlhf' does not exist"):
        store.list_dirs("")
    # The stack runs weed with -s3.autoCreateBucket=false: a write does not conjure the bucket.
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-rlhf' does not exist"):
        store.write_bytes("x", b"1")


# ----------------------------------------------------------------------------- the stack itself


def test_second_stack_coexists_serves_mlflow_and_stops(local_stack, tmp_path, monkeypatch):
    """A second stack next to the session one (all ports distinct), through its whole life."""
    import mlflow

    stack = Stack(tmp_path / "stack2", ports="free", admin_password=os.environ["RLHF_STACK_ADMIN_PASSWORD"])
    try:
        st = stack.up()
        assert st["s3"]["healthy"] and st["mlflow"]["healthy"]
        assert st["s3"]["pid"] and st["mlflow"]["log"] == str(tmp_path / "stack2" / "logs" / "mlflow.log")
        assert local_stack.status()["s3"]["healthy"]  # the session stack is untouched
        mine = json.loads((stack.dir / "stack.json").read_text())["ports"]
        theirs = json.loads((local_stack.dir / "stack.json").read_text())["ports"]
        assert not set(mine.values()) & set(theirs.values())

        # A client with no S3 credentials logs a run; the server puts the artifact in SeaweedFS.
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                     "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(name, raising=False)
        client = mlflow.MlflowClient(tracking_uri=stack.env()["MLFLOW_TRACKING_URI"])
        run = client.create_run(client.create_experiment("stack-test"))
        client.log_param(run.info.run_id, "lr", "0.1")
        client.log_text(run.info.run_id, "hello from the stack test", "notes/hello.txt")
        client.set_terminated(run.info.run_id)
        bucket = S3Store("s3://mlflow/artifacts", stack.settings())
        keys = [k for k in _keys(bucket) if run.info.run_id in k]
        assert len(keys) == 1 and keys[0].endswith("notes/hello.txt"), keys
        assert bucket.read_bytes(keys[0]) == b"hello from the stack test"

        # The CLI hook: status as JSON; after `up` (a no-op when healthy) the export lines.
        parser = argparse.ArgumentParser()
        add_cli(parser.add_subparsers(dest="cmd"))
        out = io.StringIO()
        with redirect_stdout(out):
            assert handle_cli(parser.parse_args(["stack", "up", "--dir", str(stack.dir)]), Settings.from_env({})) == 0
        text = out.getvalue()
        assert json.loads(text[:text.index("# point")])["mlflow"]["healthy"]
        assert f"export MLFLOW_TRACKING_URI={stack.env()['MLFLOW_TRACKING_URI']}" in text
        assert "export AWS_SECRET_ACCESS_KEY=rlhf-local-secret" in text
        assert "export RLHF_ARTIFACT_ROOT=s3://rlhf/runs" in text
    finally:
        st = stack.down()
    assert not st["s3"]["running"] and not st["mlflow"]["running"]
    assert not st["s3"]["healthy"] and not st["mlflow"]["healthy"]
    assert not (stack.dir / "stack.json").exists()
    assert stack.down()["s3"]["running"] is False  # idempotent
    assert local_stack.status()["mlflow"]["healthy"]


def test_stack_refuses_a_busy_port(tmp_path, local_stack):
    busy = int(local_stack.env()["AWS_ENDPOINT_URL_S3"].rsplit(":", 1)[1])
    with pytest.raises(StackError, match=f"S3 port {busy} on 127.0.0.1 is already in use.*--s3-port"):
        Stack(tmp_path / "other", s3_port=busy).up()
    assert not (tmp_path / "other" / "stack.json").exists()


def test_conditional_writes_and_a_lease_on_s3(s3_store):
    """S3's compare-and-swap (If-None-Match / If-Match), as the dataset and champion leases use it."""
    from rlhf.adapters.lease import Lease

    assert s3_store.read_versioned("cas") is None
    first = s3_store.write_if("cas", b"1", None)
    assert first and s3_store.write_if("cas", b"2", None) is None
    data, etag = s3_store.read_versioned("cas")
    assert data == b"1" and etag == first  # the token a write returns is the one a read sees
    assert s3_store.write_if("cas", b"3", '"0000"') is None
    assert s3_store.write_if("cas", b"4", etag) == s3_store.read_versioned("cas")[1]
    assert s3_store.write_if("cas", b"5", etag) is None
    a, b = Lease(s3_store, "x.lease", "run-a"), Lease(s3_store, "x.lease", "run-b")
    assert a.try_acquire() and not b.try_acquire()
    a.release()
    assert b.try_acquire()
    b.release()
