"""S3Store error paths against an in-process fake S3 endpoint (no SeaweedFS needed).

The fake answers each request from a script (503 SlowDown, 429, a dropped
connection, 403, ...), so we can check what botocore's standard retry mode does with
our config: throttling and dropped connections are retried, access errors are not,
and every failure reaches the caller as a StoreError that names the bucket and the fix.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rlhf.adapters.settings import Settings
from rlhf.adapters.store import S3Store, StoreError

SECRET = "fake-secret-never-printed"


def _error_xml(code: str, message: str = "scripted") -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>{message}</Message><BucketName>b</BucketName></Error>").encode()


class FakeS3:
    """A scripted HTTP server: each request pops the next action; 'ok' when the script is empty."""

    def __init__(self):
        self.script: list[tuple] = []
        self.requests: list[tuple[str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                fake.requests.append((self.command, self.path))
                action = fake.script.pop(0) if fake.script else ("ok", b"")
                if action[0] == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                status, body = (200, action[1]) if action[0] == "ok" else (action[1], _error_xml(action[0]))
                self.send_response(status)
                if self.command == "PUT" and status == 200:
                    self.send_header("ETag", '"d41d8cd98f00b204e9800998ecf8427e"')
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "application/xml")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    f = FakeS3()
    yield f
    f.close()


@pytest.fixture
def no_backoff(monkeypatch):
    """Record botocore's backoff delays but do not sleep them (keeps the suite fast)."""
    from botocore.retries import standard

    delays: list[float] = []
    original = standard.ExponentialBackoff.delay_amount

    def record(self, context):
        delays.append(original(self, context))
        return 0.0

    monkeypatch.setattr(standard.ExponentialBackoff, "delay_amount", record)
    return delays


def _store(url: str, attempts: int = 5, outage_s: float = 0, **kw) -> S3Store:
    """outage_s 0: botocore's retries only (RLHF_S3_OUTAGE_TOLERANCE_S is tested on its own below)."""
    settings = Settings.from_env({
        "AWS_ENDPOINT_URL_S3": url, "AWS_ACCESS_KEY_ID": "fake-key", "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1", "RLHF_S3_MAX_ATTEMPTS": str(attempts), "RLHF_S3_OUTAGE_TOLERANCE_S": str(outage_s)})
    return S3Store("s3://b/root", settings, **kw)


# ----------------------------------------------------------------------------- retried


@pytest.mark.parametrize("failure", [("SlowDown", 503), ("TooManyRequests", 429), ("RequestTimeout", 400),
                                     ("drop",)], ids=["503-slowdown", "429", "request-timeout", "dropped"])
def test_transient_failures_are_retried_then_succeed(fake, no_backoff, failure):
    fake.script = [failure, failure, ("ok", b"payload")]
    store = _store(fake.url)
    assert store.read_bytes("data/x.bin") == b"payload"
    assert [r[0] for r in fake.requests] == ["GET"] * 3
    assert fake.requests[0][1].startswith("/b/root/data/x.bin")  # path-style addressing
    assert len(no_backoff) == 2  # two backoffs, one per retry


def test_throttling_that_never_ends_fails_after_max_attempts(fake, no_backoff):
    fake.script = [("SlowDown", 503)] * 10
    with pytest.raises(StoreError, match="RLHF_S3_MAX_ATTEMPTS") as ei:
        _store(fake.url, attempts=3).read_bytes("k")
    assert len(fake.requests) == 3
    assert "s3://b/root/k" in str(ei.value)
    # Truncated exponential backoff with jitter: attempt i waits rand * 2**i seconds (throttling base 1 s).
    assert len(no_backoff) == 2 and all(0 <= d <= 2 ** i for i, d in enumerate(no_backoff))


def test_upload_part_throttling_is_retried(fake, no_backoff, tmp_path):
    """put_dir: the marker read, the listing and each upload retry on their own."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.bin").write_bytes(b"abc")
    fake.script = [("NoSuchKey", 404),                        # GET the marker: nothing committed
                   ("ok", b"<ListBucketResult></ListBucketResult>"),  # list old objects
                   ("SlowDown", 503), ("ok", b"")]            # PUT f.bin: throttled once
    manifest = _store(fake.url).put_dir(tmp_path / "d", "art")
    assert set(manifest) == {"f.bin"}
    puts = [p for m, p in fake.requests if m == "PUT"]
    assert puts[:2] == ["/b/root/art/f.bin", "/b/root/art/f.bin"]
    assert puts[-1] == "/b/root/art/_COMMITTED"  # the marker last


# ----------------------------------------------------------------------------- not retried


@pytest.mark.parametrize("code", ["AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"])
def test_access_errors_fail_fast_without_retry(fake, no_backoff, code):
    fake.script = [(code, 403)] * 10
    t0 = time.monotonic()
    with pytest.raises(StoreError) as ei:
        _store(fake.url, attempts=8).read_bytes("k")
    msg = str(ei.value)
    assert len(fake.requests) == 1 and not no_backoff
    assert time.monotonic() - t0 < 5
    assert "bucket 'b'" in msg and "AWS_ACCESS_KEY_ID" in msg and "AWS_ENDPOINT_URL_S3" in msg
    assert SECRET not in msg and "fake-key" not in msg


def test_access_denied_on_upload_is_a_store_error(fake, no_backoff, tmp_path):
    """boto3 wraps upload errors in S3UploadFailedError (message only); we still see the code."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.bin").write_bytes(b"abc")
    fake.script = [("NoSuchKey", 404), ("ok", b"<ListBucketResult></ListBucketResult>"), ("AccessDenied", 403)]
    with pytest.raises(StoreError, match="access to bucket 'b'.*refused"):
        _store(fake.url).put_dir(tmp_path / "d", "art")
    assert not any(p.endswith("_COMMITTED") for m, p in fake.requests if m == "PUT")


def test_no_such_bucket_names_the_bucket(fake, no_backoff):
    fake.script = [("NoSuchBucket", 404)]
    with pytest.raises(StoreError, match="bucket 'b' does not exist"):
        _store(fake.url).list_dirs("runs")
    assert len(fake.requests) == 1


def test_missing_object_is_a_plain_store_error(fake, no_backoff):
    fake.script = [("NoSuchKey", 404)]
    with pytest.raises(StoreError, match="no object at s3://b/root/nope"):
        _store(fake.url).read_bytes("nope")
    assert len(fake.requests) == 1


def test_unreachable_endpoint_says_which_variable(no_backoff):
    import socket

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StoreError, match="cannot reach S3.*AWS_ENDPOINT_URL_S3"):
        _store(f"http://127.0.0.1:{port}", attempts=2).read_bytes("k")
    assert len(no_backoff) == 1  # connection errors are retried too


def test_a_server_that_does_not_answer_is_waited_for_up_to_the_outage_tolerance(fake, no_backoff, monkeypatch,
                                                                                 capsys):
    """A restarting S3 pod drops or refuses connections for longer than botocore's few
    quick attempts: the request keeps trying (1, 2, 4, then 5 s apart) until the server
    answers, within RLHF_S3_OUTAGE_TOLERANCE_S, and says so once."""
    import rlhf.adapters.store as store_mod

    waits: list[int] = []
    monkeypatch.setattr(store_mod, "_outage_delay", lambda attempts: waits.append(attempts) or 0.01)
    fake.script = [("drop",)] * 6 + [("ok", b"payload")]
    assert _store(fake.url, attempts=2, outage_s=60).read_bytes("k") == b"payload"  # 7 requests, not 2
    assert len(fake.requests) == 7 and waits == [1, 2, 3, 4, 5, 6]
    said = capsys.readouterr().err
    assert said.count("does not answer") == 1 and "retrying for up to 60 s (RLHF_S3_OUTAGE_TOLERANCE_S)" in said
    # past the tolerance the request fails with the reason
    monkeypatch.setattr(store_mod, "_outage_delay", lambda attempts: 0.3)
    fake.script, fake.requests = [("drop",)] * 100, []
    with pytest.raises(StoreError, match=r"cannot reach S3 .* after 2 attempts and 1 s"):
        _store(fake.url, attempts=2, outage_s=1).read_bytes("k")
    assert 3 <= len(fake.requests) <= 8


# ----------------------------------------------------------------------------- config


def test_botocore_config_suits_s3_compatible_servers():
    store = _store("http://127.0.0.1:9", attempts=6, multipart_threshold=1 << 20, multipart_chunksize=2 << 20)
    cfg = store.client.meta.config
    assert cfg.request_checksum_calculation == "when_required"
    assert cfg.response_checksum_validation == "when_required"
    assert cfg.s3["addressing_style"] == "path"
    # total_max_attempts counts the first request; botocore's "max_attempts" would mean 6 retries
    assert cfg.retries == {"mode": "standard", "total_max_attempts": 6}
    assert store.transfer_config.multipart_threshold == 1 << 20
    assert store.transfer_config.multipart_chunksize == 2 << 20
    assert SECRET not in repr(store.settings)


def test_aws_store_keeps_virtual_host_addressing():
    settings = Settings.from_env({"AWS_REGION": "eu-west-1", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    store = S3Store("s3://bucket/p", settings)
    assert not (store.client.meta.config.s3 or {}).get("addressing_style")
    assert store.client.meta.region_name == "eu-west-1"
    assert store.client.meta.config.retries["total_max_attempts"] == 8  # the default


def test_settings_reject_a_bad_attempt_count():
    with pytest.raises(ValueError, match="RLHF_S3_MAX_ATTEMPTS"):
        Settings.from_env({"RLHF_S3_MAX_ATTEMPTS": "zero"})
