"""Several nodes for one training stage: a Kubeflow Trainer job, submitted and watched.

A profile with `nodes: N > 1` for sft, reward or ppo turns that pipeline step into a
launcher. Nothing here starts processes itself (DESIGN.md, "Scaling out"): the
Kubeflow Trainer creates the pods, and torchrun, the runtime's own launcher, starts
`python -m rlhf.ops.worker` on each of them.

    compile time   `trainjob_spec(profile, stage)` -> RLHF_TRAINJOB on the step (JSON;
                   names of Secrets, never their values); the step itself gets one
                   CPU and no GPU (pipelines/_place).
    in the step    runs.stage() sees RLHF_TRAINJOB and calls `run_trainjob()`:
      1. build     a Trainer: image, N nodes, GPUs/CPU/memory per node, the stage's
                   arguments as RLHF_STAGE_REQUEST, the profile's Secrets as
                   `valueFrom.secretKeyRef`, the node command (`node_command`), and
                   the placement (node selector, tolerations, /dev/shm, pull secrets,
                   service account) and the hardening (`pod_hardening`: non-root,
                   seccomp, no capabilities, read-only root with emptyDirs where the
                   code writes, the step label) as a runtime patch;
      2. submit    `TrainerClient.train()` creates the TrainJob in the step's namespace;
      3. watch     poll it; print every change of the job's and its pods' status and
                   node-0's new log lines (rank 0 logs), so the KFP step log tells the story;
      4. result    Complete: return the job's name (rank 0 wrote `<stage>/result.json`
                   to the store, where runs.stage reads it). Failed or past its
                   deadline: `TrainJobError` with the failed step, the controller's
                   message, the last log lines and the kubectl commands to see more.

On every node of the default `torch-distributed` runtime the Trainer's torch plugin
sets PET_NNODES / PET_NODE_RANK / PET_MASTER_ADDR / PET_MASTER_PORT, and the command is

    python -m torch.distributed.run --nnodes=N --nproc_per_node=G --node_rank=$(PET_NODE_RANK)
        --master_addr=$(PET_MASTER_ADDR) --master_port=$(PET_MASTER_PORT) -m rlhf.ops.worker

(G = GPUs per node, 1 without; Kubernetes expands `$(VAR)` from the container's env).
DeepSpeed runs inside those processes (distributed.py), so this runtime needs nothing
but the project's image. The `deepspeed-distributed` runtime is MPI: its `node` pods
run sshd and the launcher pod runs mpirun, so it needs an image with OpenMPI and sshd
(e.g. built on ghcr.io/kubeflow/trainer/deepspeed-runtime); see `node_command`.

The same `run_trainjob` runs against the SDK's LocalProcessBackend (one machine, no
cluster), which is how the tests execute a real job: see `_local_trainer`.

Needs the `cluster` extra (kubeflow SDK); the spec half of this module (used at
compile time) does not.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shlex
import signal
import sys
import threading
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rlhf.ops.profiles import MULTI_NODE_STAGES, SCRATCH_DIRS, STEP_LABEL, Profile, SecretEnv, Toleration
from rlhf.adapters.settings import Settings, child_process_env

RUNTIMES = ("torch-distributed", "deepspeed-distributed")
COMPLETE, FAILED = "Complete", "Failed"  # the SDK's TrainJob statuses (besides Created, Running)
MPI_HOSTFILE = "/etc/mpi/hostfile"  # written by the Trainer's MPI plugin on the launcher
MPI_MASTER_PORT = 29500
WAIT_MARGIN_S = 300  # wait this much past the job's own deadline before giving up on it
MAX_POLL_ERRORS = 5  # consecutive failed status reads before the launcher gives up
LOG_TAIL_LINES = 50  # torchrun's own failure report alone is ~35 lines
HARDENED_CONTAINER = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
"""securityContext of the node containers (the chart's admission policy sets the same on KFP steps)."""


class TrainJobError(RuntimeError):
    """A Trainer job failed, timed out or could not be submitted; the message says
    which, why, and where the logs are."""

    def __init__(self, message: str, job_name: str | None = None):
        super().__init__(message)
        self.job_name = job_name


class TrainJobSpec(BaseModel):
    """What RLHF_TRAINJOB holds: the Trainer job of one multi-node stage. Compiled into
    the pipeline, so it names Secrets and never carries their values."""

    model_config = ConfigDict(extra="forbid")

    stage: Literal[MULTI_NODE_STAGES] = Field(  # type: ignore[valid-type]
        ..., description="The training stage the job runs.")
    nodes: int = Field(..., ge=1, description="Training nodes (pods), each with `accelerator_count` GPUs.")
    runtime: Literal[RUNTIMES] = Field("torch-distributed", description=  # type: ignore[valid-type]
                                       "ClusterTrainingRuntime: torch-distributed (torchrun) or "
                                       "deepspeed-distributed (MPI; needs OpenMPI and sshd in the image).")
    image: str | None = Field(None, description="Training image of the nodes; None = the step's RLHF_IMAGE.")
    accelerator_type: str | None = Field(None, description="Accelerator resource per node, e.g. nvidia.com/gpu.")
    accelerator_count: int = Field(0, ge=0, description="Accelerators per node; one process each "
                                                        "(0 = one CPU process).")
    cpu: str | None = Field(None, description="CPU per node (request = limit), e.g. '48'.")
    memory: str | None = Field(None, description="Memory per node (request = limit), e.g. 600Gi.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the training pods require.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Taints the training pods tolerate.")
    shm_size: str | None = Field(None, description="Memory-backed /dev/shm per node (NCCL), e.g. 64Gi.")
    secrets: list[SecretEnv] = Field(default_factory=list, description=
                                     "Secrets given to the nodes as env (valueFrom.secretKeyRef): names and keys only.")
    env: dict[str, str] = Field(default_factory=dict, description="Plain, non-secret environment of the nodes.")
    image_pull_secrets: list[str] = Field(default_factory=list, description="Secrets for a private registry.")
    run_as_user: int = Field(10001, ge=1, description="Non-root UID (and GID) of the training pods.")
    service_account: str | None = Field(None, description="Service account of the training pods "
                                                          "(IRSA / Workload Identity).")
    timeout_s: int | None = Field(None, gt=0, description="The job's activeDeadlineSeconds; the launcher waits a "
                                                          "little longer.")
    module: str = Field("rlhf.ops.worker", description="Python module every process runs (`-m`); it reads "
                                                   "RLHF_STAGE_REQUEST.")

    @property
    def procs_per_node(self) -> int:
        return self.accelerator_count or 1


def trainjob_spec(profile: Profile, stage: str, default_image: str | None = None) -> TrainJobSpec:
    """The Trainer job of `stage` under `profile` (its `stages.<stage>` over `defaults`);
    the image is the profile's, else `default_image` (the compile-time RLHF_IMAGE)."""
    if stage not in MULTI_NODE_STAGES:
        raise ValueError(f"stage {stage!r} cannot run on several nodes (only {', '.join(MULTI_NODE_STAGES)})")
    s = profile.for_stage(stage)
    return TrainJobSpec(
        stage=stage, nodes=s.nodes, runtime=s.trainer_runtime, image=profile.image or default_image or Settings.image,
        accelerator_type=(s.accelerator_type or "nvidia.com/gpu") if s.accelerator_count else None,
        accelerator_count=s.accelerator_count, cpu=s.cpu_request or s.cpu_limit,
        memory=s.memory_request or s.memory_limit, node_selector=s.node_selector, tolerations=s.tolerations,
        shm_size=s.shm_size, secrets=profile.secrets, env=profile.env, image_pull_secrets=profile.image_pull_secrets,
        run_as_user=profile.run_as_user, service_account=profile.service_account, timeout_s=s.timeout_s)


def node_command(spec: TrainJobSpec) -> list[str]:
    """The command of the Trainer's node containers (see the module docstring).

    torch-distributed: torchrun on every node, its place in the job from the PET_*
    variables of the Trainer's torch plugin.

    deepspeed-distributed: the Trainer's MPI runtime runs the command on its launcher
    pod only (the `node` pods run sshd) and lists the hosts in /etc/mpi/hostfile with
    `numProcPerNode` slots each. mpirun starts one process per slot and forwards our
    variables (`-x`); each process maps OpenMPI's ranks to the torchrun variables
    rlhf.ops.worker reads; rank 0 sits on the first host, which is MASTER_ADDR."""
    if spec.runtime == "torch-distributed":
        return ["python", "-m", "torch.distributed.run", f"--nnodes={spec.nodes}",
                f"--nproc_per_node={spec.procs_per_node}", "--node_rank=$(PET_NODE_RANK)",
                "--master_addr=$(PET_MASTER_ADDR)", "--master_port=$(PET_MASTER_PORT)", "-m", spec.module]
    forwarded = ["PATH", "RLHF_STAGE_REQUEST", "MASTER_ADDR", "MASTER_PORT", *spec.env,  # ssh sessions start bare
                 *(var for secret in spec.secrets for var in secret.env)]
    per_rank = ("export RANK=$OMPI_COMM_WORLD_RANK WORLD_SIZE=$OMPI_COMM_WORLD_SIZE "
                "LOCAL_RANK=$OMPI_COMM_WORLD_LOCAL_RANK "
                "GROUP_RANK=$((OMPI_COMM_WORLD_RANK / OMPI_COMM_WORLD_LOCAL_SIZE)); "
                f"exec python -m {shlex.quote(spec.module)}")
    launcher = (f'export MASTER_ADDR="$(head -n1 {MPI_HOSTFILE} | cut -d" " -f1)" MASTER_PORT={MPI_MASTER_PORT}; '
                f"exec mpirun --hostfile {MPI_HOSTFILE} {' '.join(f'-x {v}' for v in forwarded)} "
                f"bash -c {shlex.quote(per_rank)}")
    return ["bash", "-c", launcher]


# ----------------------------------------------------------------------------- running a job


def run_trainjob(request: dict, spec: TrainJobSpec | dict, settings: Settings, client: Any = None,
                 poll_s: float = 10.0, wait_s: float | None = None) -> str:
    """Run `request` (the arguments rlhf.ops.worker takes from RLHF_STAGE_REQUEST) as a
    Kubeflow Trainer job described by `spec`, wait for it and return its name.

    `client` is a `kubeflow.trainer.TrainerClient`; None builds one for the Kubernetes
    backend in this pod's namespace (in-cluster config). `wait_s` bounds the wait
    (default: the job's `timeout_s` plus WAIT_MARGIN_S; no bound without one).
    Raises TrainJobError when the job fails, outlasts the wait (the job is deleted
    then), or cannot be submitted."""
    spec = TrainJobSpec.model_validate(spec)
    name = f"{spec.stage}-{uuid.uuid4().hex[:8]}"
    if client is None:
        try:
            client = _kubernetes_client()
        except Exception as e:
            raise TrainJobError(f"stage {spec.stage!r} runs on {spec.nodes} nodes (RLHF_TRAINJOB) but the Kubernetes "
                                f"API is out of reach: {e}. Multi-node stages run in a Kubeflow Pipelines step "
                                "(in-cluster config) or with a kubeconfig.") from e
    if wait_s is None and spec.timeout_s:
        wait_s = spec.timeout_s + WAIT_MARGIN_S

    # 1. build
    if _is_local(client):
        runtime, trainer, options = _local_trainer(request, spec, name)
        extras = contextlib.nullcontext()
    else:
        runtime, trainer, options = _kubernetes_trainer(request, spec, settings, name)
        extras = _trainer_extras(client, spec)

    # 2. submit
    try:
        with extras:
            name = client.train(runtime=runtime, trainer=trainer, options=options)
    except TrainJobError:
        raise
    except Exception as e:
        raise TrainJobError(f"could not submit the Kubeflow Trainer job {name} for stage {spec.stage!r}: {e}. "
                            "Is the Trainer installed (`kubectl get clustertrainingruntimes`) and may this "
                            "step's service account create trainjobs (the helm chart's Role)?", name) from e
    where = f"in namespace {_namespace(client)}" if _namespace(client) else "on this machine"
    per_node = f"{spec.accelerator_count} {spec.accelerator_type}" if spec.accelerator_count else "CPU only"
    _say(f"submitted {name} {where}: {spec.runtime}, {spec.nodes} nodes x {per_node}")

    # 3. watch, 4. result
    with _deleted_if_interrupted(client, name):
        job = _watch(client, name, poll_s, wait_s)
    if job.status != COMPLETE:
        raise _failure(client, name, job, "failed")
    return name


def _say(msg: str) -> None:
    print(f"[trainjob] {msg}", flush=True)


def _kubernetes_client():
    from kubeflow.trainer import KubernetesBackendConfig, TrainerClient

    return TrainerClient(KubernetesBackendConfig())  # namespace None: the pod's own (in-cluster)


def _backend(client):
    return getattr(client, "backend", None)


def _is_local(client) -> bool:
    from kubeflow.trainer.backends.localprocess.backend import LocalProcessBackend

    return isinstance(_backend(client), LocalProcessBackend)


def _namespace(client) -> str | None:
    return getattr(_backend(client), "namespace", None)


def _kubernetes_trainer(request: dict, spec: TrainJobSpec, settings: Settings, name: str):
    """Runtime, trainer and options of `TrainerClient.train` for a cluster."""
    from kubeflow.trainer import CustomTrainerContainer
    from kubeflow.trainer.options import (ActiveDeadlineSeconds, ContainerPatch, JobSetSpecPatch,
                                          JobSetTemplatePatch, JobSpecPatch, JobTemplatePatch, Labels, Name,
                                          PodSpecPatch, PodTemplatePatch, ReplicatedJobPatch, RuntimePatch,
                                          TrainerCommand, TrainingRuntimeSpecPatch)

    resources = {"cpu": spec.cpu, "memory": spec.memory}
    if spec.accelerator_count:
        resources[spec.accelerator_type or "nvidia.com/gpu"] = str(spec.accelerator_count)  # a quantity, like the rest
    trainer = CustomTrainerContainer(
        image=spec.image or settings.image, num_nodes=spec.nodes,
        resources_per_node={k: v for k, v in resources.items() if v} or None,
        env={**spec.env, "RLHF_STAGE_REQUEST": json.dumps(request)})

    hardening = pod_hardening(spec)
    pod = PodSpecPatch(
        service_account_name=spec.service_account,
        node_selector=spec.node_selector or None,
        tolerations=[t.model_dump(exclude_none=True) for t in spec.tolerations] or None,
        image_pull_secrets=[{"name": s} for s in spec.image_pull_secrets] or None,
        security_context=hardening["pod"], volumes=hardening["volumes"],
        containers=[ContainerPatch(name="node", volume_mounts=hardening["mounts"],
                                   security_context=hardening["container"])])
    # torch: every pod is a `node`; MPI: a `launcher` pod and `node` pods, placed alike
    # (the MPI runtime names the container of both `node`)
    jobs = ["node"] if spec.runtime == "torch-distributed" else ["launcher", "node"]
    pod_template = JobTemplatePatch(spec=JobSpecPatch(template=PodTemplatePatch(
        metadata={"labels": dict([STEP_LABEL])}, spec=pod)))
    placement = RuntimePatch(training_runtime_spec=TrainingRuntimeSpecPatch(template=JobSetTemplatePatch(
        spec=JobSetSpecPatch(replicated_jobs=[ReplicatedJobPatch(name=job, template=pod_template) for job in jobs]))))
    options = [Name(name), Labels({"app.kubernetes.io/part-of": "rlhf", "rlhf/stage": spec.stage}),
               TrainerCommand(node_command(spec)), placement]
    if spec.timeout_s:
        options.append(ActiveDeadlineSeconds(spec.timeout_s))
    return spec.runtime, trainer, options


def pod_hardening(spec: TrainJobSpec) -> dict:
    """The security settings of a Trainer job's pods, in Kubernetes' own field names:
    `pod` (securityContext: non-root user and group, RuntimeDefault seccomp), `container`
    (HARDENED_CONTAINER), and the emptyDir `volumes` and `mounts` that a read-only root
    filesystem needs (profiles.SCRATCH_DIRS), plus the memory-backed /dev/shm of NCCL
    when the profile asks for one. Here, unlike on a KFP step, every field can be set."""
    volumes = [{"name": name, "emptyDir": {}} for name in SCRATCH_DIRS]
    mounts = [{"name": name, "mountPath": path} for name, path in SCRATCH_DIRS.items()]
    if spec.shm_size is not None:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    pod = {"runAsUser": spec.run_as_user, "runAsGroup": spec.run_as_user, "runAsNonRoot": True,
           "seccompProfile": {"type": "RuntimeDefault"}}
    return {"pod": pod, "container": copy.deepcopy(HARDENED_CONTAINER), "volumes": volumes,
            "mounts": mounts}


def secret_env(spec: TrainJobSpec) -> list[dict]:
    """The profile's Secrets as Kubernetes env references, one per variable."""
    return [{"name": var, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key}}}
            for secret in spec.secrets for var, key in secret.env.items()]


def _trainer_extras(client, spec: TrainJobSpec):
    """What the SDK's trainer types cannot say, added to the TrainJob's `spec.trainer`
    while `train()` builds it: env from Secrets (`valueFrom.secretKeyRef`; the Trainer
    accepts env for the node container only there, and CustomTrainerContainer.env takes
    plain strings) and `numProcPerNode` (the MPI runtime's slots per node; the torch
    plugin's PET_NPROC_PER_NODE). Done by wrapping the backend's `_get_trainjob_spec`
    for the one call, on this client only; the test of the submitted TrainJob fails if
    a kubeflow release changes that method."""
    from kubeflow.trainer.backends.kubernetes.backend import KubernetesBackend

    backend = _backend(client)
    if not isinstance(backend, KubernetesBackend):  # a stand-in client (tests)
        return contextlib.nullcontext()
    build = getattr(backend, "_get_trainjob_spec", None)
    if build is None:
        raise TrainJobError("this kubeflow SDK has no KubernetesBackend._get_trainjob_spec, which rlhf uses to add "
                            "the Secret references to the TrainJob: install the `cluster` extra's kubeflow>=0.5,<0.6")
    from kubeflow_trainer_api import models

    refs = [models.IoK8sApiCoreV1EnvVar.from_dict(e) for e in secret_env(spec)]

    def complete(*args, **kwargs):
        job_spec = build(*args, **kwargs)
        trainer = job_spec.trainer or models.TrainerV1alpha1Trainer()
        trainer.env = [*(trainer.env or []), *refs]
        trainer.num_proc_per_node = spec.procs_per_node
        job_spec.trainer = trainer
        return job_spec

    @contextlib.contextmanager
    def wrapped():
        backend._get_trainjob_spec = complete
        try:
            yield
        finally:
            del backend._get_trainjob_spec  # the class's method again

    return wrapped()


def _local_trainer(request: dict, spec: TrainJobSpec, name: str):
    """Runtime, trainer and options for the SDK's LocalProcessBackend: the whole job as
    one torchrun on this machine with the cluster job's world size (nodes x processes).

    That backend runs a CustomTrainer function from a file in a fresh venv with the
    runtime's entry point, `<venv>/bin/torchrun` for the torch framework; the fresh
    venv has no torch (installing it would need the network), so the runtime is given
    as a plain-Python one and the function starts torchrun with this interpreter,
    which has torch and rlhf. The job's environment is this process's plus the request."""
    from kubeflow.trainer import CustomTrainer
    from kubeflow.trainer.constants import constants
    from kubeflow.trainer.options import Name
    from kubeflow.trainer.types import types

    runtime = types.Runtime(name=constants.DEFAULT_TRAINING_RUNTIME, kind=types.RuntimeKind.TRAINING_RUNTIME,
                            trainer=types.RuntimeTrainer(trainer_type=types.TrainerType.CUSTOM_TRAINER,
                                                         framework="python", image="local"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               f"--nproc_per_node={spec.nodes * spec.procs_per_node}", "-m", spec.module]
    env = child_process_env({**spec.env, "RLHF_STAGE_REQUEST": json.dumps(request)})
    trainer = CustomTrainer(func=_run_local_node, func_args={"command": command}, env=env)
    return runtime, trainer, [Name(name)]


def _run_local_node(args):
    """Body of the local job (LocalProcessBackend writes this function's source to a
    file and runs it in a fresh venv, so it uses the standard library only)."""
    import subprocess
    import sys

    sys.exit(subprocess.call(args["command"]))


# ----------------------------------------------------------------------------- watching


def _watch(client, name: str, poll_s: float, wait_s: float | None):
    """Poll the job until it completes or fails; print status changes and new log lines."""
    start = time.monotonic()
    last_state, printed, errors = None, 0, 0
    while True:
        try:
            job = client.get_job(name)
            errors = 0
        except (RuntimeError, TimeoutError) as e:  # the API server hiccuped; the job runs on
            errors += 1
            if errors >= MAX_POLL_ERRORS:
                raise TrainJobError(f"lost track of the Kubeflow Trainer job {name} ({errors} failed status reads, "
                                    f"last: {e}); it may still be running: `kubectl get trainjob {name}`", name) from e
            _say(f"{name}: status unavailable ({e}); retrying")
            job = None
        if job is not None:
            state = _describe(job)
            if state != last_state:
                _say(f"{name}: {state}")
                last_state = state
            printed = _print_new_log_lines(client, name, printed)
            if job.status in (COMPLETE, FAILED):
                _say(f"{name}: {job.status} after {time.monotonic() - start:.0f} s")
                return job
        if wait_s is not None and time.monotonic() - start > wait_s:
            error = _failure(client, name, job, f"did not finish within {wait_s:.0f} s and was deleted "
                                                "(raise the stage's timeout_s in the profile)")
            _delete(client, name)  # after reading its state and logs for the message
            raise error
        time.sleep(poll_s)


def _describe(job) -> str:
    steps = ", ".join(f"{s.name} {s.status or 'Unknown'}" for s in job.steps)
    return f"{job.status}" + (f" ({steps})" if steps else "")


def _print_new_log_lines(client, name: str, printed: int) -> int:
    """Print node-0's lines past the first `printed` (all steps on the local backend);
    returns how many lines have been printed. A restarted pod starts over."""
    try:
        lines = list(client.get_job_logs(name, follow=False))
    except Exception:  # noqa: BLE001 - logs are a courtesy; the status decides
        return printed
    if len(lines) < printed:
        _say(f"{name}: node-0 restarted; its log starts over")
        printed = 0
    for line in lines[printed:]:
        print(f"[node-0] {line}", flush=True)
    return len(lines)


def _delete(client, name: str) -> None:
    try:
        client.delete_job(name)
        _say(f"{name}: deleted")
    except Exception as e:  # noqa: BLE001
        _say(f"{name}: could not delete it ({e}); delete it by hand: kubectl delete trainjob {name}")


@contextlib.contextmanager
def _deleted_if_interrupted(client, name: str):
    """Delete the job when this step is stopped (KFP cancels a run with SIGTERM to the
    step's pod, Ctrl-C locally): left alone it would keep its GPUs until its deadline."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        _delete(client, name)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


# ----------------------------------------------------------------------------- explaining a failure


def _failure(client, name: str, job, what: str) -> TrainJobError:
    """TrainJobError naming the job, its failed steps, the controller's message, the
    last log lines of the first failed step, and how to see the rest."""
    ns = _namespace(client)
    lines = [f"Kubeflow Trainer job {ns + '/' if ns else ''}{name} {what}"]
    failed = [s for s in (job.steps if job is not None else []) if s.status == FAILED]
    for s in failed:
        lines.append(f"  failed step: {s.name} (pod {s.pod_name})")
    for condition in _conditions(client, name):
        lines.append(f"  condition: {condition}")
    for event in _warning_events(client, name):
        lines.append(f"  event: {event}")
    tail = _log_tail(client, name, failed[0].name if failed else None)
    if tail:
        lines.append(f"  last log lines of {failed[0].name if failed else 'the job'}:")
        lines += [f"    {line}" for line in tail]
    if ns:
        lines.append(f"  all logs:  kubectl logs -n {ns} -l jobset.sigs.k8s.io/jobset-name={name} "
                     "--all-containers --prefix --tail=-1")
        lines.append(f"  details:   kubectl describe trainjob -n {ns} {name}")
    return TrainJobError("\n".join(lines), name)


def _conditions(client, name: str) -> list[str]:
    """The TrainJob's true conditions with their messages (Kubernetes backend only; the
    SDK's TrainJob keeps the status word alone)."""
    backend = _backend(client)
    api, ns = getattr(backend, "custom_api", None), _namespace(client)
    if api is None or ns is None:
        return []
    try:
        from kubeflow.trainer.constants import constants

        cr = api.get_namespaced_custom_object(constants.GROUP, constants.VERSION, ns, constants.TRAINJOB_PLURAL, name)
        conditions = (cr.get("status") or {}).get("conditions") or []
    except Exception:  # noqa: BLE001 - an explanation, not the verdict
        return []
    return [f"{c.get('type')} ({c.get('reason', '')}): {c.get('message', '')}"
            for c in conditions if c.get("status") == "True"]


def _warning_events(client, name: str, last: int = 5) -> list[str]:
    try:
        events = client.get_job_events(name)
    except Exception:  # noqa: BLE001 - NotImplementedError on the local backend, RBAC, ...
        return []
    return [f"{e.involved_object_kind}/{e.involved_object_name} {e.reason}: {e.message}" for e in events[-last:]]


def _log_tail(client, name: str, step: str | None) -> list[str]:
    try:
        logs = client.get_job_logs(name, step=step, follow=False) if step else client.get_job_logs(name, follow=False)
        return list(logs)[-LOG_TAIL_LINES:]
    except Exception:  # noqa: BLE001
        return []
