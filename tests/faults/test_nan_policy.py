"""A diverged policy (issue 14, acceptance 9): PPO's committed model holds NaN weights, as
a run that diverged on its last update leaves it. Eval does not crash trying to sample
it; its KL is NaN and the gate refuses it with the reason; promote registers the version
with the gate's reasons and moves no alias."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import mlflow
from safetensors.torch import load_file, save_file

SETS = ["num_threads=1", "ppo.updates=1", "tracking.log_models=true", "tracking.registered_model=nan-policy"]
TINY = ["--preset", "tiny", *(x for s in SETS for x in ("--set", s))]


def rlhf(*args, home) -> subprocess.CompletedProcess:
    env = {**os.environ, "RLHF_QUIET": "1", "RLHF_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def poison(model_dir) -> None:
    """NaN into one weight tensor, the manifest updated to match (a committed artifact)."""
    path = model_dir / "model.safetensors"
    weights = load_file(str(path))
    name = sorted(weights)[len(weights) // 2]
    weights[name][:] = float("nan")
    save_file(weights, str(path), metadata={"format": "pt"})
    manifest = json.loads((model_dir / "MANIFEST.json").read_text())
    manifest["model.safetensors"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (model_dir / "MANIFEST.json").write_text(json.dumps(manifest))


def test_a_nan_policy_is_refused_by_the_gate_with_the_reason(tmp_path):
    from rlhf import runs
    from rlhf.config import load_config

    home, out = tmp_path, tmp_path / "run"  # RLHF_HOME of this test process too (conftest)
    r = rlhf("stage", "all", *TINY, "--output", str(out), home=home)  # prep .. eval, one process
    assert r.returncode == 0, r.stderr[-3000:]
    poison(out / "ppo" / "model")

    config = load_config("tiny", overrides=SETS).model_dump_json()
    runs.stage("eval", config, str(out), "", str(out))  # the pipeline's eval step: refuses, does not crash
    summary = json.loads((out / "eval" / "result.json").read_text())
    assert summary["gate/passed"] is False and summary["eval/kl_vs_sft"] != summary["eval/kl_vs_sft"]  # NaN
    reasons = " ".join(summary["gate/reasons"])
    assert "the policy diverged" in reasons and "NaN or infinite" in reasons and "KL vs SFT nan" in reasons

    result = runs.stage("promote", config, str(out), "", str(out), promote=True)  # asked to move the alias
    assert result["promoted"] is False and any("the policy diverged" in x for x in result["gate_reasons"])
    client = mlflow.MlflowClient(f"sqlite:///{home}/mlflow.db")
    versions = client.search_model_versions("name = 'nan-policy-policy'")
    assert [v.tags.get("rlhf.gate") for v in versions] == ["failed"]
    assert "the policy diverged" in versions[0].tags["rlhf.gate_reasons"]
    assert "champion" not in client.get_registered_model("nan-policy-policy").aliases
