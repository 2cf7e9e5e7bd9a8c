"""Cluster profiles: where and how each pipeline step runs on Kubernetes.

A profile is YAML, validated here (pydantic, no kfp import), and applied to the
pipeline at compile time (`rlhf compile --profile F`, see pipelines/) with
`kfp.kubernetes`: node selectors, tolerations, accelerators, CPU/memory, a
memory-backed `/dev/shm`, image pull secrets, a non-root security context, and the
Kubernetes Secrets that carry S3 and MLflow credentials, mounted as environment
variables by name; a profile never holds a secret value.

    image: ghcr.io/acme/rlhf:0.1.0
    image_pull_secrets: [ghcr]
    service_account: rlhf-pipeline-runner    # used by `rlhf submit` for the run
    secrets:
      - name: rlhf-s3
        env: {AWS_ACCESS_KEY_ID: access-key, AWS_SECRET_ACCESS_KEY: secret-key}
    env: {MLFLOW_TRACKING_URI: http://mlflow.rlhf:5000}   # plain settings, not secrets
    defaults: {cpu_request: "2", memory_request: 8Gi}
    stages:
      ppo: {accelerator_type: nvidia.com/gpu, accelerator_count: 8, shm_size: 64Gi,
            node_selector: {cloud.google.com/gke-accelerator: nvidia-h100-80gb},
            tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]}

`nodes: N` (sft, reward, ppo) runs that stage on N such nodes as a Kubeflow Trainer job
that the step submits and watches (trainjob.py); the step itself then needs no GPU.

Every step pod, placed or not, is hardened the same way (`STEP_LABEL`, `SCRATCH_DIRS`;
pipelines/dag.py for KFP steps, trainjob.py for Trainer pods, docs/deploy.md for what
kfp-kubernetes cannot express and the chart's admission policy adds).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rlhf.config import ConfigError, read_yaml_mapping
from rlhf.stages.table import STAGES as ENGINE_STAGES

STAGES = ("start", *ENGINE_STAGES, "finish")
"""Every step of the pipeline: the engine's stages between the run's start and finish steps."""
MULTI_NODE_STAGES = tuple(name for name, spec in ENGINE_STAGES.items() if spec.trains)
"""The stages that can run on several nodes (a Kubeflow Trainer job, see trainjob.py)."""
STEP_LABEL = ("rlhf-pipeline/step", "true")
"""Label on every step pod (KFP steps and Trainer job pods). The helm chart's
MutatingAdmissionPolicy selects pods by it to add what kfp-kubernetes cannot set."""
SCRATCH_DIRS = {"rlhf-tmp": "/tmp", "rlhf-home": "/home/rlhf"}
"""Volume name -> path of the emptyDirs that keep a read-only root filesystem workable:
/tmp (tempfile: checkpoint staging, the S3 store's scratch, MLflow's temporary files,
torch inductor) and the image's HOME (images/Dockerfile: HF_HOME, ~/.cache for
DeepSpeed's torch_extensions and Triton, matplotlib's config, RLHF_HOME). KFP mounts its
own at /gcs, /s3, /minio, /.local, /.cache and /.config (backend >= 2.3); mounting one
there too would make the pod invalid (a mount path twice)."""
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|[KMGTPE]i?|[kMGTPE])?$")
_SECRETISH = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE)", re.I)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Toleration(_Model):
    key: str | None = Field(None, description="Taint key (empty with operator Exists: tolerate everything).")
    operator: Literal["Equal", "Exists"] = Field("Equal", description="Equal (key=value) or Exists (any value).")
    value: str | None = Field(None, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(None, description="Taint effect; empty = all.")


class SecretEnv(_Model):
    name: str = Field(..., description="Kubernetes Secret in the run's namespace.")
    env: dict[str, str] = Field(..., description="Environment variable -> key in the Secret.")


class StageSpec(_Model):
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the step's pod requires.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Taints the step's pod tolerates.")
    accelerator_type: str | None = Field(None, description="Accelerator resource, e.g. nvidia.com/gpu.")
    accelerator_count: int = Field(0, ge=0, description="Accelerators per pod (0 = none).")
    accelerator_memory: str | None = Field(None, description="Memory of one accelerator, e.g. 80Gi, for `rlhf plan` "
                                                             "and the fit check of `rlhf compile`; empty = known from "
                                                             "the node selector (H100, A100, L4, p4d, p5, ...) if it "
                                                             "names the GPU.")
    cpu_request: str | None = Field(None, description="CPU request, e.g. '8' or '500m'.")
    cpu_limit: str | None = Field(None, description="CPU limit.")
    memory_request: str | None = Field(None, description="Memory request, e.g. 64Gi.")
    memory_limit: str | None = Field(None, description="Memory limit.")
    shm_size: str | None = Field(None, description="Size of a memory-backed /dev/shm (NCCL, dataloaders), e.g. 16Gi.")
    nodes: int = Field(1, ge=1, description="Nodes for the step. More than one (sft, reward, ppo only) runs the "
                                            "stage as a Kubeflow Trainer job of that many pods, each with the "
                                            "accelerators and resources above; the step itself then only launches "
                                            "and watches it (one CPU, no GPU).")
    trainer_runtime: Literal["torch-distributed", "deepspeed-distributed"] = Field(
        "torch-distributed", description="Kubeflow Trainer runtime of a multi-node step: torch-distributed (torchrun, "
                                         "the project's image) or deepspeed-distributed (MPI; needs OpenMPI and sshd "
                                         "in the image).")
    timeout_s: int | None = Field(None, gt=0, description="Kill the step after this many seconds.")

    @field_validator("cpu_request", "cpu_limit", "memory_request", "memory_limit", "shm_size", "accelerator_memory")
    @classmethod
    def _quantity(cls, v):
        if v is not None and not _QUANTITY.match(str(v)):
            raise ValueError(f"{v!r} is not a Kubernetes quantity (e.g. 500m, 8, 16Gi)")
        return v


_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity_bytes(q: str) -> float:
    """A Kubernetes quantity (16Gi, 80G, 500m) as a number."""
    m = re.match(r"^([0-9]+(?:\.[0-9]+)?)([a-zA-Z]*)$", str(q))
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"{q!r} is not a Kubernetes quantity (e.g. 500m, 8, 16Gi)")
    return float(m.group(1)) * _UNITS[m.group(2)]


class Profile(_Model):
    name: str = Field("default", description="A label for the profile (recorded on compiled pipelines).")
    image: str | None = Field(None, description="Training image of every step (overrides RLHF_IMAGE).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(None, description="Pull policy.")
    image_pull_secrets: list[str] = Field(default_factory=list, description="Secrets for a private registry.")
    service_account: str | None = Field(None, description="Service account the run's pods use (set at submission).")
    run_as_user: int = Field(10001, ge=1, description="Non-root UID of the step containers.")
    secrets: list[SecretEnv] = Field(default_factory=list, description="Secrets mounted as env into every step.")
    env: dict[str, str] = Field(default_factory=dict, description="Plain, non-secret environment for every step.")
    defaults: StageSpec = Field(default_factory=StageSpec, description="Applied to every step, under `stages`.")
    stages: dict[Literal[STAGES], StageSpec] = Field(default_factory=dict,  # type: ignore[valid-type]
                                                    description="Per step, merged over `defaults`.")

    @field_validator("env")
    @classmethod
    def _no_secret_literals(cls, env):
        bad = [k for k, v in env.items() if _SECRETISH.search(k) or re.search(r"//[^/@\s]+@", str(v))]
        if bad:
            raise ValueError(f"{bad} look like credentials: put them in a Kubernetes Secret and list it under "
                             "`secrets` (a profile is compiled into the pipeline YAML)")
        return env

    @field_validator("defaults")
    @classmethod
    def _one_node_by_default(cls, defaults):
        if defaults.nodes > 1:
            raise ValueError(f"nodes: {defaults.nodes} would apply to every step; set it per stage under "
                             f"stages.{{{','.join(MULTI_NODE_STAGES)}}}.nodes instead")
        return defaults

    @field_validator("stages")
    @classmethod
    def _several_nodes_for_training_only(cls, stages):
        bad = [f"stages.{name}.nodes: {spec.nodes}" for name, spec in stages.items()
               if spec.nodes > 1 and name not in MULTI_NODE_STAGES]
        if bad:
            raise ValueError(f"{', '.join(bad)}: only {', '.join(MULTI_NODE_STAGES)} can run on several nodes "
                             "(as Kubeflow Trainer jobs); remove nodes or set it to 1")
        return stages

    def for_stage(self, stage: str) -> StageSpec:
        """`defaults` with the stage's own fields (those it sets) on top."""
        spec = self.stages.get(stage)
        if spec is None:
            return self.defaults
        return self.defaults.model_copy(update={k: getattr(spec, k) for k in spec.model_fields_set})


def load_profile(path: str | Path) -> Profile:
    path = Path(path)
    data = read_yaml_mapping(path, "profile", "fields (image, secrets, defaults, stages, ...)")
    try:
        return Profile.model_validate(data)
    except ValidationError as e:
        lines = [f"invalid profile {path}:"]
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(root)"
            msg = "unknown field; check the spelling" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  - {loc}: {msg}")
        raise ConfigError("\n".join(lines)) from None
