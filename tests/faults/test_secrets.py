"""Secrets never printed (issue 14, acceptance 8): a password planted in a tracking URI and
in a data URL, S3 keys and a Kubeflow Pipelines token in the environment appear in no
output of these commands, no error file and no compiled YAML. (The whole DAG against the
real stack, with the same secrets planted, is checked in tests/pipeline/test_stack_run.py:
its output, every MLflow param and tag, and the run's artifacts.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

PW = "pw-Planted-7f3a9c"
S3_SECRET = "s3-Planted-secret-41d2"
KFP_TOKEN = "kfp-Planted-token-8e5b"
MLFLOW_TOKEN = "mlflow-Planted-token-2c7a"
PLANTED = (PW, S3_SECRET, KFP_TOKEN, MLFLOW_TOKEN)


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "RLHF_HOME": str(tmp_path / "home"), "AWS_ACCESS_KEY_ID": "AKIAPLANTED",
            "AWS_SECRET_ACCESS_KEY": S3_SECRET, "KF_PIPELINES_TOKEN": KFP_TOKEN, "MLFLOW_TRACKING_TOKEN": MLFLOW_TOKEN,
            "RLHF_RETRY_BACKOFF": "1s"}


def rlhf(env, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_clean(*texts: str) -> None:
    for text in texts:
        leaked = [s for s in PLANTED if s in text]
        assert not leaked, f"{leaked} printed in:\n{text[-3000:]}"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_password_in_the_tracking_uri_is_refused_without_echo(env):
    r = rlhf(env, "config", "show", "--set", f"tracking.tracking_uri=https://alice:{PW}@mlflow.example.com")
    assert r.returncode == 2 and "tracking.tracking_uri" in r.stderr and "MLFLOW_TRACKING_PASSWORD" in r.stderr
    assert_clean(r.stdout, r.stderr)


def test_the_compiled_pipeline_carries_no_secret(env, tmp_path):
    out = tmp_path / "pipeline.yaml"
    r = rlhf(env, "compile", "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert_clean(r.stdout, r.stderr, out.read_text())


def test_a_token_over_plain_http_to_another_host_is_refused(env):
    r = rlhf(env, "submit", "--host", "http://kfp.example.com")
    assert r.returncode == 2 and "plain http" in r.stderr and "--insecure" in r.stderr
    assert_clean(r.stdout, r.stderr)
    r = rlhf(env, "models", "list", "--tracking-uri", "http://mlflow.example.com")  # MLFLOW_TRACKING_TOKEN is set
    assert r.returncode == 2 and "plain http" in r.stderr
    assert_clean(r.stdout, r.stderr)


def test_insecure_lets_the_request_go_and_still_prints_no_token(env):
    host = f"http://127.0.0.1:{closed_port()}"
    r = rlhf(env, "--insecure", "runs", "--host", host)
    assert r.returncode == 2 and "cannot reach Kubeflow Pipelines" in r.stderr
    assert_clean(r.stdout, r.stderr)


def test_a_failing_step_s_error_carries_no_password(env, tmp_path):
    """Credentials in a data URL: the step fails, and neither the command's output, the
    kfp.local log nor the run's error record shows them."""
    run = tmp_path / "run"
    r = rlhf(env, "run", "--preset", "tiny", "--output", str(run),
             "--set", f"data.sft_path=https://alice:{PW}@data.example.com/sft.jsonl",
             "--set", f"data.preference_path=https://alice:{PW}@data.example.com/prefs.jsonl")
    assert r.returncode == 1 and "step 'start' failed" in r.stderr and "data.example.com" in r.stderr
    assert_clean(r.stdout, r.stderr)
    assert "start-run" in (run / "pipeline.log").read_text()  # the steps' log is among what is searched
    for path in run.rglob("*"):  # whatever the run left (its error record, logs, summaries)
        if path.is_file() and path.stat().st_size < 10_000_000:
            assert_clean(path.read_text(errors="replace"))


def test_a_tracking_server_that_never_answers_is_an_error_within_seconds(env):
    """A server that accepts connections and never replies: `rlhf models list` says so and
    exits, instead of the MLflow client's minutes of silent retries."""
    import threading
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(8)], daemon=True).start()
    t0 = time.monotonic()
    r = rlhf(env, "models", "list", "--tracking-uri", f"http://127.0.0.1:{server.getsockname()[1]}")
    assert r.returncode == 2 and "did not answer within 10 s" in r.stderr
    assert time.monotonic() - t0 < 60
    server.close()
