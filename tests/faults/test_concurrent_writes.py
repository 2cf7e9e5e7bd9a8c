"""Two writers of one artifact prefix (two runs preparing the same data; issue 14 item 3):
both succeed, the prefix always ends committed and verifiable, a committed version is
never removed before the next one is committed, and a reader's view stays whole."""

from __future__ import annotations

import multiprocessing as mp
import os

from rlhf.adapters.store import LocalStore


def _writer(root: str, tag: str, rounds: int, barrier) -> None:
    store = LocalStore(root)
    src = os.path.join(root, f"../src-{tag}")
    os.makedirs(src, exist_ok=True)
    for i in range(rounds):
        with open(os.path.join(src, "train.jsonl"), "wb") as f:
            f.write(f"{tag}-{i}\n".encode() * 20000)
        with open(os.path.join(src, "report.json"), "w") as f:
            f.write(f'{{"writer": "{tag}", "round": {i}}}')
        barrier.wait()
        store.put_dir(src, "_datasets/abc/prep")


def _reader(root: str, stop, seen) -> None:
    """Reads the artifact while it is being replaced: each view must stay one whole
    version (its report and data from the same write) after newer ones are committed."""
    views = []
    while not stop.is_set():
        store = LocalStore(root)  # a fresh store object: no cached view
        try:
            views.append(store.get_dir("_datasets/abc/prep"))
        except Exception as e:  # noqa: BLE001 - nothing committed yet is the only allowed failure
            assert "commit marker missing" in str(e), e
    for view in views:
        writer = view.joinpath("report.json").read_text()
        tag, i = writer.split('"')[3], writer.split(": ")[-1].rstrip("}")
        assert view.joinpath("train.jsonl").read_bytes() == f"{tag}-{i}\n".encode() * 20000, view
    seen.value = len(views)


def test_two_writers_of_one_prefix_both_commit_whole_versions(tmp_path):
    root = tmp_path / "store"
    store = LocalStore(root)
    ctx = mp.get_context("fork")
    barrier, stop, seen = ctx.Barrier(2), ctx.Event(), ctx.Value("i", 0)
    reader = ctx.Process(target=_reader, args=(str(root), stop, seen))
    procs = [ctx.Process(target=_writer, args=(str(root), tag, 5, barrier)) for tag in ("a", "b")]
    for p in [reader, *procs]:
        p.start()
    for p in procs:
        p.join(120)
    stop.set()
    reader.join(120)
    assert [p.exitcode for p in procs] == [0, 0]  # no "Directory not empty", no FileNotFoundError
    assert reader.exitcode == 0 and seen.value > 0  # every view the reader got stayed whole
    out = store.get_dir("_datasets/abc/prep")  # committed and every file matches the manifest
    writer = (out / "report.json").read_text()
    tag = "a" if '"a"' in writer else "b"
    assert (out / "train.jsonl").read_bytes().startswith(tag.encode())  # one writer's whole version
    left = [p.name for p in (root / "_datasets" / "abc").iterdir() if ".view-" not in p.name]
    assert left == ["prep"]  # no staging or old copy left (this process's view goes at exit)


def test_replacing_keeps_the_old_version_committed_until_the_new_one_is(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "store")
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"old")
    store.put_dir(src, "model")
    (src / "w.bin").write_bytes(b"new")
    seen = []
    swap = LocalStore._swap_in

    def watching(self, staging, dest):  # the moment the new version is complete, before it takes the prefix
        seen.append((store.is_committed("model"), (dest / "w.bin").read_bytes()))
        return swap(self, staging, dest)

    monkeypatch.setattr(LocalStore, "_swap_in", watching)
    store.put_dir(src, "model")
    assert seen == [(True, b"old")]
    assert (store.get_dir("model") / "w.bin").read_bytes() == b"new"


def test_two_runs_opening_a_fresh_embedded_database_at_once(tmp_path):
    """Two `rlhf run` started together in a fresh RLHF_HOME both create the embedded MLflow
    database; unguarded, one failed its schema migration (`duplicate column name: step`,
    5 of 5 trials here). Two trials of two processes at once."""
    import subprocess
    import sys

    code = ("import sys; from rlhf.adapters.tracking import _client; c = _client(sys.argv[1]); "
            "c.search_experiments(); c.search_registered_models()")
    for trial in range(2):
        uri = f"sqlite:///{tmp_path / str(trial) / 'mlflow.db'}"
        procs = [subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
