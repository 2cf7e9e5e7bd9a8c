"""The helm chart `helm/rlhf`: lint, render and validate it offline, then check what matters.

No cluster, no helm binary and no network: helm-python-sdk (import `helm_python`) binds
Helm v4's Go SDK through a bundled shared library, so `helm_python.lint(...)` is
`helm lint` and `Chart.render(...)` is `helm template` (values are coalesced with the
chart's defaults and checked against values.schema.json, as an install would).
Every rendered object is validated by kubernetes-validate against the bundled OpenAPI
schemas of Kubernetes KUBE_VERSION in strict mode (unknown fields fail).
"""

from __future__ import annotations

import base64
import configparser
import copy
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is in the `test` extra")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the `test` extra")

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / "helm"
CHART = HELM / "rlhf"
KUBE_VERSION = "1.33"  # a recent release that GKE and EKS both run
# MutatingAdmissionPolicy is newer: validated against the first release that serves each version
SCHEMA_VERSION = {"admissionregistration.k8s.io/v1beta1": "1.34", "admissionregistration.k8s.io/v1": "1.36"}
RELEASE, NAMESPACE = "rlhf", "ml-team"
COMPILE_ARGV = ["rlhf", "compile", "--profile", "/etc/rlhf/profile/profile.yaml", "--output", "/tmp/pipeline.yaml"]

# the scheduled-retraining case on top of the defaults: every optional branch on
SCHEDULED = {
    "schedule": {
        "enabled": True,
        "cron": "0 15 4 * * *",
        "parameters": {"preset": "demo", "ppo_updates": 4, "kl_coef": 0.05},
        "profile": {
            "inline": {"name": "one-gpu", "stages": {"ppo": {"accelerator_count": 1, "shm_size": "8Gi"}}},
            "secrets": [{"name": "rlhf-s3", "env": {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                                                    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}}],
        },
    },
    "kfp": {"auth": {"mode": "secret", "existingSecret": "kfp-token", "tokenKey": "token"}},
    "mlflow": {"auth": {"enabled": True, "existingSecret": "mlflow-admin"}},
    "rbac": {"readableSecrets": ["mlflow-client"]},
    "stepPodSecurity": {"admissionPolicy": {"enabled": True}},
}
# MLflow without basic auth: the explicit opt-out, with a schedule whose steps get no login
NO_AUTH = {
    "mlflow": {"auth": {"enabled": False}},
    "schedule": {"enabled": True, "cron": "0 0 5 * * *", "parameters": {"preset": "demo"},
                 "profile": {"inline": {"name": "cpu"}}},
}
CASES = {
    "default": {},
    "scheduled": SCHEDULED,
    "gke": yaml.safe_load((HELM / "values-gke.yaml").read_text()),
    "eks": yaml.safe_load((HELM / "values-eks.yaml").read_text()),
    "no_auth": NO_AUTH,
}
AUTH_SECRET = f"{RELEASE}-mlflow-auth"  # the generated one: <fullname>-mlflow-auth
PROFILE_CONFIG_MAP = f"{RELEASE}-schedule-profile"
LOGIN_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
CLUSTER_SCOPED = ("ClusterRole", "ClusterRoleBinding", "MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding")
SECRETISH = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|BACKEND_STORE|DATABASE")
CREDENTIALS_IN_URL = re.compile(r"://[^/@\s]+:[^/@\s]+@")  # scheme://user:password@host


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def _render(chart, values: dict) -> list[dict]:
    """Every Kubernetes object the chart renders with `values` (NOTES.txt left out)."""
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [doc for path, text in sorted(manifests.items()) if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module")
def rendered(chart) -> dict[str, list[dict]]:
    """case -> every rendered Kubernetes object."""
    return {case: _render(chart, values) for case, values in CASES.items()}


def _validate(doc: dict) -> None:
    """Strict validation against KUBE_VERSION, or the first release serving a newer API."""
    kubernetes_validate.validate(doc, SCHEMA_VERSION.get(doc["apiVersion"], KUBE_VERSION), strict=True)


def _of(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs: list[dict], kind: str) -> dict:
    found = _of(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def _named(docs: list[dict], kind: str, name: str) -> dict | None:
    return next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)


def _auth_secret_name(case: str) -> str | None:
    """The Secret of MLflow's admin login in a case's values (None: auth off)."""
    auth = CASES[case].get("mlflow", {}).get("auth", {})
    if not auth.get("enabled", True):
        return None
    return auth.get("existingSecret") or AUTH_SECRET


def _generates_auth_secret(case: str) -> bool:
    auth = CASES[case].get("mlflow", {}).get("auth", {})
    return auth.get("enabled", True) and not auth.get("existingSecret")


def _pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    return [(f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
            for d in docs if d["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet")]


# ----------------------------------------------------------------------------- chart and schema


def test_chart_metadata_matches_project():
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["apiVersion"] == "v2"
    assert meta["version"] == "0.1.0"
    assert meta["appVersion"] == project["version"]
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert defaults["image"]["repository"] == "ghcr.io/rlhf-pipeline/rlhf"


def test_schema_closes_every_object():
    """Every object level of the schema with named properties rejects unknown keys."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    open_objects = []

    def walk(node, where):
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                open_objects.append(where)
            for key, child in node.items():
                walk(child, f"{where}/{key}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{where}/{i}")

    walk(schema, "#")
    assert not open_objects, f"objects without additionalProperties: false: {open_objects}"


@pytest.mark.parametrize("case", CASES)
def test_lint_clean(case):
    report = helm.lint(CHART, CASES[case], strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBE_VERSION}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


def test_bad_values_fail_with_the_field_named(chart):
    bad = yaml.safe_load((HELM / "bad-values.yaml").read_text())
    with pytest.raises(helm.HelmValuesError) as err:
        chart.validate_schema(bad)
    message = str(err.value)
    assert "additional properties 'wokers' not allowed" in message, message
    assert "/mlflow/replicas" in message and "want integer" in message, message
    # an install/template fails the same way, before any template runs
    with pytest.raises(helm.HelmValuesError, match="wokers"):
        chart.render(bad, name=RELEASE, namespace=NAMESPACE)
    # and so does `helm lint -f bad-values.yaml`
    report = helm.lint(CHART, bad)
    assert any("wokers" in e for e in report["errors"]), report


@pytest.mark.parametrize("values, field", [
    ({"schedule": {"cron": "3 * * 0"}}, "/schedule/cron"),  # 5 or 6 fields
    ({"kfp": {"auth": {"mode": "basic"}}}, "/kfp/auth/mode"),
    ({"mlflow": {"backendStore": {"existingSecret": "x", "key": "k", "url": "postgresql://u:p@db/m"}}},
     "additional properties 'url'"),
    ({"mlflow": {"auth": {"adminPassword": "hunter2"}}}, "additional properties 'adminPassword'"),  # Secrets only
    ({"mlflow": {"auth": {"defaultPermission": "WRITE"}}}, "/mlflow/auth/defaultPermission"),
    ({"mlflow": {"auth": {"adminUsername": "admin\nadmin_password = x"}}}, "/mlflow/auth/adminUsername"),
])
def test_schema_rejects(chart, values, field):
    with pytest.raises(helm.HelmValuesError, match=re.escape(field)):
        chart.validate_schema(values)


# ----------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("case", CASES)
def test_manifests_validate_strict(rendered, case):
    failures = []
    for doc in rendered[case]:
        try:
            _validate(doc)
        except kubernetes_validate.ValidationError as e:
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: "
                            f"{'.'.join(map(str, e.path))}: {e.message}")
    assert not failures, "\n".join(failures)


def test_strict_validation_catches_unknown_fields(rendered):
    """Control: strict mode really rejects a misspelled field in a rendered Deployment."""
    deployment = copy.deepcopy(_one(rendered["default"], "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("case", CASES)
def test_namespaced_and_labelled(rendered, case):
    # the one Secret the chart makes: MLflow's admin login, generated when none is named
    secrets = [d["metadata"]["name"] for d in _of(rendered[case], "Secret")]
    assert secrets == ([AUTH_SECRET] if _generates_auth_secret(case) else []), secrets
    for doc in rendered[case]:
        meta = doc["metadata"]
        if doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in meta and NAMESPACE in meta["name"], doc["kind"]  # unique per release
        else:
            assert meta["namespace"] == NAMESPACE, doc["kind"]
        for label in ("app.kubernetes.io/name", "app.kubernetes.io/instance",
                      "app.kubernetes.io/version", "app.kubernetes.io/managed-by",
                      "app.kubernetes.io/component", "helm.sh/chart"):
            assert label in meta["labels"], (doc["kind"], label)


@pytest.mark.parametrize("case", CASES)
def test_mlflow_server_takes_secrets_by_reference(rendered, case):
    deployment = _one(rendered[case], "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    args = container["args"]

    def secret_ref(name):
        assert "value" not in env[name], f"{name} is a literal"
        return env[name]["valueFrom"]["secretKeyRef"]

    assert secret_ref("MLFLOW_BACKEND_STORE_URI")["name"] == CASES[case].get("mlflow", {}).get(
        "backendStore", {}).get("existingSecret", "rlhf-mlflow-db")
    assert args[args.index("--backend-store-uri") + 1] == "$(MLFLOW_BACKEND_STORE_URI)"
    assert container["command"] == ["mlflow", "server"]
    for flag, value in (("--host", "0.0.0.0"), ("--port", "5000")):
        assert args[args.index(flag) + 1] == value
    assert "--workers" in args and "--serve-artifacts" in args
    assert args[args.index("--artifacts-destination") + 1].startswith("s3://")

    if case == "eks":  # IRSA: no keys anywhere, S3 on AWS without an endpoint
        assert "AWS_ACCESS_KEY_ID" not in env and "MLFLOW_S3_ENDPOINT_URL" not in env
        sa = next(d for d in _of(rendered[case], "ServiceAccount")
                  if d["metadata"]["name"] == deployment["spec"]["template"]["spec"]["serviceAccountName"])
        assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    else:
        assert secret_ref("AWS_ACCESS_KEY_ID") and secret_ref("AWS_SECRET_ACCESS_KEY")
    if case == "gke":
        assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "https://storage.googleapis.com"
        for sa in _of(rendered[case], "ServiceAccount"):
            assert "iam.gke.io/gcp-service-account" in sa["metadata"]["annotations"]

    auth_secret = _auth_secret_name(case)
    if auth_secret:  # basic auth: admin and Flask key from the Secret, generated or named
        assert args[args.index("--app-name") + 1] == "basic-auth"
        for name, key in (("MLFLOW_AUTH_ADMIN_USERNAME", "admin-username"),
                          ("MLFLOW_AUTH_ADMIN_PASSWORD", "admin-password"),
                          ("MLFLOW_FLASK_SERVER_SECRET_KEY", "flask-secret-key")):
            assert secret_ref(name) == {"name": auth_secret, "key": key}, name
        assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == "/etc/mlflow-auth/basic_auth.ini"
    else:  # the explicit opt-out
        assert "--app-name" not in args and not [n for n in env if n.startswith("MLFLOW_AUTH")]

    # no secret-looking variable anywhere carries a literal value
    for _, spec in _pod_specs(rendered[case]):
        for c in spec["containers"] + spec.get("initContainers", []):
            for e in c.get("env", []):
                if SECRETISH.search(e["name"]) and not e["name"].endswith("_PATH"):
                    assert "valueFrom" in e and "value" not in e, (c["name"], e)
                assert not CREDENTIALS_IN_URL.search(e.get("value", "")), (c["name"], e)

    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    service = _one(rendered[case], "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"][0]["port"] == 5000


@pytest.mark.parametrize("case", CASES)
def test_pod_security_everywhere(rendered, case):
    specs = _pod_specs(rendered[case])
    assert specs
    for where, spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, where
        assert (pod["runAsUser"], pod["runAsGroup"]) == (10001, 10001), where
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", where
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001, (where, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", (where, c["name"])
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            home = next(e["value"] for e in c["env"] if e["name"] == "HOME")
            for path in ("/tmp", home):  # writable scratch on a read-only root
                assert "emptyDir" in volumes[mounts[path]], (where, c["name"], path)


@pytest.mark.parametrize("case", CASES)
def test_schedule_job(rendered, case):
    jobs = _of(rendered[case], "Job")
    values = CASES[case].get("schedule", {})
    if not values.get("enabled"):
        assert not jobs and not _named(rendered[case], "ConfigMap", PROFILE_CONFIG_MAP)
        assert all("schedule" not in sa["metadata"]["name"] for sa in _of(rendered[case], "ServiceAccount"))
        return
    job = _one(rendered[case], "Job")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "post-install,post-upgrade"
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation"

    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    assert spec["serviceAccountName"] in {sa["metadata"]["name"] for sa in _of(rendered[case], "ServiceAccount")}
    assert spec["serviceAccountName"] != _one(rendered[case], "RoleBinding")["subjects"][0]["name"]
    (compile_step,) = spec["initContainers"]
    assert compile_step["command"] + compile_step["args"] == COMPILE_ARGV
    # the profile: the chart's ConfigMap of the inline profile, read-only at /etc/rlhf/profile
    (mount,) = [m for m in compile_step["volumeMounts"] if m["name"] == "profile"]
    assert (mount["mountPath"], mount["readOnly"]) == ("/etc/rlhf/profile", True)
    (volume,) = [v for v in spec["volumes"] if v["name"] == "profile"]
    assert volume["configMap"] == {"name": f"{RELEASE}-schedule-profile",
                                   "items": [{"key": "profile.yaml", "path": "profile.yaml"}]}
    assert _named(rendered[case], "ConfigMap", PROFILE_CONFIG_MAP)
    (schedule,) = spec["containers"]
    argv = schedule["command"] + schedule["args"]
    assert argv[:2] == ["rlhf", "schedule"]

    def flag(name):
        return argv[argv.index(name) + 1]

    assert flag("--cron") == values["cron"]
    assert flag("--max-concurrency") == "1" and "--no-catchup" in argv
    assert flag("--package") == "/tmp/pipeline.yaml"
    assert flag("--host").startswith("http")
    assert flag("--experiment") and flag("--pipeline-name")
    params = [argv[i + 1] for i, a in enumerate(argv) if a == "--param"]
    assert params == [f"{k}={v}" for k, v in sorted(values["parameters"].items())]

    env = {e["name"]: e for e in schedule["env"]}
    mode = CASES[case].get("kfp", {}).get("auth", {}).get("mode", "none")
    if mode == "none":
        assert "KF_PIPELINES_SA_TOKEN_PATH" not in env
    else:  # the token is a mounted file, never a literal
        token = next(v for v in spec["volumes"] if v["name"] == "kfp-token")
        if mode == "secret":
            assert token["secret"]["secretName"] == "kfp-token"
        else:
            assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
        assert env["KF_PIPELINES_SA_TOKEN_PATH"]["value"].endswith("/token")

    # the MLflow login: the one the steps get (the profile's own, or this release's admin
    # keys that the chart adds), by reference; none without auth
    profile = yaml.safe_load(_named(rendered[case], "ConfigMap", PROFILE_CONFIG_MAP)["data"]["profile.yaml"])
    logins = {var: {"name": s["name"], "key": s["env"][var]}
              for s in profile["secrets"] for var in LOGIN_VARS if var in s["env"]}
    want = {"scheduled": "mlflow-admin", "gke": "rlhf-mlflow-client", "eks": AUTH_SECRET, "no_auth": None}[case]
    if want is None:
        assert not logins and not [n for n in env if n in LOGIN_VARS]
    else:
        assert {logins[var]["name"] for var in LOGIN_VARS} == {want}
        for var in LOGIN_VARS:
            assert "value" not in env[var] and env[var]["valueFrom"]["secretKeyRef"] == logins[var], var
    for init in spec["initContainers"]:  # compiling names Secrets; it needs none of their values
        assert not [e for e in init["env"] if "valueFrom" in e], init["name"]


@pytest.mark.parametrize("case", CASES)
def test_network_policy(rendered, case):
    policy = _one(rendered[case], "NetworkPolicy")["spec"]
    deployment = _one(rendered[case], "Deployment")
    assert policy["podSelector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    (ingress,) = policy["ingress"]
    assert ingress["ports"] == [{"protocol": "TCP", "port": 5000}]
    assert {"podSelector": {}} in ingress["from"]
    namespaces = [p["namespaceSelector"]["matchLabels"] for p in ingress["from"] if "namespaceSelector" in p]
    if case in ("gke", "eks"):
        assert {"kubernetes.io/metadata.name": "kubeflow"} in namespaces
    else:
        assert not namespaces
    egress_ports = {p["port"] for rule in policy["egress"] for p in rule.get("ports", [])}
    assert {53, 443, 5432} <= egress_ports


@pytest.mark.parametrize("case", CASES)
def test_role_is_least_privilege(rendered, case):
    role = _one(rendered[case], "Role")
    # what each resource may be asked; only TrainJobs (multi-node stages) are ever written
    allowed = {"pods": {"get", "list", "watch"}, "pods/log": {"get", "list", "watch"}, "secrets": {"get"},
               "events": {"list"}, "trainingruntimes": {"get", "list"},
               "trainjobs": {"create", "get", "list", "watch", "delete"}}
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], (field, rule)
        for resource in rule["resources"]:
            assert resource in allowed and set(rule["verbs"]) <= allowed[resource], rule
        if "secrets" in rule["resources"]:
            assert rule["verbs"] == ["get"] and rule["resourceNames"], rule
    # the kubeflow SDK of rlhf.ops.trainjob submits, watches and (on timeout or cancel) deletes TrainJobs
    trainer = [r for r in role["rules"] if r["apiGroups"] == ["trainer.kubeflow.org"]]
    assert {"trainjobs": ["create", "get", "list", "watch", "delete"], "trainingruntimes": ["get", "list"]} == {
        res: r["verbs"] for r in trainer for res in r["resources"]}
    secret_rules = [r for r in role["rules"] if "secrets" in r["resources"]]
    if case == "eks":  # no Secret to read: no secrets rule (empty resourceNames would mean all)
        assert not secret_rules
    else:  # the pods read the MLflow login through secretKeyRef: never through the API
        assert not {"mlflow-admin", AUTH_SECRET} & set(secret_rules[0]["resourceNames"])
    binding = _one(rendered[case], "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    runner = binding["subjects"][0]
    assert runner["namespace"] == NAMESPACE
    assert runner["name"] in {sa["metadata"]["name"] for sa in _of(rendered[case], "ServiceAccount")}
    # cluster-wide: reading the Trainer's ClusterTrainingRuntimes, nothing else
    cluster_role = _one(rendered[case], "ClusterRole")
    assert cluster_role["rules"] == [{"apiGroups": ["trainer.kubeflow.org"], "resources": ["clustertrainingruntimes"],
                                      "verbs": ["get", "list"]}]
    cluster_binding = _one(rendered[case], "ClusterRoleBinding")
    assert cluster_binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                          "name": cluster_role["metadata"]["name"]}
    assert cluster_binding["subjects"] == binding["subjects"]


# ----------------------------------------------------------------------------- MLflow authentication


def _decoded(secret: dict) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_auth_is_on_by_default_with_a_generated_secret(rendered, chart):
    """Default values: basic auth with a Secret the chart generates (admin user, random
    password and Flask key), kept on uninstall, its values nowhere else: not in the ini,
    the profile or any env literal; the server reads them through secretKeyRef."""
    docs = rendered["default"]
    secret = _named(docs, "Secret", AUTH_SECRET)
    assert secret["type"] == "Opaque"
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    data = _decoded(secret)
    assert set(data) == {"admin-username", "admin-password", "flask-secret-key"}
    assert data["admin-username"] == "admin"
    assert re.fullmatch(r"[A-Za-z0-9]{32}", data["admin-password"]), "randAlphaNum 32"
    assert re.fullmatch(r"[A-Za-z0-9]{64}", data["flask-secret-key"])
    again = _decoded(_named(_render(chart, {}), "Secret", AUTH_SECRET))  # offline: no lookup, new values
    assert again["admin-password"] != data["admin-password"] and again["flask-secret-key"] != data["flask-secret-key"]
    for doc in docs:
        if doc is secret:
            continue
        text = json.dumps(doc)
        for key in ("admin-password", "flask-secret-key"):
            assert data[key] not in text and secret["data"][key] not in text, (doc["kind"], key)

    # the ini: a ConfigMap without any password, its users database a sqlite file on an emptyDir
    ini_text = _named(docs, "ConfigMap", AUTH_SECRET)["data"]["basic_auth.ini"]
    ini = configparser.ConfigParser()  # as mlflow.server.auth.config.read_auth_config reads it
    ini.read_string(ini_text)
    assert dict(ini["mlflow"]) == {
        "default_permission": "READ", "database_uri": "sqlite:////var/lib/mlflow-auth/basic_auth.db",
        "admin_username": "admin", "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth"}
    assert "password" not in ini_text
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (server,) = pod["containers"]
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    assert volumes[mounts["/etc/mlflow-auth"]["name"]]["configMap"]["name"] == AUTH_SECRET
    assert mounts["/etc/mlflow-auth"]["readOnly"] is True
    assert "emptyDir" in volumes[mounts["/var/lib/mlflow-auth"]["name"]]
    assert "initContainers" not in pod
    # a changed ini restarts the server; the checksum is of the ini, never of the Secret
    annotations = _one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["checksum/mlflow-auth-config"] == hashlib.sha256(ini_text.rstrip("\n").encode()).hexdigest()


def test_the_server_bootstraps_its_admin_from_the_rendered_config(rendered, tmp_path):
    """MLflow's own auth bootstrap (what `mlflow server --app-name basic-auth` runs before
    its workers start), here, with the server container's MLFLOW_AUTH_* and Flask env as
    rendered (secretKeyRef resolved from the generated Secret) and its mounts below
    tmp_path: the admin is created in the sqlite file on the emptyDir and the generated
    password logs in; the ini alone holds no password."""
    docs = rendered["default"]
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    here = _mount_here(server, pod, docs, tmp_path)
    ini_path = Path(here("/etc/mlflow-auth/basic_auth.ini"))
    ini_path.write_text(here(ini_path.read_text()))  # its database path lies under a mount too
    secret = _decoded(_named(docs, "Secret", AUTH_SECRET))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    for e in server["env"]:
        if e["name"].startswith(("MLFLOW_AUTH_", "MLFLOW_FLASK_")):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            env[e["name"]] = secret[ref["key"]] if ref else here(e["value"])
    script = (
        "import json, os\n"
        "from mlflow.server.auth import auth_config, bootstrap_admin_user, get_flask_server_secret_key, store\n"
        "bootstrap_admin_user(); get_flask_server_secret_key()\n"
        "user = os.environ['MLFLOW_AUTH_ADMIN_USERNAME']\n"
        "print(json.dumps({'db': auth_config.database_uri, 'admin': store.get_user(user).is_admin,\n"
        "                  'login': store.authenticate_user(user, os.environ['MLFLOW_AUTH_ADMIN_PASSWORD']),\n"
        "                  'wrong': store.authenticate_user(user, 'not-the-password-0123')}))\n")
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    db = Path(here("/var/lib/mlflow-auth/basic_auth.db"))
    assert result == {"db": f"sqlite:///{db}", "admin": True, "login": True, "wrong": False}
    assert db.is_file()
    # without the env the ini gives no password: MLflow refuses to create the admin
    env.pop("MLFLOW_AUTH_ADMIN_PASSWORD")
    db.unlink()
    r = subprocess.run([sys.executable, "-c", "from mlflow.server.auth import bootstrap_admin_user\n"
                        "bootstrap_admin_user()"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "needs a password to create the admin user" in r.stderr, r.stderr[-2000:]


def test_generated_auth_secret_is_kept_on_upgrade(tmp_path):
    """`helm upgrade` reads the generated Secret back (lookup) and keeps its password and
    Flask key; the admin user follows the values. Offline, lookup finds nothing, so the
    chart is copied with its lookup replaced by the Secret an earlier install made."""
    copied = tmp_path / "rlhf"
    shutil.copytree(CHART, copied)
    template = copied / "templates" / "mlflow-auth.yaml"
    call = '(lookup "v1" "Secret" .Release.Namespace $name)'
    assert template.read_text().count(call) == 1
    earlier = {"admin-username": "admin", "admin-password": "Kept0password0from0the0install0",
               "flask-secret-key": "Kept0flask0key"}
    found = " ".join(f'"{k}" "{base64.b64encode(v.encode()).decode()}"' for k, v in earlier.items())
    template.write_text(template.read_text().replace(call, f'(dict "data" (dict {found}))'))
    with helm.Chart.load(copied) as upgraded:
        manifests = upgraded.render({"mlflow": {"auth": {"adminUsername": "mlflow-admin"}}}, name=RELEASE,
                                    namespace=NAMESPACE, is_upgrade=True)
    docs = [d for path, text in manifests.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
    data = _decoded(_named(docs, "Secret", AUTH_SECRET))
    assert data == {**earlier, "admin-username": "mlflow-admin"}


def test_an_existing_auth_secret_is_used_as_named(chart):
    """mlflow.auth.existingSecret: no Secret or ini generated; the server takes the admin
    login, the Flask key and the ini from that Secret; the steps log in with its admin keys."""
    values = {"mlflow": {"auth": {"existingSecret": "team-mlflow-admin", "adminPasswordKey": "password"}},
              "schedule": {"enabled": True, "profile": {"inline": {"name": "x"}}}}
    docs = _render(chart, values)
    assert not _of(docs, "Secret") and not _named(docs, "ConfigMap", AUTH_SECRET)
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "team-mlflow-admin",
                                                                                "key": "password"}
    (config,) = [v for v in pod["volumes"] if v["name"] == "auth-config"]
    assert config["secret"] == {"secretName": "team-mlflow-admin", "defaultMode": 0o440,
                                "items": [{"key": "basic_auth.ini", "path": "basic_auth.ini"}]}
    assert not [v for v in pod["volumes"] if v["name"] == "auth-db"]  # its ini names the database
    profile = yaml.safe_load(_named(docs, "ConfigMap", PROFILE_CONFIG_MAP)["data"]["profile.yaml"])
    assert profile["secrets"] == [{"name": "team-mlflow-admin", "env": {"MLFLOW_TRACKING_USERNAME": "admin-username",
                                                                       "MLFLOW_TRACKING_PASSWORD": "password"}}]
    for doc in docs:
        _validate(doc)


def test_shared_auth_database_is_written_into_the_ini_at_start(rendered, tmp_path):
    """EKS: two replicas with the generated admin Secret and a shared users database
    whose URL (password included) is in a Secret. The ConfigMap's ini has no
    database_uri; the server's auth-config init container, run here as rendered, writes
    the ini with the URL into a memory-backed emptyDir, owner-only, '%' doubled so that
    MLflow's configparser reads the URL back unchanged."""
    docs = rendered["eks"]
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    assert _one(docs, "Deployment")["spec"]["replicas"] == 2
    assert "database_uri" not in _named(docs, "ConfigMap", AUTH_SECRET)["data"]["basic_auth.ini"]
    (init,) = pod["initContainers"]
    assert init["name"] == "auth-config" and init["command"] == ["python", "-c"]
    env = {e["name"]: e for e in init["env"]}
    assert env["MLFLOW_AUTH_DATABASE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "rlhf-mlflow-auth-db", "key": "uri"}
    here = _mount_here(init, pod, docs, tmp_path)
    url = "postgresql://mlflow:p%40ss%25word@auth-db.internal:5432/mlflow_auth"
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    run_env.update({name: here(e["value"]) for name, e in env.items() if "value" in e})
    run_env["MLFLOW_AUTH_DATABASE_URI"] = url
    r = subprocess.run([sys.executable, "-c", here(init["args"][0])], env=run_env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    written = Path(here("/etc/mlflow-auth/basic_auth.ini"))
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    ini = configparser.ConfigParser()  # as mlflow.server.auth.config.read_auth_config reads it
    ini.read(written)
    assert ini["mlflow"]["database_uri"] == url
    assert ini["mlflow"]["admin_username"] == "admin" and "admin_password" not in ini["mlflow"]
    # the server reads that file; no per-pod database
    (server,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for m in server["volumeMounts"] if m["mountPath"] == "/etc/mlflow-auth"]
    assert volumes[mount["name"]]["emptyDir"]["medium"] == "Memory" and mount["readOnly"] is True
    assert "auth-db" not in volumes


@pytest.mark.parametrize("values, words", [
    ({"mlflow": {"replicas": 3}},
     "users database is a sqlite file in each MLflow pod (mlflow.auth.database.existingSecret is empty), "
     "so mlflow.replicas=3 would give every replica its own users"),
    ({"mlflow": {"auth": {"existingSecret": "team-admin", "database": {"existingSecret": "db", "key": "uri"}}}},
     "names its own database_uri; set one of the two"),
])
def test_auth_database_mistakes_fail_clearly(chart, values, words):
    with pytest.raises(helm.HelmError, match=re.escape(words)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_more_replicas_with_a_named_database_or_without_auth(chart):
    """The sqlite check is about the per-pod database only."""
    for auth in ({"database": {"existingSecret": "auth-db", "key": "uri"}}, {"existingSecret": "team-admin"},
                 {"enabled": False}):
        docs = _render(chart, {"mlflow": {"replicas": 3, "auth": auth}})
        assert _one(docs, "Deployment")["spec"]["replicas"] == 3


def test_auth_off_is_an_explicit_opt_out(rendered, chart):
    """mlflow.auth.enabled=false: no auth objects, no login for the steps or the Job, and
    NOTES.txt says what that means."""
    docs = rendered["no_auth"]
    assert not _of(docs, "Secret") and not _named(docs, "ConfigMap", AUTH_SECRET)
    profile = yaml.safe_load(_named(docs, "ConfigMap", PROFILE_CONFIG_MAP)["data"]["profile.yaml"])
    assert profile["secrets"] == []
    assert yaml.safe_load((CHART / "values.yaml").read_text())["mlflow"]["auth"]["enabled"] is True
    notes = chart.render(NO_AUTH, name=RELEASE, namespace=NAMESPACE)["rlhf/templates/NOTES.txt"]
    assert "Basic auth is OFF" in notes
    notes = chart.render({}, name=RELEASE, namespace=NAMESPACE)["rlhf/templates/NOTES.txt"]
    assert f"get secret {AUTH_SECRET} -o jsonpath='{{.data.admin-password}}' | base64 -d" in notes


# ----------------------------------------------------------------------------- the scheduled run's profile

# every step that trains, and eval (it runs the policy on GPUs too), by executor
TRAINING_STEPS = {"sft": "exec-train-sft", "reward": "exec-train-reward", "ppo": "exec-train-ppo",
                  "eval": "exec-evaluate"}


def _mount_here(container: dict, pod: dict, docs: list[dict], root: Path):
    """Lay out a rendered container's volume mounts below `root` as the kubelet would:
    each mounted ConfigMap's items written as files, emptyDirs empty. Returns `here`, which
    moves every mount path in a string (an argument, an env value, a script) below root;
    the deepest mount wins, and a path only matches whole (/etc/a is not /etc/a-b)."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_maps = {d["metadata"]["name"]: d["data"] for d in _of(docs, "ConfigMap")}
    paths = sorted((m["mountPath"] for m in container["volumeMounts"]), key=len, reverse=True)
    mount_path = re.compile("(" + "|".join(map(re.escape, paths)) + r")(?=[/\"'\s]|$)")

    def here(text: str) -> str:
        return mount_path.sub(lambda m: str(root / m.group(1).lstrip("/")), text)

    for m in container["volumeMounts"]:
        where = Path(here(m["mountPath"]))
        where.mkdir(parents=True, exist_ok=True)
        source = volumes[m["name"]]
        if "configMap" in source:
            data = config_maps[source["configMap"]["name"]]
            for item in source["configMap"].get("items") or [{"key": k, "path": k} for k in data]:
                (where / item["path"]).write_text(data[item["key"]])
        else:
            assert "emptyDir" in source, m  # scratch starts empty
    return here


def _compile_as_the_job(docs: list[dict], tmp_path: Path) -> dict:
    """Run the schedule Job's compile init container here, as rendered: its command and
    args and literal env (RLHF_IMAGE as the Job sets it), with only the paths under its
    mounts moved below tmp_path (`_mount_here`). `rlhf` is this interpreter's CLI.
    Returns the compiled spec's two documents (pipeline, platform)."""
    job = _one(docs, "Job")["spec"]["template"]["spec"]
    (step,) = job["initContainers"]
    here = _mount_here(step, job, docs, tmp_path)
    argv = [here(a) for a in step["command"] + step["args"]]
    assert argv[0] == "rlhf"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLHF_", "MLFLOW_", "AWS_"))}
    env.update({e["name"]: here(e["value"]) for e in step["env"] if "value" in e})
    r = subprocess.run([sys.executable, "-m", "rlhf.cli", *argv[1:]], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    pipeline, platform = yaml.safe_load_all(Path(argv[argv.index("--output") + 1]).read_text())
    return pipeline, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _login_refs(executor: dict) -> dict[str, tuple[str, str]]:
    """A compiled step's MLflow login: env var -> (Secret, key) of its secretAsEnv."""
    return {e["envVar"]: (s["secretName"], e["secretKey"]) for s in executor.get("secretAsEnv", [])
            for e in s["keyToEnv"] if e["envVar"] in LOGIN_VARS}


def test_scheduled_run_places_every_training_step(rendered, tmp_path):
    """The GKE release's schedule Job, its compile step run as rendered: every training
    step of the pipeline it schedules has its GPUs, node pool, GPU toleration, /dev/shm,
    the S3 and MLflow Secrets by reference, this release's MLflow, and the hardening."""
    from rlhf.ops.profiles import MULTI_NODE_STAGES

    assert set(MULTI_NODE_STAGES) <= set(TRAINING_STEPS)  # every stage that trains is checked
    pipeline, k8s = _compile_as_the_job(rendered["gke"], tmp_path)
    executors = pipeline["deploymentSpec"]["executors"]
    profile = CASES["gke"]["schedule"]["profile"]
    secrets = {s["name"]: s["env"] for s in profile["secrets"]}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD"} <= {var for env in secrets.values() for var in env}
    for stage, ex in TRAINING_STEPS.items():
        want, container, cfg = profile["inline"]["stages"][stage], executors[ex]["container"], k8s[ex]
        assert container["image"] == CASES["gke"]["image"]["repository"] + ":0.1.0", stage  # RLHF_IMAGE of the Job
        res = container["resources"]
        assert res["accelerator"]["resourceType"] == "nvidia.com/gpu", stage
        assert int(res["accelerator"]["resourceCount"]) == want["accelerator_count"] > 0, stage
        assert res["resourceMemoryRequest"] == want["memory_request"], stage
        assert cfg["nodeSelector"]["labels"] == want["node_selector"], stage
        assert cfg["tolerations"] == want["tolerations"], stage
        (shm,) = [m for m in cfg["emptyDirMounts"] if m["mountPath"] == "/dev/shm"]
        assert (shm["medium"], shm["sizeLimit"]) == ("Memory", want["shm_size"]), stage
        assert {s["secretName"]: {e["envVar"]: e["secretKey"] for e in s["keyToEnv"]}
                for s in cfg["secretAsEnv"]} == secrets, stage
        # MLflow's basic auth: the profile's client login, so the chart added none of its own
        assert _login_refs(cfg) == {"MLFLOW_TRACKING_USERNAME": ("rlhf-mlflow-client", "username"),
                                    "MLFLOW_TRACKING_PASSWORD": ("rlhf-mlflow-client", "password")}, stage
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["MLFLOW_TRACKING_URI"] == f"http://{RELEASE}-mlflow.{NAMESPACE}.svc.cluster.local:5000", stage
        assert env["AWS_ENDPOINT_URL_S3"] == "https://storage.googleapis.com", stage
        assert cfg["podMetadata"]["labels"] == {"rlhf-pipeline/step": "true"}, stage
        assert cfg["securityContext"] == {"runAsUser": "10001", "runAsGroup": "10001", "runAsNonRoot": True}, stage
    # PPO on the H100 pool; the light steps on the CPU pool, without GPUs
    assert k8s["exec-train-ppo"]["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert k8s["exec-start-run"]["nodeSelector"]["labels"] == {"cloud.google.com/gke-nodepool": "cpu-pool"}
    assert "accelerator" not in executors["exec-start-run"]["container"].get("resources", {})
    print("\ncompiled SFT step of the scheduled GKE run:\n" + yaml.safe_dump({
        "deploymentSpec.executors.exec-train-sft.container": {
            k: v for k, v in executors["exec-train-sft"]["container"].items() if k in ("image", "env", "resources")},
        "platforms.kubernetes.deploymentSpec.executors.exec-train-sft": k8s["exec-train-sft"]}, sort_keys=False))


def test_scheduled_run_logs_in_with_the_generated_secret(rendered, tmp_path):
    """The EKS release (auth on, Secret generated, a profile without an MLflow login): every
    step of the pipeline its schedule Job compiles reads MLFLOW_TRACKING_USERNAME/PASSWORD
    from the generated Secret's admin keys, by reference."""
    pipeline, k8s = _compile_as_the_job(rendered["eks"], tmp_path)
    assert set(TRAINING_STEPS.values()) <= set(k8s)
    for ex in pipeline["deploymentSpec"]["executors"]:
        assert _login_refs(k8s[ex]) == {"MLFLOW_TRACKING_USERNAME": (AUTH_SECRET, "admin-username"),
                                        "MLFLOW_TRACKING_PASSWORD": (AUTH_SECRET, "admin-password")}, ex


def test_schedule_profile_from_an_existing_config_map(chart, tmp_path):
    """schedule.profile.existingConfigMap: that ConfigMap's key mounted as the same file
    (the Job's command does not change), nothing rendered in its place; and the pipeline
    compiled through it has the profile's placement."""
    values = copy.deepcopy(SCHEDULED)
    values["schedule"]["profile"] = {"existingConfigMap": {"name": "team-gpu-profile", "key": "gke.yaml"},
                                     "secrets": []}
    docs = _render(chart, values)
    assert not _named(docs, "ConfigMap", PROFILE_CONFIG_MAP)
    job = _one(docs, "Job")["spec"]["template"]["spec"]
    (compile_step,) = job["initContainers"]
    assert compile_step["command"] + compile_step["args"] == COMPILE_ARGV
    (mount,) = [m for m in compile_step["volumeMounts"] if m["name"] == "profile"]
    assert (mount["mountPath"], mount["readOnly"]) == ("/etc/rlhf/profile", True)
    (volume,) = [v for v in job["volumes"] if v["name"] == "profile"]
    assert volume["configMap"] == {"name": "team-gpu-profile", "items": [{"key": "gke.yaml", "path": "profile.yaml"}]}
    for doc in docs:
        _validate(doc)
    # the ConfigMap as a user would create it: kubectl create configmap team-gpu-profile --from-file=gke.yaml=...
    existing = {"kind": "ConfigMap", "metadata": {"name": "team-gpu-profile"},
                "data": {"gke.yaml": (ROOT / "profiles" / "gke.yaml").read_text()}}
    _, k8s = _compile_as_the_job(docs + [existing], tmp_path)
    assert k8s["exec-train-ppo"]["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert {s["secretName"] for s in k8s["exec-train-sft"]["secretAsEnv"]} == {"rlhf-s3", "rlhf-mlflow",
                                                                               "rlhf-mlflow-auth"}


def test_inline_profile_gets_the_release_defaults(rendered):
    """What the chart adds to an inline profile that leaves it unset, and what it never overrides."""
    from rlhf.ops.profiles import Profile

    data = yaml.safe_load(_named(rendered["scheduled"], "ConfigMap", PROFILE_CONFIG_MAP)["data"]["profile.yaml"])
    profile = Profile.model_validate(data)  # a valid profile for `rlhf compile`
    assert profile.service_account == "rlhf-pipeline-runner" and profile.run_as_user == 10001
    assert profile.env["MLFLOW_TRACKING_URI"] == f"http://{RELEASE}-mlflow.{NAMESPACE}.svc.cluster.local:5000"
    # the profile's Secrets, then the MLflow login: the auth Secret's admin keys
    assert [(s.name, s.env) for s in profile.secrets] == [
        ("rlhf-s3", {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}),
        ("mlflow-admin", {"MLFLOW_TRACKING_USERNAME": "admin-username", "MLFLOW_TRACKING_PASSWORD": "admin-password"})]
    assert profile.stages["ppo"].accelerator_count == 1
    # a tracking URI from a Secret (or the profile's env) is left alone
    values = copy.deepcopy(SCHEDULED)
    values["schedule"]["profile"]["secrets"].append({"name": "mlflow-uri", "env": {"MLFLOW_TRACKING_URI": "uri"}})
    values["imagePullSecrets"] = ["ghcr-pull"]
    with helm.Chart.load(CHART) as chart:
        cm = _named(_render(chart, values), "ConfigMap", PROFILE_CONFIG_MAP)
    data = yaml.safe_load(cm["data"]["profile.yaml"])
    assert "MLFLOW_TRACKING_URI" not in data.get("env", {}) and data["image_pull_secrets"] == ["ghcr-pull"]


@pytest.mark.parametrize("profile, words", [
    ({}, "needs a cluster profile"),
    ({"inline": {"name": "x"}, "existingConfigMap": {"name": "cm", "key": "p.yaml"}}, "not both"),
    ({"existingConfigMap": {"name": "cm", "key": "p.yaml"}, "secrets": [{"name": "s", "env": {"A": "b"}}]},
     "inline profile only"),
])
def test_schedule_profile_mistakes_fail_clearly(chart, profile, words):
    with pytest.raises(helm.HelmError, match=words):
        chart.render({"schedule": {"enabled": True, "profile": profile}}, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize("profile, field", [
    ({"inline": {"stages": {"ppo": {"acelerator_count": 8}}}}, "additional properties 'acelerator_count'"),
    ({"inline": {"defaults": {"cpu_request": 8}}}, "/schedule/profile/inline/defaults/cpu_request"),
    ({"inline": {"stages": {"ppo": {"memory_request": "lots"}}}}, "/schedule/profile/inline/stages/ppo/memory_request"),
    ({"inline": {"stages": {"trainer": {}}}}, "additional properties 'trainer'"),
    ({"inline": {"env": {"AWS_SECRET_ACCESS_KEY": "abc"}}}, "/schedule/profile/inline/env"),
    ({"inline": {"env": {"MLFLOW_TRACKING_URI": "http://u:p@mlflow:5000"}}}, "/schedule/profile/inline/env"),
    ({"secrets": [{"name": "rlhf-s3"}]}, "/schedule/profile/secrets/0"),
    ({"existingConfigMap": {"name": "Team_Profile", "key": "p.yaml"}}, "/schedule/profile/existingConfigMap/name"),
])
def test_schema_rejects_bad_profiles(chart, profile, field):
    with pytest.raises(helm.HelmValuesError, match=re.escape(field)):
        chart.validate_schema({"schedule": {"profile": profile}})


def test_profile_schema_matches_the_profile_model(chart):
    """The chart's profile schema and rlhf.ops.profiles name the same fields, and every
    example profile passes the chart's schema as an inline profile."""
    from rlhf.ops.profiles import STAGES, Profile, SecretEnv, StageSpec, Toleration

    defs = json.loads((CHART / "values.schema.json").read_text())["definitions"]
    for name, model in (("profile", Profile), ("profileStage", StageSpec), ("profileSecret", SecretEnv),
                        ("profileToleration", Toleration)):
        assert set(defs[name]["properties"]) == set(model.model_fields), name
    assert set(defs["profile"]["properties"]["stages"]["properties"]) == set(STAGES)
    for path in sorted((ROOT / "profiles").glob("*.yaml")):
        chart.validate_schema({"schedule": {"profile": {"inline": yaml.safe_load(path.read_text())}}})
    for case in ("gke", "eks"):  # and the example releases' profiles are valid profiles
        Profile.model_validate(CASES[case]["schedule"]["profile"]["inline"])


# ----------------------------------------------------------------------------- hardened step pods


def test_step_pod_policy_adds_what_kfp_cannot(rendered):
    """The MutatingAdmissionPolicy that gives KFP step pods (selected by the label the
    compiler puts on every step) what kfp-kubernetes cannot: the same container settings
    Trainer pods get from their TrainJob, and the pod's seccomp profile."""
    from rlhf.ops.profiles import STEP_LABEL
    from rlhf.ops.trainjob import HARDENED_CONTAINER

    policy = _one(rendered["scheduled"], "MutatingAdmissionPolicy")
    binding = _one(rendered["scheduled"], "MutatingAdmissionPolicyBinding")
    assert policy["apiVersion"] == binding["apiVersion"] == "admissionregistration.k8s.io/v1beta1"
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    match = binding["spec"]["matchResources"]
    assert match["objectSelector"] == {"matchLabels": dict([STEP_LABEL])}
    assert match["namespaceSelector"]["matchExpressions"] == [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": [NAMESPACE]}]
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail" and spec["reinvocationPolicy"] == "IfNeeded"
    assert spec["matchConstraints"]["resourceRules"] == [
        {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}]
    apply, patch = spec["mutations"]
    assert (apply["patchType"], patch["patchType"]) == ("ApplyConfiguration", "JSONPatch")
    merged = re.sub(r"\s+", " ", apply["applyConfiguration"]["expression"])
    assert merged.count('seccompProfile{type: "RuntimeDefault"}') == 3  # the pod, containers, init containers
    for setting in ("allowPrivilegeEscalation: false", "readOnlyRootFilesystem: true"):
        assert merged.count(setting) == 2, setting  # containers and init containers
    assert {k: v for k, v in HARDENED_CONTAINER.items() if k != "capabilities"} == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "seccompProfile": {"type": "RuntimeDefault"}}
    jsonpatch = re.sub(r"\s+", " ", patch["jsonPatch"]["expression"])
    assert HARDENED_CONTAINER["capabilities"] == {"drop": ["ALL"]}
    assert jsonpatch.count('capabilities{drop: ["ALL"]}') == 2
    for where in ("containers", "initContainers"):
        assert f'"/spec/{where}/" + string(i) + "/securityContext/capabilities"' in jsonpatch
    assert {v["name"] for v in spec["variables"]} == {"indices", "initIndices"}


@pytest.mark.parametrize("setting, api_version", [
    ({"enabled": "auto"}, None),  # offline `helm template` serves no such API: nothing rendered
    ({"enabled": False}, None),
    ({"enabled": True, "apiVersion": "admissionregistration.k8s.io/v1"}, "admissionregistration.k8s.io/v1"),
])
def test_step_pod_policy_switch(chart, setting, api_version):
    values = copy.deepcopy(CASES["gke"])
    values["stepPodSecurity"] = {"admissionPolicy": setting}
    docs = _render(chart, values)
    found = [d for d in docs if d["kind"].startswith("MutatingAdmissionPolicy")]
    if api_version is None:
        assert not found
        return
    assert {d["apiVersion"] for d in found} == {api_version} and len(found) == 2
    for doc in found:
        _validate(doc)
    binding = next(d for d in found if d["kind"] == "MutatingAdmissionPolicyBinding")
    # the release's namespace and the KFP namespace of the recurring run
    assert binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0]["values"] == [
        NAMESPACE, "rlhf"]


def test_schema_rejects_a_bad_policy_switch(chart):
    with pytest.raises(helm.HelmValuesError, match="/stepPodSecurity/admissionPolicy/enabled"):
        chart.validate_schema({"stepPodSecurity": {"admissionPolicy": {"enabled": "yes"}}})
