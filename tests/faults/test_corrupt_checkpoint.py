"""The newest checkpoint corrupted (issue 14, acceptance 6): resume falls back to the
previous complete one with a warning naming the bad one, never silently, and the stage
still ends bitwise equal to an uninterrupted run.

The corruption is what a power loss or a damaged object leaves: the commit marker is
there, a file's bytes are not what the manifest says."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rlhf.adapters.store import StoreError
from rlhf.train.checkpoint import resume_checkpoint, save_checkpoint

TINY = ["--preset", "tiny", "--set", "num_threads=1", "--set", "sft.max_epochs=1", "--set", "sft.patience=100",
        "--set", "sft.checkpoint_every=4", "--set", "tracking.log_models=false"]


def rlhf(*args, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "RLHF_QUIET": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def _flip(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_sft_resumes_from_the_previous_checkpoint_when_the_newest_is_corrupt(tmp_path):
    base = tmp_path / "base"
    r = rlhf("stage", "prep", *TINY, "--output", str(base))
    assert r.returncode == 0, r.stderr[-3000:]
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    for out in (clean, crashed):
        shutil.copytree(base / "prep", out / "prep")
    assert rlhf("stage", "sft", *TINY, "--output", str(clean)).returncode == 0

    r = rlhf("stage", "sft", *TINY, "--output", str(crashed), env_extra={"RLHF_FAULT_KILL_AT_STEP": "9"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    ckpts = sorted(p for p in (crashed / "sft" / "checkpoints").glob("step-*") if (p / "_COMMITTED").exists())
    assert [p.name for p in ckpts] == ["step-00000004", "step-00000008"]
    _flip(ckpts[-1] / "model.safetensors")  # marker kept, bytes changed

    r = rlhf("stage", "sft", *TINY, "--output", str(crashed))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint" in r.stderr and "step-00000008 is unusable" in r.stderr and "checksum mismatch" in r.stderr
    assert "resuming from" in r.stderr and "step-00000004" in r.stderr
    a = load_file(str(clean / "sft" / "model" / "model.safetensors"))
    b = load_file(str(crashed / "sft" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fallback_through_the_s3_store(s3_store, capsys):
    """The same on S3 (the real SeaweedFS): a changed object under a committed checkpoint is
    caught by the manifest before anything is loaded, and the previous one is used."""
    for step in (2, 4):
        save_checkpoint(s3_store, "ppo", step, {"m": {"w": torch.full((3,), float(step))}}, {"step": step}, "fp")
    bucket, _, prefix = s3_store.uri("ppo/checkpoints/step-00000004").removeprefix("s3://").partition("/")
    key = next(o["Key"] for o in s3_store.client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
               if o["Key"].endswith("m.safetensors"))
    s3_store.client.put_object(Bucket=bucket, Key=key, Body=b"not the tensors the manifest vouches for")
    target = {"w": torch.zeros(3)}
    state = resume_checkpoint(s3_store, "ppo", {"m": target}, "fp")
    assert state["resumed_from"] == 2 and torch.equal(target["w"], torch.full((3,), 2.0))
    err = capsys.readouterr().err
    assert "step-00000004 is unusable" in err and "resuming from" in err and "step-00000002" in err


def test_no_usable_checkpoint_is_a_clear_error(tmp_path):
    from rlhf.adapters.store import LocalStore

    store = LocalStore(tmp_path)
    for step in (2, 4):
        save_checkpoint(store, "reward", step, {"m": {"w": torch.ones(2)}}, {"step": step}, "fp")
    for p in (tmp_path / "reward" / "checkpoints").glob("step-*/m.safetensors"):
        _flip(p)
    with pytest.raises(StoreError, match=r"no usable checkpoint.*step-00000004.*step-00000002.*delete"):
        resume_checkpoint(store, "reward", {"m": {"w": torch.zeros(2)}}, "fp")
