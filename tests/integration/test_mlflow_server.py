"""The MLflow server as the chart runs it: basic auth, and large artifacts that never pass
whole through the server's temporary disk.

`large`: a stack of its own whose MLflow server may write no file over 8 MiB
(RLIMIT_FSIZE: every file the server process writes, its temporary uploads and downloads
included), with a password generated for the stack, not the test session's. A model whose
weights file is over twice that is logged through `MLflowTracker.log_model`, read back
and compared. The same upload with direct transfers turned off fails on the server's
limit: the limit is real, and only the direct path gets past it.
"""

from __future__ import annotations

import json
import stat
import urllib.error
import urllib.request
from base64 import b64encode

import pytest
import torch

from rlhf.ops.stack import Stack

LIMIT = 8 * 2**20


def _status(url: str, user: str | None = None, password: str | None = None) -> int:
    req = urllib.request.Request(url)
    if user is not None:
        req.add_header("Authorization", "Basic " + b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_a_stack_generates_its_admin_password_once(tmp_path):
    stack = Stack(tmp_path / "s", ports="free")
    creds = stack.credentials()
    assert creds["username"] == "admin" and len(creds["password"]) >= 20
    path = tmp_path / "s" / "auth" / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Stack(tmp_path / "s", ports="free").credentials() == creds  # kept, not regenerated
    env = stack.env()
    assert env["MLFLOW_TRACKING_USERNAME"] == "admin" and env["MLFLOW_TRACKING_PASSWORD"] == creds["password"]
    assert env["MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD"] == "true"
    assert "MLFLOW_TRACKING_PASSWORD" not in Stack(tmp_path / "o", ports="free", auth=False).env()


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("large-stack"), ports="free", startup_timeout=180, max_file_bytes=LIMIT)
    stack.up()
    try:
        yield stack
    finally:
        stack.down()


def test_anonymous_and_wrong_credentials_are_refused(large):
    env, creds = large.env(), large.credentials()
    api = env["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
    assert _status(api) == 401
    assert _status(api, "admin", "not-the-password") == 401
    assert _status(api, "admin", creds["password"]) == 200
    assert _status(env["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow-artifacts/artifacts") == 401
    assert _status(env["MLFLOW_TRACKING_URI"] + "/health") == 200  # probes need no credentials


def _big_model(path):
    from rlhf.models.stand_in import build_stand_in

    build_stand_in(path, "llama", hidden_size=256, num_layers=4, intermediate_size=1024, vocab_size=1000)
    weights = path / "model.safetensors"
    assert weights.stat().st_size > 2 * LIMIT, weights.stat().st_size
    return path


def _client_env(monkeypatch, stack, **extra):
    for k, v in {**stack.env(), **extra}.items():
        monkeypatch.setenv(k, v)


def test_a_model_over_the_server_limit_is_logged_and_read_back(large, tmp_path, monkeypatch):
    from rlhf.adapters.tracking import MLflowTracker

    model_dir = _big_model(tmp_path / "big")
    # the test's limit is 8 MiB, so files from 4 MiB up take the direct path (the default is 64 MiB)
    _client_env(monkeypatch, large, MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE=str(4 * 2**20),
                MLFLOW_MULTIPART_DOWNLOAD_MINIMUM_FILE_SIZE=str(4 * 2**20),
                MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE=str(5 * 2**20))
    uri = large.env()["MLFLOW_TRACKING_URI"]

    tracker = MLflowTracker("large-models", uri)
    with monkeypatch.context() as m:  # first the counterfactual: everything through the server
        m.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "false")
        m.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the client would retry the 500 for minutes
        with tracker.stage_run("refused", {}), pytest.raises(Exception):
            tracker.log_model(model_dir, "policy")
    log = (large.logs / "mlflow.log").read_text(errors="replace")
    assert "File too large" in log or "Errno 27" in log, log[-2000:]

    with tracker.stage_run("sft", {}):
        model_uri = tracker.log_model(model_dir, "policy")
    log = (large.logs / "mlflow.log").read_text(errors="replace")
    assert "/mlflow-artifacts/mpu/complete/" in log  # parts went straight to S3
    parts = tracker.load_components(model_uri)
    assert "/mlflow-artifacts/presigned/" in (large.logs / "mlflow.log").read_text(errors="replace")
    from safetensors.torch import load_file

    saved = load_file(str(model_dir / "model.safetensors"))
    loaded = parts["model"].state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved), "weights changed on the way"
    assert json.loads((model_dir / "config.json").read_text())["hidden_size"] == parts["model"].config.hidden_size
