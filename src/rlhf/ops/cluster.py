"""Submit, schedule and list runs of the pipeline on a Kubeflow Pipelines cluster.

    rlhf submit   --host URL [--profile F] [--param k=v ...]     one run of a new pipeline version
    rlhf schedule --host URL --cron "0 3 * * *" [...]            (re)create the recurring run
    rlhf runs     --host URL [--experiment NAME]                 the latest runs

Every submission compiles the pipeline (with the cluster profile, if any) and uploads it
as a NEW version of one named pipeline, named `<UTC time>-<ms>-<sha256[:8]>` of the spec, so
the UI shows exactly which spec each run used. KFP has no call that updates a recurring
run, so `schedule` deletes the one with the same name in the experiment and creates a
new one pointing at the new version; running it again is safe.

Everything goes through `kfp.Client` (imported lazily: `rlhf compile` and the engine do
not need it). Failures come back as `ClusterError` naming the host and the fix; the
token is never part of a message.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import socket
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import yaml

from rlhf.adapters.settings import Settings
from rlhf.redaction import register

DEFAULT_PIPELINE = "rlhf-instructgpt"
DEFAULT_EXPERIMENT = "rlhf"
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
"""Where the kfp SDK looks for a projected service-account token inside a pod."""
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 300


class ClusterError(RuntimeError):
    """A Kubeflow Pipelines call failed; the message names the host and the fix."""


# --- token, parameters, cron: checked before any request -----------------------------

def read_token(token_file: str | None, settings: Settings) -> str | None:
    """--token-file, else KF_PIPELINES_TOKEN, else the projected token file of a pod
    (KF_PIPELINES_SA_TOKEN_PATH, else the kfp SDK's default path when it exists)."""
    if token_file:
        return _token_from(Path(token_file), "--token-file")
    if settings.kfp_token:
        return settings.kfp_token.strip()
    if settings.kfp_token_path:
        return _token_from(Path(settings.kfp_token_path), "KF_PIPELINES_SA_TOKEN_PATH")
    if Path(SA_TOKEN_PATH).is_file():
        return _token_from(Path(SA_TOKEN_PATH), "the pod's Kubeflow Pipelines token")
    return None


def _token_from(path: Path, what: str) -> str:
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise ClusterError(f"{what} {path}: cannot read the token file ({e.strerror or e})") from None
    if not token:
        raise ClusterError(f"{what} {path}: the token file is empty")
    register(token)  # masked wherever it could be printed
    return token


def parse_param_pairs(pairs: list[str]) -> dict[str, str]:
    """`--param key=value` strings -> {key: "value"} (typed later, against the spec)."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ClusterError(f"--param {pair!r}: expected KEY=VALUE, e.g. --param ppo_updates=100")
        out[key.strip()] = value
    return out


def pipeline_parameters(spec_path: str | Path) -> dict[str, dict]:
    """The pipeline's declared inputs: the compiled spec's root.inputDefinitions.parameters
    ({name: {parameterType, defaultValue, description}})."""
    doc = next(iter(yaml.safe_load_all(Path(spec_path).read_text())))
    return dict(((doc.get("root") or {}).get("inputDefinitions") or {}).get("parameters") or {})


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def typed_params(declared: dict[str, dict], params: dict[str, object]) -> dict[str, object]:
    """Convert each value to its declared KFP type (NUMBER_INTEGER, NUMBER_DOUBLE, BOOLEAN,
    STRING, LIST, STRUCT): `ppo_updates=100` goes to the API as the integer 100."""
    out: dict[str, object] = {}
    for name, value in params.items():
        if name not in declared:
            raise ClusterError(f"--param {name}: the pipeline has no such parameter; known: {', '.join(sorted(declared))}")
        kind = declared[name].get("parameterType", "STRING")
        if kind == "STRING":
            if not isinstance(value, str):
                raise ClusterError(f"--param {name}={value!r}: expected a string")
            out[name] = value
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        try:
            out[name] = _convert(kind, text.strip())
        except ValueError:
            raise ClusterError(f"--param {name}={text!r}: expected {_KIND_WORDS.get(kind, kind)} "
                               f"(the pipeline declares {kind})") from None
    return out


_KIND_WORDS = {"NUMBER_INTEGER": "a whole number", "NUMBER_DOUBLE": "a number", "BOOLEAN": "true or false",
               "LIST": "a JSON list", "STRUCT": "a JSON object"}


def _convert(kind: str, text: str) -> object:
    if kind == "NUMBER_INTEGER":
        return int(text)
    if kind == "NUMBER_DOUBLE":
        return float(text)
    if kind == "BOOLEAN":
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise ValueError(text)
    if kind in ("LIST", "STRUCT"):
        value = json.loads(text)
        if not isinstance(value, list if kind == "LIST" else dict):
            raise ValueError(text)
        return value
    return text


# KFP's scheduler parses cron with a seconds field first (robfig/cron: sec min hour dom month dow)
_CRON_FIELDS = (("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23), ("day-of-month", 1, 31),
                ("month", 1, 12), ("day-of-week", 0, 6))
_CRON_NAMES = {
    "month": {m: i + 1 for i, m in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())},
    "day-of-week": {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())},
}
_CRON_DESCRIPTORS = {"@yearly": "0 0 0 1 1 *", "@annually": "0 0 0 1 1 *", "@monthly": "0 0 0 1 * *",
                     "@weekly": "0 0 0 * * 0", "@daily": "0 0 0 * * *", "@midnight": "0 0 0 * * *",
                     "@hourly": "0 0 * * * *"}


def normalize_cron(expr: str) -> str:
    """A 5-field cron (minute hour day-of-month month day-of-week) becomes KFP's 6-field form
    with `0` seconds first; a 6-field one is kept; @daily etc. are spelled out. Each field
    is checked here, so a typo fails before anything is uploaded."""
    text = " ".join(str(expr).split())
    if text.lower() in _CRON_DESCRIPTORS:
        return _CRON_DESCRIPTORS[text.lower()]
    fields = text.split(" ") if text else []
    if len(fields) == 5:
        fields = ["0", *fields]
    elif len(fields) != 6:
        raise ClusterError(f"--cron {expr!r}: expected 5 fields (minute hour day-of-month month day-of-week, "
                           f"e.g. '0 3 * * *' for 03:00 every day) or 6 with seconds first; got {len(fields)}")
    for value, (name, lo, hi) in zip(fields, _CRON_FIELDS):
        if not _cron_field_ok(value, name, lo, hi):
            raise ClusterError(f"--cron {expr!r}: the {name} field {value!r} is not valid; use numbers {lo}-{hi}"
                               + (" or names" if name in _CRON_NAMES else "")
                               + ", `*`, lists (1,15), ranges (1-5) and steps (*/6)")
    return " ".join(fields)


def _cron_field_ok(value: str, name: str, lo: int, hi: int) -> bool:
    names = _CRON_NAMES.get(name, {})
    for item in value.split(","):
        rng, slash, step = item.partition("/")
        if slash and not (step.isdigit() and int(step) > 0):
            return False
        if rng == "*" or (rng == "?" and name in ("day-of-month", "day-of-week")):
            continue
        ends = rng.split("-")
        if len(ends) > 2:
            return False
        numbers = [names[e.upper()] if e.upper() in names else int(e) if e.isdigit() else None for e in ends]
        if any(n is None or not lo <= n <= hi for n in numbers) or (len(numbers) == 2 and numbers[0] > numbers[1]):
            return False
    return True


# --- the three commands ---------------------------------------------------------------

def submit(host: str, *, experiment: str = DEFAULT_EXPERIMENT, pipeline_name: str = DEFAULT_PIPELINE,
           params: dict | None = None, profile_path: str | None = None, run_name: str | None = None,
           namespace: str | None = None, token: str | None = None, package_path: str | None = None,
           service_account: str | None = None) -> dict:
    """One run of a freshly uploaded pipeline version. Returns {run_id, url, pipeline_id,
    version_id, version_name}; url is the run's page in the KFP UI."""
    with _new_version(host, token, namespace, profile_path, package_path, params, pipeline_name, experiment,
                      service_account) as (client, host, typed, sa, pipeline_id, version_id, version_name,
                                           experiment_id):
        name = run_name or f"{pipeline_name} {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())}"
        with _api_errors(host, "creating the run", namespace):
            run = client.run_pipeline(experiment_id=experiment_id, job_name=name, params=typed,
                                      pipeline_id=pipeline_id, version_id=version_id, service_account=sa)
    return {"run_id": run.run_id, "url": f"{host}/#/runs/details/{run.run_id}", "pipeline_id": pipeline_id,
            "version_id": version_id, "version_name": version_name}


def schedule(host: str, *, cron: str, experiment: str = DEFAULT_EXPERIMENT, pipeline_name: str = DEFAULT_PIPELINE,
             params: dict | None = None, profile_path: str | None = None, schedule_name: str | None = None,
             max_concurrency: int = 1, no_catchup: bool = True, namespace: str | None = None,
             token: str | None = None, package_path: str | None = None,
             service_account: str | None = None) -> dict:
    """Point the recurring run `schedule_name` (default `<pipeline>-schedule`) of the
    experiment at a freshly uploaded version. Returns {recurring_run_id, replaced, url,
    cron, version_id, version_name}; `replaced` says an older one was deleted."""
    cron6 = normalize_cron(cron)
    if max_concurrency < 1:
        raise ClusterError(f"--max-concurrency {max_concurrency}: expected 1 or more")
    name = schedule_name or f"{pipeline_name}-schedule"
    with _new_version(host, token, namespace, profile_path, package_path, params, pipeline_name, experiment,
                      service_account) as (client, host, typed, sa, pipeline_id, version_id, version_name,
                                           experiment_id):
        # KFP cannot update a recurring run: delete the old one(s) of this name, then create
        with _api_errors(host, f"looking up the recurring run {name!r}", namespace):
            found = _filtered(client.list_recurring_runs, "recurring_runs", name, experiment_id=experiment_id)
        for old in found:
            with _api_errors(host, f"deleting the old recurring run {old.recurring_run_id}", namespace):
                client.delete_recurring_run(old.recurring_run_id)
        what = f"creating the recurring run {name!r}" + (" (the old one is already deleted: run this again)"
                                                         if found else "")
        with _api_errors(host, what, namespace):
            job = client.create_recurring_run(
                experiment_id=experiment_id, job_name=name, cron_expression=cron6, max_concurrency=max_concurrency,
                no_catchup=no_catchup, params=typed, pipeline_id=pipeline_id, version_id=version_id,
                enabled=True, service_account=sa,
                description=f"{pipeline_name} version {version_name}, cron {cron6} (rlhf schedule)")
    return {"recurring_run_id": job.recurring_run_id, "replaced": bool(found), "cron": cron6,
            "url": f"{host}/#/recurringrun/details/{job.recurring_run_id}", "version_id": version_id,
            "version_name": version_name}


def list_runs(host: str, *, experiment: str | None = None, page_size: int = 20, namespace: str | None = None,
              token: str | None = None) -> list[dict]:
    """The newest runs (of one experiment, or all): [{id, name, state, created_at}]."""
    client, host = _connect(host, token, namespace)
    experiment_id = _experiment_id(client, host, experiment, namespace, create=False) if experiment else None
    with _api_errors(host, "listing runs", namespace):
        resp = client.list_runs(page_size=page_size, sort_by="created_at desc", experiment_id=experiment_id,
                                namespace=namespace)
    return [{"id": r.run_id, "name": r.display_name, "state": r.state,
             "created_at": r.created_at.isoformat() if hasattr(r.created_at, "isoformat") else r.created_at}
            for r in resp.runs or []]


# --- helpers --------------------------------------------------------------------------

@contextlib.contextmanager
def _new_version(host, token, namespace, profile_path, package_path, params, pipeline_name, experiment,
                 service_account):
    """What submit and schedule share: 1. compile (or take --package) and type the
    parameters, before anything is sent; 2. connect; 3. upload a new pipeline version;
    4. get or create the experiment."""
    with _spec(profile_path, package_path) as (spec_path, declared, profile):
        typed = typed_params(declared, params or {})
        sa = service_account or (profile.service_account if profile else None)
        client, host = _connect(host, token, namespace)
        pipeline_id, version_id, version_name = _upload_version(client, host, spec_path, pipeline_name, namespace)
        experiment_id = _experiment_id(client, host, experiment, namespace, create=True)
        yield client, host, typed, sa, pipeline_id, version_id, version_name, experiment_id


@contextlib.contextmanager
def _spec(profile_path: str | None, package_path: str | None):
    """(spec path, declared parameters, profile): --package as given, else compiled into a
    temporary folder with the profile's placement and image."""
    from rlhf.ops.profiles import load_profile

    profile = load_profile(profile_path) if profile_path else None
    if package_path:
        if not Path(package_path).is_file():
            raise ClusterError(f"--package {package_path}: no such file (make one with `rlhf compile`)")
        yield package_path, pipeline_parameters(package_path), profile
        return
    from rlhf.pipelines import compile_pipeline

    with tempfile.TemporaryDirectory(prefix="rlhf-kfp-") as tmp:
        path = compile_pipeline(str(Path(tmp) / "pipeline.yaml"), profile)
        yield path, pipeline_parameters(path), profile


def _check_host(host: str | None) -> str:
    if not host:
        raise ClusterError("no Kubeflow Pipelines host: pass --host URL (e.g. http://localhost:8080 after "
                           "`kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`) or set KF_PIPELINES_ENDPOINT")
    url = urlparse(host)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ClusterError(f"--host {host!r}: expected an http:// or https:// URL, e.g. http://localhost:8080")
    return host.rstrip("/")


def _connect(host: str | None, token: str | None, namespace: str | None):
    """A kfp.Client that fails fast: a reachability check first, and one health check
    instead of the SDK's five with 5 s pauses (a 401 would otherwise take 25 s)."""
    import warnings

    import kfp
    import urllib3

    host = _check_host(host)
    url = urlparse(host)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ClusterError(f"cannot reach Kubeflow Pipelines at {host}: {e.strerror or e}. Check --host; from a "
                           "workstation: `kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80` and "
                           "--host http://localhost:8080") from None

    class _Client(kfp.Client):
        healthz = None

        def get_kfp_healthz(self, sleep_duration: int = 5):
            if self.healthz is None:
                self.healthz = _healthz(self, host)
            return self.healthz

        def set_user_namespace(self, namespace: str) -> None:
            # the SDK also writes ~/.config/kfp/context.json, which fails on a read-only pod
            self._context_setting["namespace"] = namespace

    with warnings.catch_warnings(), _api_errors(host, "connecting", namespace):
        warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP 2.0.0-beta.2 and later"
        client = _Client(host=host, existing_token=token, namespace=namespace or "kubeflow")
        client.get_kfp_healthz()  # the SDK skips it when a namespace is set
    pool = getattr(getattr(getattr(client, "_run_api", None), "api_client", None), "rest_client", None)
    if pool is not None:  # the generated client waits forever by default
        pool.pool_manager.connection_pool_kw["timeout"] = urllib3.Timeout(connect=CONNECT_TIMEOUT_S,
                                                                          read=READ_TIMEOUT_S)
    return client, host


def _healthz(client, host: str):
    """GET healthz once and insist on a JSON answer: behind Dex / oauth2-proxy a request
    without a valid token is redirected to an HTML login page with status 200, which the
    generated client would otherwise read as an empty, successful answer."""
    import kfp_server_api

    resp = client._healthz_api.healthz_service_get_healthz(_preload_content=False)
    try:
        data = json.loads(resp.data)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        kind = resp.headers.get("Content-Type") or "no content type"
        raise ClusterError(f"{host} did not answer like the Kubeflow Pipelines API (healthz gave {kind}, not JSON): "
                           "probably a login page. Pass a token with --token-file or KF_PIPELINES_TOKEN, or use "
                           "the API service directly (in the cluster: http://ml-pipeline.kubeflow:8888; from a "
                           "workstation: `kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`)")
    return kfp_server_api.V2beta1GetHealthzResponse(multi_user=data.get("multi_user"))


@contextlib.contextmanager
def _api_errors(host: str, what: str, namespace: str | None = None):
    """kfp_server_api / urllib3 failures -> ClusterError with the host and the fix; the
    SDK's own "... details: <link>" prints are swallowed (the CLI prints its own)."""
    import kfp_server_api
    import urllib3

    ns = f" in namespace {namespace!r}" if namespace else ""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    except kfp_server_api.ApiException as e:
        status, detail = e.status, _detail(e)
        if status == 401:
            raise ClusterError(f"{host} answered 401 Unauthorized while {what}: no valid token. Pass one with "
                               "--token-file FILE or KF_PIPELINES_TOKEN (in a pod: KF_PIPELINES_SA_TOKEN_PATH, a "
                               "projected token with audience pipelines.kubeflow.org)") from None
        if status == 403:
            raise ClusterError(f"{host} answered 403 Forbidden while {what}{ns}: the token's identity may not do "
                               f"this. Check --namespace (multi-user Kubeflow: your profile namespace) and that "
                               f"the identity is a contributor there. {detail}".rstrip()) from None
        if status == 404:
            raise ClusterError(f"{host} answered 404 Not Found while {what}{ns}: {detail or 'no such resource'}. "
                               "Check that --host is the Kubeflow Pipelines UI or API address (e.g. "
                               "http://ml-pipeline-ui.kubeflow or http://ml-pipeline.kubeflow:8888), not "
                               "another service") from None
        if status == 0:
            raise ClusterError(f"cannot talk to {host} while {what}: {e.reason}. For a self-signed "
                               "certificate use http:// through a port-forward") from None
        raise ClusterError(f"Kubeflow Pipelines at {host} answered {status} {e.reason} while {what}{ns}: "
                           f"{detail or 'no details'}") from None
    except urllib3.exceptions.HTTPError as e:
        reason = getattr(e, "reason", None) or e
        raise ClusterError(f"cannot reach Kubeflow Pipelines at {host} while {what}: {reason}. Check --host "
                           "and that the KFP API is up") from None


def _detail(e) -> str:
    """The server's own message from an error body ({"error"|"message": ...}), short."""
    body = e.body.decode(errors="replace") if isinstance(e.body, bytes) else str(e.body or "")
    try:
        data = json.loads(body)
        body = str(data.get("message") or data.get("error") or body) if isinstance(data, dict) else body
    except ValueError:
        pass
    body = " ".join(body.split())
    return body[:300] + ("..." if len(body) > 300 else "")


def _name_filter(name: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def _filtered(list_call, field: str, name: str, **kwargs) -> list:
    """Objects named `name`: filtered by the server, checked again here."""
    resp = list_call(filter=_name_filter(name), page_size=100, **kwargs)
    return [o for o in getattr(resp, field) or [] if o.display_name == name]


def _upload_version(client, host: str, spec_path: str, pipeline_name: str, namespace: str | None):
    """(pipeline id, version id, version name): the pipeline found by name, or uploaded
    once; then the spec as a new version named by UTC time and content hash."""
    digest = hashlib.sha256(Path(spec_path).read_bytes()).hexdigest()[:8]
    now = time.time()  # milliseconds too: KFP rejects a second version of the same name
    version_name = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}-{int(now * 1000) % 1000:03d}-{digest}"
    with _api_errors(host, f"looking up pipeline {pipeline_name!r}", namespace):
        found = _filtered(client.list_pipelines, "pipelines", pipeline_name, namespace=namespace)
    if len(found) > 1:
        raise ClusterError(f"{host}: {len(found)} pipelines are named {pipeline_name!r}; delete the extra ones "
                           "in the UI or pass another --pipeline-name")
    if found:
        pipeline_id = found[0].pipeline_id
    else:
        with _api_errors(host, f"uploading the new pipeline {pipeline_name!r}", namespace):
            pipeline_id = client.upload_pipeline(spec_path, pipeline_name=pipeline_name, namespace=namespace,
                                                 description="InstructGPT-style RLHF (rlhf submit/schedule)"
                                                 ).pipeline_id
    with _api_errors(host, f"uploading version {version_name} of pipeline {pipeline_name!r}", namespace):
        version = client.upload_pipeline_version(spec_path, version_name, pipeline_id=pipeline_id,
                                                 description=f"spec sha256 {digest}")
    return pipeline_id, version.pipeline_version_id, version_name


def _experiment_id(client, host: str, name: str, namespace: str | None, *, create: bool) -> str:
    what = f"{'getting or creating' if create else 'looking up'} experiment {name!r}"
    with _api_errors(host, what, namespace):
        try:
            if create:  # the SDK looks the name up first and creates it only when missing
                return client.create_experiment(name, namespace=namespace).experiment_id
            return client.get_experiment(experiment_name=name, namespace=namespace).experiment_id
        except ValueError as e:
            ns = f" in namespace {namespace!r}" if namespace else ""
            raise ClusterError(f"{host}: no experiment named {name!r}{ns} ({e}); see {host}/#/experiments, "
                               "or leave out --experiment") from None
