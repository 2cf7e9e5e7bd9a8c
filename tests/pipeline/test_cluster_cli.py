"""`rlhf submit | schedule | runs` against a small fake Kubeflow Pipelines API server.

The server speaks just the KFP v2beta1 REST endpoints that `kfp.Client` calls, keeps
state in memory and records every request, so the tests check what the real SDK puts
on the wire: the uploaded spec, the typed run parameters, the service account, the
6-field cron, and delete-then-create for a schedule.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from rlhf.cli import main

REPO = Path(__file__).resolve().parents[2]
API = "/apis/v2beta1"
TOKEN = "tok-3f9a-never-print-me"
NOW = "2024-05-01T12:00:00Z"


class FakeKFP:
    """In-memory KFP API state plus the log of requests."""

    def __init__(self, require_token: str | None = None):
        self.require_token = require_token
        self.login_page = False  # answer like Dex / oauth2-proxy in front of a multi-user Kubeflow
        self.requests: list[dict] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring: dict[str, dict] = {}
        self._ids = itertools.count(1)

    def new_id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids):04d}"

    def calls(self, method: str | None = None, path: str | None = None) -> list[dict]:
        return [r for r in self.requests if (method is None or r["method"] == method)
                and (path is None or r["path"] == API + path)]

    # --- one request -> (status, body) ---
    def handle(self, method: str, path: str, q: dict, body) -> tuple[int, dict]:
        if path == f"{API}/healthz" and method == "GET":
            return 200, {"commit_sha": "0000", "tag_name": "2.3.0", "multi_user": False}
        if path == f"{API}/pipelines" and method == "GET":
            return 200, self._list("pipelines", self.pipelines, q)
        if path == f"{API}/pipelines/upload" and method == "POST":
            name = q["name"]
            if any(p["display_name"] == name for p in self.pipelines.values()):
                return 409, {"error": f"pipeline {name} already exists", "code": 6}
            pid = self.new_id("pipeline")
            self.pipelines[pid] = {"pipeline_id": pid, "display_name": name, "created_at": NOW,
                                   "namespace": q.get("namespace", "")}
            self._version(pid, name)  # the server makes a first version from the upload
            return 200, self.pipelines[pid]
        if path == f"{API}/pipelines/upload_version" and method == "POST":
            pid = q.get("pipelineid")
            if pid not in self.pipelines:
                return 404, {"error": f"pipeline {pid} not found", "code": 5}
            if any(v["pipeline_id"] == pid and v["display_name"] == q["name"] for v in self.versions.values()):
                return 409, {"error": f"pipeline version {q['name']} already exists", "code": 6}
            return 200, self._version(pid, q["name"])
        if path == f"{API}/experiments" and method == "GET":
            return 200, self._list("experiments", self.experiments, q)
        if path == f"{API}/experiments" and method == "POST":
            eid = self.new_id("exp")
            self.experiments[eid] = {"experiment_id": eid, "display_name": body["display_name"], "created_at": NOW,
                                     "namespace": body.get("namespace") or "", "storage_state": "AVAILABLE"}
            return 200, self.experiments[eid]
        if path == f"{API}/runs" and method == "POST":
            rid = self.new_id("run")
            self.runs[rid] = {**body, "run_id": rid, "state": "PENDING", "created_at": NOW}
            return 200, self.runs[rid]
        if path == f"{API}/runs" and method == "GET":
            rows = [r for r in self.runs.values() if not q.get("experiment_id") or r["experiment_id"] == q["experiment_id"]]
            return 200, {"runs": rows, "total_size": len(rows)} if rows else {}
        if path == f"{API}/recurringruns" and method == "GET":
            rows = [r for r in self.recurring.values()
                    if not q.get("experiment_id") or r["experiment_id"] == q["experiment_id"]]
            # the proto field really is camelCase here (ListRecurringRunsResponse.recurringRuns)
            return 200, self._list("recurringRuns", {r["recurring_run_id"]: r for r in rows}, q)
        if path == f"{API}/recurringruns" and method == "POST":
            jid = self.new_id("job")
            self.recurring[jid] = {**body, "recurring_run_id": jid, "status": "ENABLED", "created_at": NOW}
            return 200, self.recurring[jid]
        if path.startswith(f"{API}/recurringruns/") and method == "DELETE":
            jid = path.rsplit("/", 1)[1]
            if self.recurring.pop(jid, None) is None:
                return 404, {"error": f"recurring run {jid} not found", "code": 5}
            return 200, {}
        return 404, {"error": f"Not Found: {method} {path}", "code": 5, "message": "no such endpoint"}

    def _version(self, pid: str, name: str) -> dict:
        vid = self.new_id("version")
        self.versions[vid] = {"pipeline_id": pid, "pipeline_version_id": vid, "display_name": name, "created_at": NOW}
        return self.versions[vid]

    @staticmethod
    def _list(field: str, items: dict, q: dict) -> dict:
        rows = list(items.values())
        if q.get("filter"):
            for pred in json.loads(q["filter"])["predicates"]:
                # the SDK sends the enum number (1), `rlhf` the documented name; KFP takes both
                assert pred["operation"] in ("EQUALS", 1) and pred["key"] == "display_name", pred
                rows = [r for r in rows if r["display_name"] == pred["stringValue"]]
        return {field: rows, "total_size": len(rows)} if rows else {}  # KFP omits empty lists


def _handler(state: FakeKFP):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _serve(self):
            url = urlparse(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body, files = None, {}
            ctype = self.headers.get("Content-Type", "")
            if ctype.startswith("multipart/form-data"):
                msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    f"Content-Type: {ctype}\r\n\r\n".encode() + raw)
                files = {p.get_param("name", header="content-disposition"): p.get_payload(decode=True)
                         for p in msg.iter_parts()}
            elif raw:
                body = json.loads(raw)
            state.requests.append({"method": self.command, "path": url.path, "query": q, "body": body,
                                   "files": files, "auth": self.headers.get("Authorization")})
            if state.login_page:
                page = b"<html><body>Log in to Kubeflow</body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)
                return
            if state.require_token and self.headers.get("Authorization") != f"Bearer {state.require_token}":
                status, out = 401, {"error": "Unauthorized: bad or missing token", "code": 16}
            else:
                try:
                    status, out = state.handle(self.command, url.path, q, body)
                except Exception as e:  # a test bug shows up as a 500, not a dropped connection
                    status, out = 500, {"error": repr(e), "code": 13}
            data = json.dumps(out).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

    return Handler


@pytest.fixture
def kfp_server(monkeypatch, tmp_path):
    """(host URL, state); the SDK's ~/.config/kfp/context.json and KFP env vars are isolated."""
    import kfp.client

    monkeypatch.setattr(kfp.client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    for var in ("KF_PIPELINES_TOKEN", "KF_PIPELINES_SA_TOKEN_PATH", "KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    state = FakeKFP()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_submit_uploads_pipeline_then_versions_and_runs_with_typed_params(kfp_server, capsys, tmp_path):
    host, kfp = kfp_server
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    argv = ["submit", "--host", host, "--experiment", "nightly", "--profile", REPO / "profiles/gke.yaml",
            "--param", "ppo_updates=100", "--param", "kl_coef=0.05", "--param", "preset=instructgpt",
            "--run-name", "first", "--token-file", token_file]
    code, out, err = _cli(capsys, *argv)
    assert code == 0, err

    # first time: the pipeline is uploaded, then the spec again as a named version
    (upload,) = kfp.calls("POST", "/pipelines/upload")
    assert upload["query"]["name"] == "rlhf-instructgpt"
    (version,) = kfp.calls("POST", "/pipelines/upload_version")
    pipeline_id = next(iter(kfp.pipelines))
    assert version["query"]["pipelineid"] == pipeline_id
    assert re.fullmatch(r"\d{8}-\d{6}-\d{3}-[0-9a-f]{8}", version["query"]["name"])  # UTC time, sha256[:8]
    spec = next(yaml.safe_load_all(version["files"]["uploadfile"]))
    assert spec["pipelineInfo"]["name"] == "rlhf-instructgpt"
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"us-docker.pkg.dev/my-project/rlhf/rlhf:0.1.0"}  # the profile was compiled in

    # the experiment is created once, the run points at the new version
    assert [e["display_name"] for e in kfp.experiments.values()] == ["nightly"]
    (run_call,) = kfp.calls("POST", "/runs")
    run = run_call["body"]
    assert run["display_name"] == "first"
    assert run["experiment_id"] == next(iter(kfp.experiments))
    assert run["service_account"] == "rlhf-pipeline-runner"
    assert run["pipeline_version_reference"] == {"pipeline_id": pipeline_id,
                                                 "pipeline_version_id": list(kfp.versions)[-1]}
    params = run["runtime_config"]["parameters"]
    assert params == {"ppo_updates": 100, "kl_coef": 0.05, "preset": "instructgpt"}
    assert type(params["ppo_updates"]) is int and type(params["kl_coef"]) is float
    run_id = next(iter(kfp.runs))
    assert out.strip().splitlines()[-1] == f"{host}/#/runs/details/{run_id}"
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in kfp.requests)
    assert TOKEN not in out + err

    # second time, as the helm chart's Job does it (a spec compiled beforehand, its own service
    # account): the existing pipeline gets another version; nothing is re-created
    package = tmp_path / "pipeline.yaml"
    assert _cli(capsys, "compile", "--output", package)[0] == 0
    code, out, err = _cli(capsys, "submit", "--host", host, "--experiment", "nightly", "--package", package,
                          "--service-account", "rlhf-runner", "--param", "seed=7", "--token-file", token_file)
    assert code == 0, err
    assert kfp.calls("POST", "/runs")[-1]["body"]["service_account"] == "rlhf-runner"
    assert kfp.calls("POST", "/runs")[-1]["body"]["runtime_config"]["parameters"] == {"seed": 7}
    assert kfp.calls("POST", "/pipelines/upload_version")[-1]["files"]["uploadfile"] == package.read_bytes()
    assert len(kfp.calls("POST", "/pipelines/upload")) == 1
    assert len(kfp.calls("POST", "/pipelines/upload_version")) == 2
    assert len(kfp.experiments) == 1 and len(kfp.runs) == 2
    assert kfp.calls("POST", "/pipelines/upload_version")[-1]["query"]["pipelineid"] == pipeline_id


def test_schedule_sends_six_field_cron_and_replaces_the_old_recurring_run(kfp_server, capsys):
    host, kfp = kfp_server
    # exactly what the helm chart's schedule Job runs
    argv = ["schedule", "--host", host, "--cron", "0 3 * * 1", "--experiment", "retrain",
            "--pipeline-name", "rlhf-nightly", "--max-concurrency", "1", "--no-catchup",
            "--param", "ppo_updates=50", "--param", "preset=demo"]
    code, out, err = _cli(capsys, *argv)
    assert code == 0, err
    (create,) = kfp.calls("POST", "/recurringruns")
    job = create["body"]
    assert job["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"
    assert job["max_concurrency"] == 1  # the SDK sends a JSON number; KFP's protojson takes it (or "1")
    assert job["no_catchup"] is True
    assert job["mode"] == "ENABLE"
    assert job["display_name"] == "rlhf-nightly-schedule"
    assert job["runtime_config"]["parameters"] == {"ppo_updates": 50, "preset": "demo"}
    first_id = next(iter(kfp.recurring))
    assert job["pipeline_version_reference"]["pipeline_version_id"] == list(kfp.versions)[-1]
    assert out.strip().splitlines()[-1] == f"{host}/#/recurringrun/details/{first_id}"
    assert "created" in out and not kfp.calls("DELETE")

    # again (the chart re-runs the Job on upgrade): delete the old one, create a new one on a new version
    code, out, err = _cli(capsys, *argv)
    assert code == 0, err
    (delete,) = kfp.calls("DELETE")
    assert delete["path"] == f"{API}/recurringruns/{first_id}"
    assert len(kfp.calls("POST", "/recurringruns")) == 2
    (second_id,) = kfp.recurring
    assert second_id != first_id
    assert kfp.recurring[second_id]["pipeline_version_reference"]["pipeline_version_id"] == list(kfp.versions)[-1]
    assert "replaced" in out
    lookups = kfp.calls("GET", "/recurringruns")
    assert json.loads(lookups[-1]["query"]["filter"])["predicates"][0]["stringValue"] == "rlhf-nightly-schedule"


def test_runs_lists_the_runs_of_an_experiment(kfp_server, capsys):
    host, kfp = kfp_server
    assert _cli(capsys, "submit", "--host", host, "--experiment", "a", "--run-name", "run-in-a")[0] == 0
    assert _cli(capsys, "submit", "--host", host, "--experiment", "b", "--run-name", "run-in-b")[0] == 0
    code, out, err = _cli(capsys, "runs", "--host", host, "--experiment", "a")
    assert code == 0, err
    header, *lines = out.strip().splitlines()
    assert header.split() == ["RUN", "ID", "STATE", "CREATED", "NAME"]
    assert len(lines) == 1 and "run-in-a" in lines[0] and "PENDING" in lines[0]
    listed = kfp.calls("GET", "/runs")[-1]["query"]
    assert listed["experiment_id"] == next(e for e, v in kfp.experiments.items() if v["display_name"] == "a")
    assert listed["sort_by"] == "created_at desc"
    code, out, err = _cli(capsys, "runs", "--host", host)
    assert code == 0 and len(out.strip().splitlines()) == 3

    code, _, err = _cli(capsys, "runs", "--host", host, "--experiment", "missing")
    assert code == 2 and "no experiment named 'missing'" in err


@pytest.mark.parametrize("param, message", [
    ("ppo_update=100", "no such parameter; known: "),
    ("ppo_updates=lots", "expected a whole number"),
    ("kl_coef", "expected KEY=VALUE"),
])
def test_bad_param_fails_before_any_request(kfp_server, capsys, param, message):
    host, kfp = kfp_server
    code, out, err = _cli(capsys, "submit", "--host", host, "--param", param)
    assert code == 2
    assert err.startswith("error: ") and message in err
    if "known" in message:
        assert "ppo_updates" in err and "kl_coef" in err
    assert kfp.requests == []


@pytest.mark.parametrize("cron", ["61 * * * *", "0 3 * *", "0 3 * * MON-XYZ", "*/0 * * * *"])
def test_bad_cron_fails_before_any_request(kfp_server, capsys, cron):
    host, kfp = kfp_server
    code, _, err = _cli(capsys, "schedule", "--host", host, "--cron", cron)
    assert code == 2 and f"--cron {cron!r}" in err
    assert kfp.requests == []


def test_cron_forms():
    from rlhf.ops.cluster import normalize_cron

    assert normalize_cron("0 3 * * *") == "0 0 3 * * *"
    assert normalize_cron("30 0 3 * * MON-FRI") == "30 0 3 * * MON-FRI"
    assert normalize_cron("*/15 9-17 ? JAN,JUL 1-5") == "0 */15 9-17 ? JAN,JUL 1-5"
    assert normalize_cron("@daily") == "0 0 0 * * *"


def test_unreachable_host_is_a_clear_error(kfp_server, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = _cli(capsys, "runs", "--host", f"http://127.0.0.1:{port}")
    assert code == 2
    assert f"cannot reach Kubeflow Pipelines at http://127.0.0.1:{port}" in err and "port-forward" in err
    assert "Traceback" not in err

    code, _, err = _cli(capsys, "runs", "--host", "localhost:8080")
    assert code == 2 and "http:// or https://" in err


def test_bad_token_is_a_clear_error_without_the_token(kfp_server, capsys, monkeypatch):
    host, kfp = kfp_server
    kfp.require_token = "the-right-one"
    monkeypatch.setenv("KF_PIPELINES_TOKEN", TOKEN)  # wrong
    code, out, err = _cli(capsys, "submit", "--host", host, "--param", "seed=3")
    assert code == 2
    assert f"{host} answered 401 Unauthorized" in err and "--token-file" in err
    assert TOKEN not in out + err
    assert kfp.requests and kfp.requests[0]["auth"] == f"Bearer {TOKEN}"
    assert not kfp.calls("POST")  # stopped at the first call


def test_login_page_instead_of_the_api_is_a_clear_error(kfp_server, capsys):
    host, kfp = kfp_server
    kfp.login_page = True
    code, out, err = _cli(capsys, "runs", "--host", host, "--namespace", "team-a")
    assert code == 2 and out == ""
    assert f"{host} did not answer like the Kubeflow Pipelines API" in err and "login page" in err
    assert [r["path"] for r in kfp.requests] == [f"{API}/healthz"]
