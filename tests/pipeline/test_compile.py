"""`rlhf compile`: the spec loads back with the kfp SDK, documents its parameters,
carries no credential, and has the retry/caching/exit-handler shape of the DAG."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SECRET = "do-not-leak-7f3a9c"


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("compile") / "pipeline.yaml"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIA" + SECRET, "AWS_SECRET_ACCESS_KEY": SECRET,
           "MLFLOW_TRACKING_URI": f"http://user:{SECRET}@mlflow.example:5000",
           "MLFLOW_TRACKING_PASSWORD": SECRET, "RLHF_IMAGE": "registry.example/rlhf:test"}
    r = subprocess.run([sys.executable, "-m", "rlhf.cli", "compile", "--output", str(out)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    return out, next(yaml.safe_load_all(text)), text


def test_loads_back_with_kfp(spec):
    from kfp import components

    path, _, _ = spec
    comp = components.load_component_from_file(str(path))
    assert comp.name == "rlhf-instructgpt"
    inputs = comp.component_spec.inputs
    for name in ("preset", "config_json", "base_model", "sft_data", "preference_data", "ppo_updates", "kl_coef",
                 "min_decisive_win_rate", "experiment_name", "registered_model_name", "artifact_root"):
        assert name in inputs, name


def test_parameters_have_types_defaults_and_descriptions(spec):
    _, doc, _ = spec
    params = doc["root"]["inputDefinitions"]["parameters"]
    assert len(params) >= 15
    for name, p in params.items():
        assert p.get("description"), f"{name} has no description"
        assert "defaultValue" in p, f"{name} has no default"
    assert params["ppo_updates"]["parameterType"] == "NUMBER_INTEGER"
    assert params["kl_coef"]["parameterType"] == "NUMBER_DOUBLE"
    assert params["preset"]["defaultValue"] == "demo"
    assert "KL penalty" in params["kl_coef"]["description"]


def test_no_credentials_in_the_spec(spec):
    _, _, text = spec
    assert SECRET not in text
    for word in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD", "mlflow.example"):
        assert word not in text, word


def test_dag_shape(spec):
    _, doc, _ = spec
    executors = doc["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"registry.example/rlhf:test"}
    inner = doc["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert {"start-run", "prep-data", "train-sft", "train-reward", "train-ppo", "evaluate"} <= set(inner)
    for t in ("train-sft", "train-reward", "train-ppo", "evaluate"):
        assert inner[t]["retryPolicy"]["maxRetryCount"] == 2, t
        assert not inner[t].get("cachingOptions", {}).get("enableCache"), t
    assert inner["prep-data"]["cachingOptions"]["enableCache"] is True
    exit_task = doc["root"]["dag"]["tasks"]["finish-run"]  # restores @champion after a failure: retried
    assert exit_task["retryPolicy"]["maxRetryCount"] == 5 and exit_task["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert not inner["start-run"].get("cachingOptions", {}).get("enableCache")
    # the gate: promote under If(eval passed), register-only under Else
    conditions = {name: t["triggerPolicy"]["condition"] for comp in doc["components"].values()
                  for name, t in comp.get("dag", {}).get("tasks", {}).items() if "condition" in t.get("triggerPolicy", {})}
    assert sorted(conditions.values()) == sorted([
        "inputs.parameter_values['pipelinechannel--evaluate-Output'] == true",
        "!(inputs.parameter_values['pipelinechannel--evaluate-Output'] == true)"])
    promote_args = {c: doc["components"][f"comp-{c}"]["dag"]["tasks"] for c in conditions}
    moves = sorted(next(iter(t.values()))["inputs"]["parameters"]["move_alias"]["runtimeValue"]["constant"]
                   for t in promote_args.values())
    assert moves == [False, True]
    # the exit task runs whatever happened inside the handler
    root = doc["root"]["dag"]["tasks"]
    assert root["finish-run"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"


def _platform(text: str) -> dict:
    """executor name -> its kfp-kubernetes config (the spec's second YAML document)."""
    _, platform = yaml.safe_load_all(text)
    return platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_every_step_is_hardened_without_a_profile(spec):
    """What kfp-kubernetes can express of a hardened pod, on every step of a spec compiled
    with no profile at all: non-root user and group, emptyDirs at /tmp and HOME (the
    writable places of a read-only root filesystem) and the label that the chart's
    MutatingAdmissionPolicy selects to add the rest (capabilities, escalation, seccomp,
    read-only root), which the executor config has no field for."""
    _, doc, text = spec
    executors = _platform(text)
    assert set(executors) == set(doc["deploymentSpec"]["executors"])  # every step, the exit task too
    for name, cfg in executors.items():
        assert cfg["securityContext"] == {"runAsUser": "10001", "runAsGroup": "10001", "runAsNonRoot": True}, name
        mounts = {m["mountPath"]: m for m in cfg["emptyDirMounts"]}
        assert set(mounts) == {"/tmp", "/home/rlhf"}, name  # no /dev/shm without a profile asking for it
        assert all("medium" not in m and "sizeLimit" not in m for m in mounts.values()), name  # node disk, no cap
        # KFP's own scratch mounts (/gcs /s3 /minio /.local /.cache /.config) must not be doubled
        assert not {"/gcs", "/s3", "/minio", "/.local", "/.cache", "/.config"} & set(mounts), name
        assert cfg["podMetadata"]["labels"] == {"rlhf-pipeline/step": "true"}, name
    assert "capabilities" not in text and "readOnlyRootFilesystem" not in text  # the gap the chart's policy fills


def test_scratch_dirs_are_where_the_image_writes():
    """The emptyDirs cover HOME and every cache the image points into it (images/Dockerfile)."""
    from rlhf.ops.profiles import SCRATCH_DIRS

    dockerfile = (ROOT / "images" / "Dockerfile").read_text()
    env = dict(re.findall(r"^\s*(HOME|HF_HOME|RLHF_HOME)=(\S+)", dockerfile, re.M))
    assert env["HOME"] in SCRATCH_DIRS.values() and "/tmp" in SCRATCH_DIRS.values()
    for var in ("HF_HOME", "RLHF_HOME"):
        assert env[var].startswith(env["HOME"] + "/"), var
    assert "TMPDIR" not in dockerfile  # tempfile uses /tmp


def test_profile_keeps_the_hardening(tmp_path):
    """A profile's placement adds to the hardening, never replaces it (GPU steps keep
    their /dev/shm beside the scratch dirs)."""
    out = tmp_path / "gke.yaml"
    r = subprocess.run([sys.executable, "-m", "rlhf.cli", "compile", "--output", str(out),
                        "--profile", str(ROOT / "profiles" / "gke.yaml")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for name, cfg in _platform(out.read_text()).items():
        assert cfg["podMetadata"]["labels"] == {"rlhf-pipeline/step": "true"}, name
        assert cfg["securityContext"]["runAsNonRoot"] is True, name
        paths = [m["mountPath"] for m in cfg["emptyDirMounts"]]
        assert {"/tmp", "/home/rlhf"} <= set(paths) and len(paths) == len(set(paths)), name
    assert "/dev/shm" in [m["mountPath"] for m in _platform(out.read_text())["exec-train-ppo"]["emptyDirMounts"]]


def test_experiment_pipeline_compiles_with_nested_parallel_for(tmp_path):
    """`rlhf compile --pipeline experiment`: seeds, then each seed's arms, as ParallelFor
    loops inside an exit handler whose report step always runs; arms retried, never cached."""
    from kfp import components

    out = tmp_path / "experiment.yaml"
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": SECRET, "MLFLOW_TRACKING_URI": f"http://u:{SECRET}@mlflow.example"}
    r = subprocess.run([sys.executable, "-m", "rlhf.cli", "compile", "--pipeline", "experiment", "--output", str(out),
                        "--profile", str(Path(__file__).parents[2] / "profiles" / "gke.yaml")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert SECRET not in text and "mlflow.example" not in text
    comp = components.load_component_from_file(str(out))
    assert comp.name == "rlhf-experiment"
    assert {"kind", "preset", "quick", "seeds", "overrides", "config_json", "artifact_root", "run_name"} <= set(
        comp.component_spec.inputs)
    doc, platform = yaml.safe_load_all(text)
    loops = {name: t for c in doc["components"].values() for name, t in c.get("dag", {}).get("tasks", {}).items()
             if "parameterIterator" in t}
    assert len(loops) == 2
    seeds = next(t for t in loops.values() if t["parameterIterator"]["items"]["inputParameter"].endswith(
        "experiment-start-Output"))
    arms = next(t for t in loops.values() if t is not seeds)
    assert arms["parameterIterator"]["items"]["inputParameter"].endswith("experiment-bases-Output")
    arm_task = doc["components"][arms["componentRef"]["name"]]["dag"]["tasks"]["experiment-arm"]
    assert arm_task["retryPolicy"]["maxRetryCount"] == 2 and not arm_task.get("cachingOptions", {}).get("enableCache")
    assert doc["root"]["dag"]["tasks"]["experiment-report"]["triggerPolicy"]["strategy"] == \
        "ALL_UPSTREAM_TASKS_COMPLETED"
    # every step hardened, like the training DAG's
    for name, cfg in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items():
        assert cfg["podMetadata"]["labels"] == {"rlhf-pipeline/step": "true"}, name
        assert {"/tmp", "/home/rlhf"} <= {m["mountPath"] for m in cfg["emptyDirMounts"]}, name
    # the gke profile's GPU placement reaches the arms (an arm is a PPO run)
    arm_exec = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-experiment-arm"]
    assert arm_exec["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    resources = doc["deploymentSpec"]["executors"]["exec-experiment-arm"]["container"]["resources"]
    assert resources["accelerator"]["resourceCount"] == "8"


def test_experiment_pipeline_refuses_a_multi_node_profile(tmp_path):
    from rlhf.ops.profiles import load_profile
    from rlhf.pipelines.experiment import build_experiment_pipeline

    src = yaml.safe_load((Path(__file__).parents[2] / "profiles" / "gke.yaml").read_text())
    src.setdefault("stages", {}).setdefault("ppo", {})["nodes"] = 2
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(src))
    with pytest.raises(ValueError, match="ppo.*several nodes"):
        build_experiment_pipeline(load_profile(str(tmp_path / "p.yaml")))
