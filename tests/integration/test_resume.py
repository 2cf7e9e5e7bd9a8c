"""A training stage killed with SIGKILL resumes from its newest complete checkpoint and
ends with weights bitwise equal to an uninterrupted run (CPU).

The kill is real (the process sends itself SIGKILL via RLHF_FAULT_KILL_AT_STEP, so no
cleanup runs), placed between two checkpoints so the restart must redo steps.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TINY = ["--preset", "tiny", "--set", "num_threads=1",
        "--set", "sft.max_epochs=2", "--set", "sft.patience=100", "--set", "sft.checkpoint_every=5",
        "--set", "reward.epochs=2", "--set", "reward.checkpoint_every=5",
        "--set", "ppo.updates=6", "--set", "ppo.checkpoint_every=2",
        "--set", "tracking.log_models=false"]
LORA = ["--set", "model.lora.enabled=true", "--set", "model.lora.r=4"]
KILL_AT = {"sft": 13, "reward": 12, "ppo": 3}
PREVIOUS = {"sft": ["prep"], "reward": ["prep", "sft"], "ppo": ["prep", "sft", "reward"]}


def rlhf(*args, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "RLHF_QUIET": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """prep, sft, reward once per variant (full weights, LoRA); each test copies what its stage needs."""
    made: dict[bool, Path] = {}

    def get(lora: bool) -> Path:
        if lora not in made:
            root = tmp_path_factory.mktemp("base-lora" if lora else "base")
            for stage in ("prep", "sft", "reward"):
                r = rlhf("stage", stage, *TINY, *(LORA if lora else []), "--output", str(root))
                assert r.returncode == 0, r.stderr[-3000:]
            made[lora] = root
        return made[lora]

    return get


@pytest.fixture(scope="module")
def base(bases) -> Path:
    return bases(False)


def _copy_inputs(base: Path, dest: Path, stage: str) -> None:
    dest.mkdir(parents=True)
    for prev in PREVIOUS[stage]:
        shutil.copytree(base / prev, dest / prev, ignore=shutil.ignore_patterns("checkpoints", "mlflow_run_id"))


def _weights(out: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / stage / "model" / "model.safetensors"))


# LoRA resume (three stages, 2.4 min on 2 cores) runs with -m slow; the full-weight
# resume of each stage stays in the default run.
@pytest.mark.parametrize("lora", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["full", "lora"])
@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_kill9_then_resume_is_bitwise_equal(bases, tmp_path, stage, lora):
    """Also with LoRA adapters (and, in PPO, the reference as the policy without them)."""
    base, args = bases(lora), [*TINY, *(LORA if lora else [])]
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    _copy_inputs(base, clean, stage)
    _copy_inputs(base, crashed, stage)

    r = rlhf("stage", stage, *args, "--output", str(clean))
    assert r.returncode == 0, r.stderr[-3000:]

    r = rlhf("stage", stage, *args, "--output", str(crashed), env_extra={"RLHF_FAULT_KILL_AT_STEP": str(KILL_AT[stage])})
    assert r.returncode == -signal.SIGKILL, f"expected SIGKILL, got {r.returncode}: {r.stderr[-2000:]}"
    ckpts = sorted(p.name for p in (crashed / stage / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())
    assert ckpts, "no complete checkpoint before the kill"
    assert not (crashed / stage / "model" / "_COMMITTED").exists(), "a killed stage must not leave a committed model"

    r = rlhf("stage", stage, *args, "--output", str(crashed))
    assert r.returncode == 0, r.stderr[-3000:]

    a, b = _weights(clean, stage), _weights(crashed, stage)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{stage}: weight {k} differs after resume"
    # and training did change the weights relative to the stage's input
    start = _weights(base, "sft") if stage in ("reward", "ppo") else None
    if stage == "ppo":
        assert any(not torch.equal(a[k], start[k]) for k in a), "PPO did not change the policy"


def test_resume_with_a_different_config_is_refused(base, tmp_path):
    out = tmp_path / "run"
    _copy_inputs(base, out, "sft")
    r = rlhf("stage", "sft", *TINY, "--output", str(out), env_extra={"RLHF_FAULT_KILL_AT_STEP": "7"})
    assert r.returncode == -signal.SIGKILL
    r = rlhf("stage", "sft", *TINY, "--set", "sft.lr=0.01", "--output", str(out))
    assert r.returncode == 2
    assert "different configuration" in r.stderr and "checkpoints" in r.stderr
    assert not (out / "sft" / "model" / "_COMMITTED").exists()
