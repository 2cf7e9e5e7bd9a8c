"""Multi-node stages as Kubeflow Trainer jobs (rlhf.ops.trainjob).

- the spec compiled into the pipeline, from a profile (names of Secrets, never values);
- the compiled pipeline: the PPO step launches, with RLHF_TRAINJOB and no GPU;
- the TrainJob the SDK's Kubernetes backend would send, built by the real backend
  against an in-process stand-in for the Kubernetes API, validated by the SDK's own
  typed models; the same stand-in runs a job to completion and to a failure;
- a real job on the SDK's LocalProcessBackend: torchrun starts the processes;
- the watcher's error paths (timeout, lost API, failed submission) with a fake client.

No cluster and no network.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest
import yaml

from rlhf.cli import main
from rlhf.ops.profiles import Profile, load_profile
from rlhf.adapters.settings import Settings
from rlhf.ops.trainjob import (HARDENED_CONTAINER, TrainJobError, TrainJobSpec, _kubernetes_trainer, node_command,
                               run_trainjob, secret_env, trainjob_spec)

NAMESPACE = "ml-team"
PROFILE = """
name: two-h100-nodes
image: registry.example/rlhf:0.1.0
image_pull_secrets: [ghcr]
service_account: rlhf-pipeline-runner
secrets:
  - name: rlhf-s3
    env: {AWS_ACCESS_KEY_ID: access-key, AWS_SECRET_ACCESS_KEY: secret-key}
  - name: rlhf-mlflow
    env: {MLFLOW_TRACKING_URI: tracking-uri}
env: {RLHF_ARTIFACT_ROOT: s3://bucket/runs}
defaults: {cpu_request: "2", memory_request: 8Gi, node_selector: {pool: cpu}}
stages:
  sft: {accelerator_count: 1, node_selector: {pool: a100}}
  ppo:
    nodes: 2
    accelerator_type: nvidia.com/gpu
    accelerator_count: 8
    cpu_request: "96"
    memory_request: 1000Gi
    shm_size: 128Gi
    timeout_s: 7200
    node_selector: {pool: h100}
    tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
"""
REQUEST = {"name": "ppo", "run_root": "s3://bucket/runs/r1", "dataset_root": "s3://bucket/runs/_datasets/k",
           "parent_run_id": "abc", "options": {}, "quiet": True, "tracking": True, "config_json": "{}"}
"""The one request shape of a stage's worker processes (rlhf.dispatch.StageRequest plus the config)."""


@pytest.fixture
def profile(tmp_path) -> Profile:
    path = tmp_path / "profile.yaml"
    path.write_text(PROFILE)
    return load_profile(path)


@pytest.fixture
def spec(profile) -> TrainJobSpec:
    return trainjob_spec(profile, "ppo")


# ----------------------------------------------------------------------------- spec and profile


def test_spec_from_profile(spec):
    assert (spec.stage, spec.nodes, spec.runtime, spec.image) == ("ppo", 2, "torch-distributed",
                                                                  "registry.example/rlhf:0.1.0")
    assert (spec.accelerator_type, spec.accelerator_count, spec.procs_per_node) == ("nvidia.com/gpu", 8, 8)
    assert (spec.cpu, spec.memory, spec.shm_size, spec.timeout_s) == ("96", "1000Gi", "128Gi", 7200)
    assert spec.node_selector == {"pool": "h100"}  # the stage's pool, not the defaults'
    assert [t.model_dump(exclude_none=True) for t in spec.tolerations] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert (spec.image_pull_secrets, spec.run_as_user, spec.service_account) == (["ghcr"], 10001,
                                                                                 "rlhf-pipeline-runner")
    assert spec.env == {"RLHF_ARTIFACT_ROOT": "s3://bucket/runs"}
    # Secrets by reference only: one secretKeyRef per variable, never a value
    assert secret_env(spec) == [
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "rlhf-s3", "key": "access-key"}}},
        {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "rlhf-s3", "key": "secret-key"}}},
        {"name": "MLFLOW_TRACKING_URI", "valueFrom": {"secretKeyRef": {"name": "rlhf-mlflow", "key": "tracking-uri"}}},
    ]
    # what RLHF_TRAINJOB carries reads back to the same spec
    assert TrainJobSpec.model_validate_json(spec.model_dump_json()) == spec


@pytest.mark.parametrize("runtime", ["torch-distributed", "deepspeed-distributed"])
def test_every_trainjob_pod_is_hardened(spec, runtime):
    """Each replicated job's pods (torch: `node`; MPI: `launcher` and `node`) carry the full
    security context, the scratch emptyDirs, the step label, and /dev/shm only when asked."""
    pytest.importorskip("kubeflow.trainer", reason="the kubeflow SDK is in the `cluster` and `test` extras")
    for shm in ("64Gi", None):
        job = spec.model_copy(update={"runtime": runtime, "shm_size": shm})
        _, _, options = _kubernetes_trainer(REQUEST, job, Settings.from_env({}), "ppo-test")
        patch = next(o for o in options if type(o).__name__ == "RuntimePatch")
        rjobs = patch.training_runtime_spec.template.spec.replicated_jobs
        assert [r.name for r in rjobs] == (["node"] if runtime == "torch-distributed" else ["launcher", "node"])
        for rjob in rjobs:
            template = rjob.template.spec.template
            assert template.metadata == {"labels": {"rlhf-pipeline/step": "true"}}
            pod = template.spec
            assert pod.security_context["seccompProfile"] == {"type": "RuntimeDefault"}
            assert pod.security_context["runAsNonRoot"] is True
            (node,) = pod.containers
            sc = node.security_context
            assert sc["capabilities"] == {"drop": ["ALL"]} and sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True and sc["seccompProfile"] == {"type": "RuntimeDefault"}
            mounts = {m["mountPath"]: m["name"] for m in node.volume_mounts}
            volumes = {v["name"]: v["emptyDir"] for v in pod.volumes}
            assert {"/tmp", "/home/rlhf"} <= set(mounts) and all(mounts[p] in volumes for p in mounts)
            assert ("/dev/shm" in mounts) == (shm is not None)
            if shm:
                assert volumes["dshm"] == {"medium": "Memory", "sizeLimit": shm}
        # each job gets its own copy: changing one patch cannot leak into the next job
        pod.containers[0].security_context["readOnlyRootFilesystem"] = False
    assert HARDENED_CONTAINER["readOnlyRootFilesystem"] is True


def test_spec_needs_a_training_stage(profile):
    with pytest.raises(ValueError, match="only sft, reward, ppo"):
        trainjob_spec(profile, "eval")


def test_node_command_torchrun(spec):
    # torchrun on every node; its place in the job from the Trainer torch plugin's PET_* env
    assert node_command(spec) == [
        "python", "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=8",
        "--node_rank=$(PET_NODE_RANK)", "--master_addr=$(PET_MASTER_ADDR)", "--master_port=$(PET_MASTER_PORT)",
        "-m", "rlhf.ops.worker"]


def test_node_command_deepspeed_runtime(spec):
    ds = spec.model_copy(update={"runtime": "deepspeed-distributed"})
    bash, flag, script = node_command(ds)
    assert (bash, flag) == ("bash", "-c")
    subprocess.run(["bash", "-n", "-c", script], check=True)  # valid shell
    assert "exec mpirun --hostfile /etc/mpi/hostfile" in script
    for var in ("RLHF_STAGE_REQUEST", "MASTER_ADDR", "MASTER_PORT", "RLHF_ARTIFACT_ROOT", "AWS_SECRET_ACCESS_KEY"):
        assert f"-x {var} " in script  # forwarded by name: values never appear in the command
    assert "RANK=$OMPI_COMM_WORLD_RANK" in script and "exec python -m rlhf.ops.worker" in script


# ----------------------------------------------------------------------------- compiled pipeline


def test_compiled_pipeline_launches_ppo_as_a_trainjob(profile, tmp_path):
    path, out = tmp_path / "profile.yaml", tmp_path / "pipeline.yaml"
    assert main(["compile", "--profile", str(path), "--output", str(out)]) == 0
    text = out.read_text()
    spec, platform = list(yaml.safe_load_all(text))
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]

    ppo = executors["exec-train-ppo"]["container"]
    env = {e["name"]: e["value"] for e in ppo["env"]}
    assert TrainJobSpec.model_validate_json(env["RLHF_TRAINJOB"]) == trainjob_spec(profile, "ppo")
    assert env["RLHF_IMAGE"] == ppo["image"] == "registry.example/rlhf:0.1.0"
    # the launcher step: no GPU (they belong to the job's pods), a modest CPU and memory,
    # the light steps' pool, no GPU tolerations or /dev/shm, a deadline past the job's
    assert "accelerator" not in ppo["resources"]
    assert (ppo["resources"]["resourceCpuRequest"], ppo["resources"]["resourceMemoryLimit"]) == ("1", "4Gi")
    assert k8s["exec-train-ppo"]["nodeSelector"]["labels"] == {"pool": "cpu"}
    assert "tolerations" not in k8s["exec-train-ppo"]
    assert {m["mountPath"] for m in k8s["exec-train-ppo"]["emptyDirMounts"]} == {"/tmp", "/home/rlhf"}  # scratch only
    assert k8s["exec-train-ppo"]["podMetadata"]["labels"] == {"rlhf-pipeline/step": "true"}  # hardened like any step
    assert int(k8s["exec-train-ppo"]["activeDeadlineSeconds"]) > 7200
    # it reads the store: the Secrets stay on it, by reference
    assert {s["secretName"] for s in k8s["exec-train-ppo"]["secretAsEnv"]} == {"rlhf-s3", "rlhf-mlflow"}
    # single-node steps are untouched
    sft = executors["exec-train-sft"]["container"]
    assert int(sft["resources"]["accelerator"]["resourceCount"]) == 1
    assert all(e["name"] != "RLHF_TRAINJOB" for ex in executors.values() if ex is not executors["exec-train-ppo"]
               for e in ex["container"].get("env", []))
    # no secret value anywhere: RLHF_TRAINJOB names Secrets and keys, nothing else
    job = json.loads(env["RLHF_TRAINJOB"])
    assert job["secrets"][0] == {"name": "rlhf-s3", "env": {"AWS_ACCESS_KEY_ID": "access-key",
                                                           "AWS_SECRET_ACCESS_KEY": "secret-key"}}
    assert "valueFrom" not in text and "AKIA" not in text


# ----------------------------------------------------------------------------- the Kubernetes backend


class _Async:
    """What the kubernetes client returns for async_req=True."""

    def __init__(self, value=None, error=None):
        self.value, self.error = value, error

    def get(self, timeout=None):
        if self.error:
            raise self.error
        return self.value


TORCH_RUNTIME = {  # the Trainer's torch-distributed ClusterTrainingRuntime, as the API returns it
    "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime",
    "metadata": {"name": "torch-distributed", "labels": {"trainer.kubeflow.org/framework": "torch"}},
    "spec": {"mlPolicy": {"numNodes": 1, "torch": {"numProcPerNode": "auto"}},
             "template": {"spec": {"replicatedJobs": [{
                 "name": "node",
                 "template": {"metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                              "spec": {"template": {"spec": {"containers": [
                                  {"name": "node", "image": "pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime"}]}}}}}]}}},
}


class FakeCluster:
    """Just enough of the Kubernetes API (CustomObjectsApi + CoreV1Api) for the SDK's
    KubernetesBackend: it keeps the TrainJob it is sent and plays `states` back, one
    per TrainJob read (the last one stays). A state: ({pod step: phase}, condition)."""

    def __init__(self, states, logs):
        self.states, self.logs = states, logs
        self.created, self.deleted, self.reads = None, [], 0

    def _state(self):
        return self.states[min(self.reads // 3, len(self.states) - 1)]  # each held for 3 reads (a poll makes <= 2)

    # CustomObjectsApi
    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        assert (group, version, namespace, plural) == ("trainer.kubeflow.org", "v1alpha1", NAMESPACE, "trainjobs")
        self.created = body
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, async_req=False):
        from kubernetes.client import ApiException

        if plural == "trainingruntimes":  # no namespaced runtime: the SDK falls back to the cluster's
            return _Async(error=ApiException(status=404))
        assert plural == "trainjobs" and name == self.created["metadata"]["name"]
        _, condition = self._state()
        job = json.loads(json.dumps(self.created))
        job["metadata"].update(namespace=NAMESPACE, creationTimestamp="2025-01-01T00:00:00Z")
        if condition:
            job["status"] = {"conditions": [{"type": condition[0], "status": "True", "reason": condition[1],
                                             "message": condition[2], "lastTransitionTime": "2025-01-01T00:10:00Z"}]}
        if not async_req:
            return job
        self.reads += 1
        return _Async(job)

    def get_cluster_custom_object(self, group, version, plural, name, async_req=False):
        assert (plural, name) == ("clustertrainingruntimes", "torch-distributed")
        return _Async(TORCH_RUNTIME)

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.deleted.append(name)

    # CoreV1Api
    def list_namespaced_pod(self, namespace, label_selector, async_req=False):
        name = self.created["metadata"]["name"]
        assert f"jobset.sigs.k8s.io/jobset-name={name}" in label_selector
        phases, _ = self._state()
        pods = [{"metadata": {"name": f"{name}-node-0-{i}-abcde", "creationTimestamp": "2025-01-01T00:00:00Z",
                              "labels": {"jobset.sigs.k8s.io/replicatedjob-name": "node",
                                         "batch.kubernetes.io/job-completion-index": str(i)}},
                 "spec": {"containers": [{"name": "node", "image": "x",
                                          "resources": {"limits": {"nvidia.com/gpu": "8"}}}]},
                 "status": {"phase": phase}}
                for i, phase in enumerate(phases.values())]
        return _Async(SimpleNamespace(to_dict=lambda: {"items": pods}))

    def read_namespaced_pod_log(self, name, namespace, container):
        assert container == "node"
        return self.logs[int(name.split("-node-0-")[1].split("-")[0])]

    def list_namespaced_event(self, namespace, async_req=False):
        name = self.created["metadata"]["name"]
        event = SimpleNamespace(metadata=SimpleNamespace(), message="Back-off restarting failed container",
                                reason="BackOff", first_timestamp=datetime(2025, 1, 1, tzinfo=timezone.utc),
                                involved_object=SimpleNamespace(kind="Pod", name=f"{name}-node-0-1-abcde"))
        return _Async(SimpleNamespace(items=[event]))


def kubernetes_client(cluster: FakeCluster):
    """A TrainerClient whose KubernetesBackend talks to `cluster` (no kubeconfig, no network)."""
    from kubeflow.trainer import TrainerClient
    from kubeflow.trainer.backends.kubernetes.backend import KubernetesBackend

    backend = KubernetesBackend.__new__(KubernetesBackend)
    backend.namespace, backend.custom_api, backend.core_api = NAMESPACE, cluster, cluster
    client = TrainerClient.__new__(TrainerClient)
    client.backend = backend
    return client


PENDING = ({"node-0": "Pending", "node-1": "Pending"}, None)
RUNNING = ({"node-0": "Running", "node-1": "Running"}, None)


def test_submitted_trainjob_is_valid_and_complete(spec, capsys):
    pytest.importorskip("kubeflow.trainer", reason="the kubeflow SDK is in the `cluster` and `test` extras")
    from kubeflow_trainer_api import models

    cluster = FakeCluster([PENDING, RUNNING, ({"node-0": "Succeeded", "node-1": "Succeeded"},
                                              ("Complete", "JobsCompleted", "TrainJob completed"))],
                          logs=["rank 0: ppo update 1/2\nrank 0: ppo update 2/2", "rank 8: ready"])
    name = run_trainjob(REQUEST, spec.model_dump(), Settings.from_env({}), client=kubernetes_client(cluster),
                        poll_s=0.001)

    body = cluster.created
    # the SDK's typed models (generated from the Trainer's CRDs) accept it, and it round-trips
    job = models.TrainerV1alpha1TrainJob.from_dict(body)
    assert job.to_dict() == body
    assert (body["apiVersion"], body["kind"], body["metadata"]["name"]) == ("trainer.kubeflow.org/v1alpha1",
                                                                            "TrainJob", name)
    assert name.startswith("ppo-") and body["metadata"]["labels"]["rlhf/stage"] == "ppo"
    assert body["spec"]["runtimeRef"] == {"name": "torch-distributed", "kind": "ClusterTrainingRuntime"}
    assert body["spec"]["activeDeadlineSeconds"] == 7200

    trainer = body["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (2, 8, "registry.example/rlhf:0.1.0")
    per_node = {"cpu": "96", "memory": "1000Gi", "nvidia.com/gpu": "8"}
    assert trainer["resourcesPerNode"] == {"requests": per_node, "limits": per_node}
    assert trainer["command"] == node_command(spec)
    env = {e["name"]: e for e in trainer["env"]}
    assert json.loads(env["RLHF_STAGE_REQUEST"]["value"]) == REQUEST
    assert env["RLHF_ARTIFACT_ROOT"]["value"] == "s3://bucket/runs"
    for var, (secret, key) in {"AWS_ACCESS_KEY_ID": ("rlhf-s3", "access-key"),
                               "AWS_SECRET_ACCESS_KEY": ("rlhf-s3", "secret-key"),
                               "MLFLOW_TRACKING_URI": ("rlhf-mlflow", "tracking-uri")}.items():
        assert "value" not in env[var], var
        assert env[var]["valueFrom"] == {"secretKeyRef": {"name": secret, "key": key}}, var

    # placement: one runtime patch for the `node` pods
    (patch,) = body["spec"]["runtimePatches"]
    assert patch["manager"] == "trainer.kubeflow.org/kubeflow-sdk"
    (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = rjob["template"]["spec"]["template"]["spec"]
    assert rjob["name"] == "node"
    assert pod["nodeSelector"] == {"pool": "h100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["imagePullSecrets"] == [{"name": "ghcr"}]
    assert pod["serviceAccountName"] == "rlhf-pipeline-runner"
    # hardened: non-root, RuntimeDefault seccomp, no capabilities, no escalation, a read-only
    # root with emptyDirs where the code writes (/tmp, HOME), and the label the chart's policy selects
    assert pod["securityContext"] == {"runAsUser": 10001, "runAsGroup": 10001, "runAsNonRoot": True,
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    assert pod["volumes"] == [{"name": "rlhf-tmp", "emptyDir": {}}, {"name": "rlhf-home", "emptyDir": {}},
                              {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "128Gi"}}]
    (node,) = pod["containers"]
    assert node["name"] == "node"
    assert node["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                       "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
    assert node["volumeMounts"] == [{"name": "rlhf-tmp", "mountPath": "/tmp"},
                                    {"name": "rlhf-home", "mountPath": "/home/rlhf"},
                                    {"name": "dshm", "mountPath": "/dev/shm"}]
    assert rjob["template"]["spec"]["template"]["metadata"]["labels"] == {"rlhf-pipeline/step": "true"}

    # the step log tells the story: submission, each status change, node-0's lines once
    out = capsys.readouterr().out
    assert f"[trainjob] submitted {name} in namespace {NAMESPACE}: torch-distributed, 2 nodes x 8 nvidia.com/gpu" in out
    assert f"{name}: Created (node-0 Pending, node-1 Pending)" in out
    assert f"{name}: Running (node-0 Running, node-1 Running)" in out
    assert f"{name}: Complete after" in out
    assert out.count("[node-0] rank 0: ppo update 2/2") == 1 and "rank 8" not in out
    assert not cluster.deleted  # a finished job is left for its logs; the Trainer cleans it up


def test_failed_trainjob_names_step_condition_logs_and_kubectl(spec):
    pytest.importorskip("kubeflow.trainer", reason="the kubeflow SDK is in the `cluster` and `test` extras")
    failed = ("Failed", "JobSetFailed", "jobset failed: job node-0 failed: BackoffLimitExceeded")
    cluster = FakeCluster([RUNNING, ({"node-0": "Running", "node-1": "Failed"}, failed)],
                          logs=["rank 0: waiting", "rank 8: Traceback ...\nRuntimeError: CUDA out of memory"])
    with pytest.raises(TrainJobError) as e:
        run_trainjob(REQUEST, spec, Settings.from_env({}), client=kubernetes_client(cluster), poll_s=0.001)
    msg, name = str(e.value), e.value.job_name
    assert msg.startswith(f"Kubeflow Trainer job {NAMESPACE}/{name} failed")
    assert f"failed step: node-1 (pod {name}-node-0-1-abcde)" in msg
    assert "condition: Failed (JobSetFailed): jobset failed: job node-0 failed: BackoffLimitExceeded" in msg
    assert "BackOff: Back-off restarting failed container" in msg
    assert "RuntimeError: CUDA out of memory" in msg  # node-1's log, not node-0's
    assert f"kubectl logs -n {NAMESPACE} -l jobset.sigs.k8s.io/jobset-name={name}" in msg
    assert f"kubectl describe trainjob -n {NAMESPACE} {name}" in msg
    assert not cluster.deleted  # kept, so that its pods' logs can be read


# ----------------------------------------------------------------------------- a real local job


FAKE_WORKER = '''
import json, os, sys
from pathlib import Path

request = json.loads(os.environ["RLHF_STAGE_REQUEST"])
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
print(f"fake worker rank {rank}/{world} master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", flush=True)
if rank == request.get("fail_rank"):
    print(f"rank {rank}: RuntimeError: boom", file=sys.stderr, flush=True)
    sys.exit(3)
Path(request["out"], f"rank-{rank}.json").write_text(json.dumps(
    {"world": world, "local_rank": int(os.environ["LOCAL_RANK"]), "request": request}))
'''


@pytest.fixture
def local_client(tmp_path, monkeypatch):
    """The SDK's LocalProcessBackend, with a stand-in for rlhf.ops.worker on the path."""
    pytest.importorskip("kubeflow.trainer", reason="the kubeflow SDK is in the `cluster` and `test` extras")
    from kubeflow.trainer import LocalProcessBackendConfig, TrainerClient

    (tmp_path / "fake_worker.py").write_text(FAKE_WORKER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the backend's venv, kept when a job fails
    return TrainerClient(LocalProcessBackendConfig())


def test_local_process_backend_runs_the_job_under_torchrun(local_client, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    spec = TrainJobSpec(stage="sft", nodes=2, module="fake_worker")  # CPU nodes: one process each
    request = {"kind": "pipeline", "out": str(out)}
    name = run_trainjob(request, spec, Settings.from_env({}), client=local_client, poll_s=0.2)

    ranks = sorted(json.loads(p.read_text())["local_rank"] for p in out.glob("rank-*.json"))
    assert ranks == [0, 1]  # torchrun started the cluster job's world (2 nodes x 1) here
    for p in out.glob("rank-*.json"):
        got = json.loads(p.read_text())
        assert got["world"] == 2 and got["request"] == request
    log = capsys.readouterr().out
    assert f"[trainjob] submitted {name} on this machine: torch-distributed, 2 nodes x CPU only" in log
    assert f"{name}: Running" in log and f"{name}: Complete after" in log
    # the job's output, streamed into the step's log (the two ranks share one pipe: lines may interleave)
    assert "[node-0] fake worker rank" in log and "fake worker rank 1/2" in log and "fake worker rank 0/2" in log


def test_local_process_backend_failure_raises_with_the_log(local_client, tmp_path):
    spec = TrainJobSpec(stage="reward", nodes=2, module="fake_worker")
    with pytest.raises(TrainJobError) as e:
        run_trainjob({"out": str(tmp_path), "fail_rank": 1}, spec, Settings.from_env({}), client=local_client,
                     poll_s=0.2)
    msg = str(e.value)
    assert msg.startswith(f"Kubeflow Trainer job {e.value.job_name} failed") and e.value.job_name.startswith("reward-")
    assert "failed step: train" in msg
    assert "rank 1: RuntimeError: boom" in msg  # from the last log lines


# ----------------------------------------------------------------------------- watcher error paths


class FakeClient:
    """A stand-in TrainerClient: jobs never finish; `get_job` may fail."""

    def __init__(self, fail_reads=0, fail_submit=False):
        self.fail_reads, self.fail_submit, self.deleted, self.trained = fail_reads, fail_submit, [], None
        self.backend = SimpleNamespace(namespace=NAMESPACE)

    def train(self, runtime=None, trainer=None, options=None):
        if self.fail_submit:
            raise RuntimeError('Failed to create TrainJob: trainjobs.trainer.kubeflow.org is forbidden')
        self.trained = (runtime, trainer, options)
        return next(o.name for o in options if type(o).__name__ == "Name")

    def get_job(self, name):
        if self.fail_reads:
            self.fail_reads -= 1
            raise RuntimeError(f"Failed to get TrainJob: {NAMESPACE}/{name}")
        return SimpleNamespace(name=name, status="Running",
                               steps=[SimpleNamespace(name="node-0", status="Running", pod_name="p0")])

    def get_job_logs(self, name, step="node-0", follow=False):
        return iter(["still training"])

    def get_job_events(self, name):
        return []

    def delete_job(self, name):
        self.deleted.append(name)


@pytest.fixture
def small_spec():
    return TrainJobSpec(stage="ppo", nodes=2, image="img:1")


def test_timeout_deletes_the_job(small_spec):
    pytest.importorskip("kubeflow.trainer")
    client = FakeClient()
    with pytest.raises(TrainJobError, match=r"did not finish within 0 s and was deleted") as e:
        run_trainjob(REQUEST, small_spec, Settings.from_env({}), client=client, poll_s=0.001, wait_s=0.01)
    assert client.deleted == [e.value.job_name]
    assert "last log lines of the job:\n    still training" in str(e.value)


def test_lost_api_gives_up_after_repeated_failures(small_spec, capsys):
    pytest.importorskip("kubeflow.trainer")
    client = FakeClient(fail_reads=99)
    with pytest.raises(TrainJobError, match=r"lost track of .* \(5 failed status reads.*may still be running"):
        run_trainjob(REQUEST, small_spec, Settings.from_env({}), client=client, poll_s=0.001)
    assert capsys.readouterr().out.count("status unavailable") == 4


def test_a_few_failed_reads_are_retried(small_spec, capsys):
    pytest.importorskip("kubeflow.trainer")
    client = FakeClient(fail_reads=2)
    with pytest.raises(TrainJobError, match="did not finish"):
        run_trainjob(REQUEST, small_spec, Settings.from_env({}), client=client, poll_s=0.001, wait_s=0.05)
    out = capsys.readouterr().out
    assert out.count("status unavailable") == 2 and "Running (node-0 Running)" in out


def test_failed_submission_says_what_to_check(small_spec):
    pytest.importorskip("kubeflow.trainer")
    with pytest.raises(TrainJobError, match=r"could not submit .*forbidden.*clustertrainingruntimes.*Role"):
        run_trainjob(REQUEST, small_spec, Settings.from_env({}), client=FakeClient(fail_submit=True), poll_s=0.001)


def test_stand_in_client_gets_the_cluster_trainer(small_spec):
    """Without the Kubernetes backend (a stand-in), the trainer is the cluster's: the
    training image, nodes, the request as env and the node command."""
    pytest.importorskip("kubeflow.trainer")
    client = FakeClient()
    with pytest.raises(TrainJobError):
        run_trainjob(REQUEST, small_spec, Settings.from_env({}), client=client, poll_s=0.001, wait_s=0.001)
    runtime, trainer, options = client.trained
    assert runtime == "torch-distributed" and (trainer.image, trainer.num_nodes) == ("img:1", 2)
    assert json.loads(trainer.env["RLHF_STAGE_REQUEST"]) == REQUEST
    command = next(o for o in options if type(o).__name__ == "TrainerCommand").command
    assert command == node_command(small_spec)
