"""Cluster profiles: validated from YAML, compiled into the pipeline with kfp.kubernetes.
The compiled spec must carry every placement setting on the right steps and never a
secret value."""

from __future__ import annotations

import re

from pathlib import Path

import pytest
import yaml

from rlhf.cli import main
from rlhf.config import ConfigError
from rlhf.ops.profiles import load_profile

ROOT = Path(__file__).resolve().parents[2]
TRAINING = {"sft": "exec-train-sft", "reward": "exec-train-reward", "ppo": "exec-train-ppo", "eval": "exec-evaluate"}


def compile_with(profile: Path, out: Path) -> tuple[dict, dict]:
    assert main(["compile", "--profile", str(profile), "--output", str(out)]) == 0
    spec, platform = list(yaml.safe_load_all(out.read_text()))
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def gke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gke") / "pipeline.yaml"
    return out, *compile_with(ROOT / "profiles" / "gke.yaml", out)


def test_gke_training_steps_get_gpus_nodes_tolerations_shm_and_secrets(gke):
    _, spec, k8s = gke
    prof = load_profile(ROOT / "profiles" / "gke.yaml")
    for stage, ex in TRAINING.items():
        want = prof.for_stage(stage)
        res = spec["deploymentSpec"]["executors"][ex]["container"]["resources"]
        assert res["accelerator"]["resourceType"] == "nvidia.com/gpu", stage
        assert int(res["accelerator"]["resourceCount"]) == want.accelerator_count, stage
        assert res["resourceMemoryRequest"] == want.memory_request, stage
        cfg = k8s[ex]
        assert cfg["nodeSelector"]["labels"] == want.node_selector, stage
        assert cfg["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        (shm,) = [m for m in cfg["emptyDirMounts"] if m["mountPath"] == "/dev/shm"]  # beside /tmp and HOME
        assert (shm["medium"], shm["sizeLimit"]) == ("Memory", want.shm_size)
        secrets = {s["secretName"]: {e["envVar"]: e["secretKey"] for e in s["keyToEnv"]} for s in cfg["secretAsEnv"]}
        assert secrets == {"rlhf-s3": {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                                       "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"},
                           "rlhf-mlflow": {"MLFLOW_TRACKING_URI": "tracking-uri"},
                           "rlhf-mlflow-auth": {"MLFLOW_TRACKING_USERNAME": "admin-username",
                                                "MLFLOW_TRACKING_PASSWORD": "admin-password"}}
        assert cfg["securityContext"]["runAsNonRoot"] is True
    # PPO on the H100 pool, SFT on A100s
    assert k8s["exec-train-ppo"]["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert k8s["exec-train-sft"]["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}
    # light steps: CPU pool, no GPU, but the same secrets
    start = spec["deploymentSpec"]["executors"]["exec-start-run"]["container"]
    assert "accelerator" not in start.get("resources", {})
    assert k8s["exec-start-run"]["nodeSelector"]["labels"] == {"cloud.google.com/gke-nodepool": "cpu-pool"}
    assert {s["secretName"] for s in k8s["exec-finish-run"]["secretAsEnv"]} == {"rlhf-s3", "rlhf-mlflow",
                                                                                 "rlhf-mlflow-auth"}


def test_profile_image_and_plain_env_on_every_step(gke):
    _, spec, _ = gke
    for ex in spec["deploymentSpec"]["executors"].values():
        c = ex["container"]
        assert c["image"] == "us-docker.pkg.dev/my-project/rlhf/rlhf:0.1.0"
        env = {e["name"]: e["value"] for e in c.get("env", [])}
        assert env["RLHF_ARTIFACT_ROOT"] == "s3://my-rlhf-bucket/runs"


def test_compiled_profile_loads_back_and_holds_no_secret_value(gke, monkeypatch):
    from kfp import components

    out, _, _ = gke
    assert components.load_component_from_file(str(out)).name == "rlhf-instructgpt"
    text = out.read_text()
    # Secrets are named by reference (secretAsEnv: a Secret's name, its keys, the variables
    # they become; a key may well be called admin-password): none of that is a value
    refs = re.compile(r"(secretKey|envVar): \S+")
    for word in ("AKIA", "password", "BEGIN PRIVATE KEY"):
        assert word.lower() not in refs.sub("", text).lower(), word


@pytest.mark.parametrize("name", ["eks", "generic"])
def test_other_example_profiles_compile(name, tmp_path):
    spec, k8s = compile_with(ROOT / "profiles" / f"{name}.yaml", tmp_path / "p.yaml")
    assert spec["deploymentSpec"]["executors"]["exec-train-ppo"]["container"]["resources"]["accelerator"]
    assert k8s["exec-train-ppo"]["tolerations"]


@pytest.mark.parametrize("body,words", [
    ("stages: {ppo: {acelerator_count: 8}}", "stages.ppo.acelerator_count: unknown field"),
    ("stages: {ppo: {memory_request: lots}}", "is not a Kubernetes quantity"),
    ("stages: {trainer: {}}", "stages.trainer"),
    ("env: {AWS_SECRET_ACCESS_KEY: abc}", "put them in a Kubernetes Secret"),
    ("env: {MLFLOW_TRACKING_URI: 'http://u:p@mlflow:5000'}", "put them in a Kubernetes Secret"),
    ("stages: {eval: {nodes: 2}}", "stages.eval.nodes: 2: only sft, reward, ppo can run on several nodes"),
    ("defaults: {nodes: 4}", "defaults: Value error, nodes: 4 would apply to every step"),
    ("stages: {ppo: {nodes: 2, trainer_runtime: mpi}}", "stages.ppo.trainer_runtime"),
])
def test_bad_profiles_fail_with_the_field(body, words, tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(body)
    with pytest.raises(ConfigError) as e:
        load_profile(f)
    assert str(f) in str(e.value) and words in str(e.value)
    assert main(["compile", "--profile", str(f), "--output", str(tmp_path / "x.yaml")]) == 2
    assert not (tmp_path / "x.yaml").exists()


def test_multi_node_is_for_training_stages_only(tmp_path):
    """`nodes > 1` makes the step launch a Kubeflow Trainer job (tests/pipeline/test_trainjob.py)."""
    from rlhf.pipelines import build_pipeline

    f = tmp_path / "p.yaml"
    f.write_text("stages: {ppo: {nodes: 2}}")
    build_pipeline(load_profile(f))
    f.write_text("stages: {eval: {nodes: 2}}")
    with pytest.raises(ConfigError, match="stages.eval.nodes: 2: only sft, reward, ppo can run on several nodes"):
        load_profile(f)
