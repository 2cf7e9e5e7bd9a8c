"""The one redaction (`rlhf.redaction`): what it masks, what it leaves readable, the
transport check, and the sinks that use it (config errors, a step's error file, the
step's own exception, the process's streams)."""

from __future__ import annotations

import io
import json
import sys

import pytest

from rlhf.adapters.settings import Settings
from rlhf.config import ConfigError, load_config
from rlhf.redaction import (MASK, InsecureTransport, _Redacting, check_transport, display_uri, guard_streams,
                            is_local_host, redact, register)

PW = "pw-Planted-7f3a9"


@pytest.mark.parametrize("text,secret", [
    (f"https://alice:{PW}@mlflow.example.com/x", PW),
    (f"--set tracking.tracking_uri=https://alice:{PW}@host", PW),
    (f"(got 'https://alice:{PW}@host')", PW),
    ("https://tok3n-abc@host/path", "tok3n-abc"),
    ("Authorization: Bearer eyJhbGciOi.abc.def", "eyJhbGciOi"),
    ("headers {'Authorization': 'Basic YWxpY2U6cHc='}", "YWxpY2U6cHc="),
    ("curl -H 'Bearer eyJhbGciOiJSUzI1NiJ9'", "eyJhbGciOiJSUzI1NiJ9"),
    ("https://s3/b/k?X-Amz-Signature=abcdef0123&X-Amz-Credential=AKIAX%2F2026", "abcdef0123"),
    ("https://s3/b/k?X-Amz-Signature=abcdef0123&X-Amz-Credential=AKIAX%2F2026", "AKIAX"),
    ("https://s3/b/k?X-Amz-Security-Token=FwoGZXIvY", "FwoGZXIvY"),
    ("MLFLOW_TRACKING_PASSWORD=hunter22", "hunter22"),
    ("MLFLOW_TRACKING_TOKEN: dapi123456", "dapi123456"),
    ("aws_secret_access_key = wJalrXUtnFEMI", "wJalrXUtnFEMI"),
    ('{"token": "abc123456", "n": 1}', "abc123456"),
    ("https://api/x?api_key=k-98765&page=2", "k-98765"),
])
def test_secrets_are_masked(text, secret):
    out = redact(text)
    assert secret not in out and MASK in out


@pytest.mark.parametrize("text", [
    "ppo.max_new_tokens: 24", "eos_token: </s>", "pad_token_id=0", "the token file /x is empty",
    "Basic auth has never been seen working", "s3://bucket/key/tokenizer.json", "file:///tmp/x",
    "sqlite:////tmp/mlflow.db", "git@github.com:org/repo", "reward.batch_size: Input should be greater than 0",
    "https://mlflow.example.com:5000/#/experiments/1",
])
def test_ordinary_text_stays_readable(text):
    assert redact(text) == text


def test_registered_values_are_masked_anywhere():
    register("Planted-S3-Secret-0042", None, "")
    assert redact("SignatureDoesNotMatch for key Planted-S3-Secret-0042.") == f"SignatureDoesNotMatch for key {MASK}."
    register("abc")  # too short to mask safely: ordinary text keeps its "abc"
    assert redact("abc def") == "abc def"


def test_settings_register_the_environment_s_secrets():
    Settings.from_env({"AWS_SECRET_ACCESS_KEY": "env-s3-secret-991", "KF_PIPELINES_TOKEN": "env-kfp-token-992",
                       "MLFLOW_TRACKING_TOKEN": "env-mlflow-token-993", "MLFLOW_TRACKING_PASSWORD": "env-pw-994",
                       "AWS_SESSION_TOKEN": "env-session-995"})
    text = redact("env-s3-secret-991 env-kfp-token-992 env-mlflow-token-993 env-pw-994 env-session-995")
    assert text == " ".join([MASK] * 5)


def test_display_uri_drops_the_user_info():
    assert display_uri(f"https://bob:{PW}@mlflow.example/#/x") == "https://mlflow.example/#/x"
    assert display_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


@pytest.mark.parametrize("host,local", [
    ("127.0.0.1", True), ("localhost", True), ("::1", True), ("mlflow", True),
    ("mlflow.rlhf.svc.cluster.local", True), ("ml-pipeline.kubeflow.svc", True), ("kfp.example.com", False),
    ("10.0.0.7", False), ("mlflow.rlhf", False),
])
def test_local_hosts(host, local):
    assert is_local_host(host) is local


def test_plain_http_credentials_to_another_host_are_refused():
    with pytest.raises(InsecureTransport, match="https.*--insecure") as e:
        check_transport(f"http://alice:{PW}@kfp.example.com", True, False, "MLflow tracking URI")
    assert PW not in str(e.value)
    check_transport("http://kfp.example.com", True, True, "x")  # opted in
    check_transport("https://kfp.example.com", True, False, "x")
    check_transport("http://kfp.example.com", False, False, "x")  # nothing secret to send
    check_transport("http://ml-pipeline.kubeflow.svc.cluster.local:8888", True, False, "x")


def test_settings_check_the_tracking_transport():
    s = Settings.from_env({"MLFLOW_TRACKING_TOKEN": "tok-123456"})
    with pytest.raises(InsecureTransport):
        s.check_tracking_transport("http://mlflow.example.com")
    assert s.check_tracking_transport("https://mlflow.example.com") == "https://mlflow.example.com"
    plain = Settings.from_env({})
    with pytest.raises(InsecureTransport):  # credentials in the URI itself
        plain.check_tracking_transport(f"http://alice:{PW}@mlflow.example.com")
    assert Settings.from_env({"MLFLOW_TRACKING_TOKEN": "tok-123456", "RLHF_INSECURE": "1"}).check_tracking_transport(
        "http://mlflow.example.com")


def test_config_error_never_repeats_a_password():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=[f"tracking.tracking_uri=https://alice:{PW}@host"])
    assert "tracking.tracking_uri" in str(e.value) and PW not in str(e.value)


def test_guarded_streams_mask_every_write(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)
    guard_streams()
    guard_streams()  # idempotent: one wrapper
    assert isinstance(sys.stderr, _Redacting) and not isinstance(sys.stderr._stream, _Redacting)
    print(f"connecting to https://alice:{PW}@host", file=sys.stderr)
    sys.stderr.writelines(["Authorization: Bearer abcdefgh123\n"])
    assert PW not in buf.getvalue() and "abcdefgh123" not in buf.getvalue() and "connecting to" in buf.getvalue()


def test_a_failing_step_leaves_its_error_without_the_secret(tmp_path, monkeypatch):
    from rlhf.runs import step_entry

    err = tmp_path / "error.json"
    monkeypatch.setenv("RLHF_ERROR_FILE", str(err))

    @step_entry("prep")
    def failing(settings):
        raise OSError(f"cannot open https://alice:{PW}@data.example.com/sft.jsonl")

    with pytest.raises(Exception) as e:
        failing()
    assert PW not in str(e.value) and "cannot open" in str(e.value)  # what KFP logs and shows
    record = json.loads(err.read_text())
    assert record["type"] == "OSError" and PW not in record["message"] and "data.example.com" in record["message"]
