"""The whole DAG against the real local stack: SeaweedFS (S3) and an `mlflow server
--app-name basic-auth`, both started by the test session. What a cluster run does, on one
machine: every step authenticates with the stack's MLflow credentials (from the
environment, MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, as the chart's steps
get them from a Secret), and the server refuses anonymous requests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import boto3
import mlflow
import pytest

from rlhf.adapters.store import S3Store


PLANTED = {"KF_PIPELINES_TOKEN": "kfp-Planted-stack-93af"}
"""A secret in the run's environment beside the real ones (the MLflow password the server
checks, the S3 secret key): none may appear in its output, its MLflow params and tags, or
its artifacts (issue 14)."""


@pytest.fixture(scope="module")
def stack_run(local_stack, tmp_path_factory):
    home = tmp_path_factory.mktemp("stack-home")
    name = f"stack-{uuid.uuid4().hex[:6]}"
    output = f"s3://rlhf/runs/{name}"
    env = {**os.environ, **local_stack.env(), **PLANTED, "RLHF_HOME": str(home), "RLHF_RETRY_BACKOFF": "1s"}
    r = subprocess.run([sys.executable, "-m", "rlhf.cli", "run", "--preset", "tiny", "--set", "num_threads=1",
                        "--set", "gate.min_decisive_win_rate=0.0", "--set", f"tracking.registered_model={name}",
                        "--set", f"tracking.experiment={name}", "--output", output],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    store = S3Store(output, local_stack.settings())
    return {"name": name, "output": output, "store": store, "stdout": r.stdout, "stderr": r.stderr, "home": home,
            "summary": store.read_json("summary.json"), "tracking_uri": local_stack.env()["MLFLOW_TRACKING_URI"]}


def test_artifacts_in_s3_verified(stack_run, local_stack):
    store = stack_run["store"]
    for prefix in ("sft/model", "reward/model", "ppo/model"):
        assert store.is_committed(prefix), prefix
        local = store.get_dir(prefix)  # verifies every file's sha256 against the manifest
        assert (local / "model.safetensors").is_file()
    env = local_stack.env()
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_REGION"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="rlhf", Prefix=f"runs/{stack_run['name']}/")["Contents"]]
    assert any(k.endswith("ppo/checkpoints/step-00000002/policy.safetensors") for k in keys), keys[:20]
    assert any(k.endswith("summary.json") for k in keys)
    # the dataset lives content-addressed beside the runs, committed
    datasets = [k for k in s3.list_objects_v2(Bucket="rlhf", Prefix="runs/_datasets/")["Contents"]]
    assert any(o["Key"].endswith("prep/_COMMITTED") for o in datasets)
    assert f"artifacts in {stack_run['output']}" in stack_run["stdout"]


def test_nested_runs_registered_models_and_alias(stack_run):
    uri, name = stack_run["tracking_uri"], stack_run["name"]
    c = mlflow.MlflowClient(uri)
    exp = c.get_experiment_by_name(name)
    runs = c.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("rlhf.stage") == "pipeline")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["rlhf.stage"] for r in children) == ["eval", "ppo", "promote", "reward", "sft"]
    assert parent.info.status == "FINISHED"
    # run artifacts went through the server into SeaweedFS
    assert "plots/pipeline.png" in {a.path for a in c.list_artifacts(parent.info.run_id, "plots")}
    for kind in ("sft", "reward", "policy"):
        assert [v.version for v in c.search_model_versions(f"name = '{name}-{kind}'")] == ["1"], kind
    assert str(c.get_registered_model(f"{name}-policy").aliases["champion"]) == "1"
    s = stack_run["summary"]
    assert s["promoted"] is True and s["policy_model_uri"] == f"models:/{name}-policy@champion"


def test_the_run_authenticated_and_anonymous_requests_are_refused(stack_run, local_stack):
    import urllib.error
    import urllib.request

    uri, name = stack_run["tracking_uri"], stack_run["name"]
    for path in (f"/api/2.0/mlflow/registered-models/get?name={name}-policy",
                 f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}",
                 "/api/2.0/mlflow-artifacts/artifacts"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(uri + path, timeout=10)
        assert refused.value.code == 401, path
    # the steps got through only with the credentials (the run finished and promoted);
    # the same requests with them succeed
    c = mlflow.MlflowClient(uri)
    assert str(c.get_registered_model(f"{name}-policy").aliases["champion"]) == "1"
    assert c.get_experiment_by_name(name) is not None


def test_planted_secrets_appear_nowhere(stack_run, local_stack):
    """The S3 secret key, the MLflow password and a planted KFP token: not in the command's
    output, not in any MLflow param, tag or model-version tag, not in the run's text artifacts."""
    secrets = [local_stack.env()["MLFLOW_TRACKING_PASSWORD"], PLANTED["KF_PIPELINES_TOKEN"],
               local_stack.env()["AWS_SECRET_ACCESS_KEY"]]
    seen = [stack_run["stdout"], stack_run["stderr"]]
    c = mlflow.MlflowClient(stack_run["tracking_uri"])
    exp = c.get_experiment_by_name(stack_run["name"])
    for run in c.search_runs([exp.experiment_id]):
        seen += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
    for kind in ("sft", "reward", "policy"):
        for v in c.search_model_versions(f"name = '{stack_run['name']}-{kind}'"):
            seen += [f"{k}={val}" for k, val in v.tags.items()] + [v.source or "", v.description or ""]
    env = local_stack.env()
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_REGION"])
    texts = 0
    objects = s3.list_objects_v2(Bucket="rlhf", Prefix=f"runs/{stack_run['name']}/")["Contents"]
    assert any(o["Key"].endswith("/pipeline.log") for o in objects)  # every step's log, searched too
    for o in objects:
        if o["Key"].endswith((".json", ".yaml", ".md", ".txt", ".log", ".jsonl")) and o["Size"] < 5_000_000:
            seen.append(s3.get_object(Bucket="rlhf", Key=o["Key"])["Body"].read().decode(errors="replace"))
            texts += 1
    assert texts > 5 and len(seen) > 50  # the search saw the run's records
    leaks = [(s, t[:200]) for t in seen for s in secrets if s in t]
    assert not leaks, leaks


def test_model_pulled_and_generating(stack_run, local_stack, tmp_path):
    name = stack_run["name"]
    env = {**os.environ, **local_stack.env(), "RLHF_HOME": str(stack_run["home"])}
    r = subprocess.run([sys.executable, "-m", "rlhf.cli", "models", "pull", f"{name}-policy@champion",
                        "--to", str(tmp_path / "m")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", use_safetensors=True)
    ids = tok("reverse: a b c", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]
    # and plain MLflow, as a user would
    mlflow.set_tracking_uri(stack_run["tracking_uri"])
    gen = mlflow.transformers.load_model(f"models:/{name}-policy@champion")
    assert isinstance(gen("sort: 2 1", max_new_tokens=4, do_sample=False)[0]["generated_text"], str)
    summary = json.loads(json.dumps(stack_run["summary"]))
    assert summary["registered_versions"][f"{name}-policy"] == "1"
