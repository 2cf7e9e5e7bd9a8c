"""Graceful preemption (issue 14, acceptance 1): SIGTERM mid-PPO under `rlhf run`.

The PPO step gets a real SIGTERM as update 2 ends (RLHF_FAULT_TERM_AT_STEP, the signal a
preempted node's kubelet sends). Step checkpoints come only every 100 updates, so the
checkpoint the retry finds is the one the signal made. kfp.local retries the step (as
KFP does); it resumes at update 2, none lost, and the policy is bitwise the one an
uninterrupted PPO stage trains from the same inputs (CPU, one thread)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file

SETS = ["num_threads=1", "ppo.updates=4", "ppo.checkpoint_every=100"]


def rlhf(home, *args, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "RLHF_HOME": str(home), "RLHF_QUIET": "1", "RLHF_RETRY_BACKOFF": "1s", **(env_extra or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], env=env, capture_output=True, text=True,
                          timeout=900)


def test_sigterm_mid_ppo_checkpoints_retries_and_resumes_without_loss(tmp_path):
    sets = [x for s in SETS for x in ("--set", s)]
    run = tmp_path / "run"
    r = rlhf(tmp_path / "home", "run", "--preset", "tiny", *sets, "--output", str(run),
             env_extra={"RLHF_FAULT_TERM_AT_STEP": "ppo:2"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = (run / "pipeline.log").read_text()  # every step's log (rlhf run prints a line per step)
    assert "ppo: SIGTERM: stopped after step 2 of 4 and checkpointed it; exiting with 143" in log
    ppo = json.loads((run / "ppo" / "result.json").read_text())
    assert ppo["resumed_from"] == 2 and ppo["updates"] == 4  # the retry lost no update

    # the same PPO, never interrupted, from the run's own inputs
    ref = tmp_path / "ref"
    shutil.copytree(next((tmp_path / "_datasets").glob("*/prep")), ref / "prep")
    for stage in ("sft", "reward"):
        shutil.copytree(run / stage, ref / stage, ignore=shutil.ignore_patterns("checkpoints", "mlflow_run_id"))
    r = rlhf(tmp_path / "home2", "stage", "ppo", "--preset", "tiny", *sets, "--output", str(ref))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(str(run / "ppo" / "model" / "model.safetensors")), load_file(str(ref / "ppo" / "model" /
                                                                                        "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sft = load_file(str(run / "sft" / "model" / "model.safetensors"))
    assert any(not torch.equal(a[k], sft[k]) for k in a)  # PPO did move the policy
