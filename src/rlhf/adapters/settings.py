"""The one module that reads environment variables.

Everything else receives a `Settings` object (or values taken from it), so tests can
swap the environment without monkeypatching `os.environ` all over the code base.

Project variables share the prefix ``RLHF_``; standard variables that users already
set for MLflow, S3 and Hugging Face are honoured under their usual names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.redaction import check_transport, redact, register


@dataclass(frozen=True)
class Settings:
    home: Path
    """RLHF_HOME: default root for run outputs and the embedded MLflow database."""
    mlflow_tracking_uri: str | None
    """MLFLOW_TRACKING_URI: when unset, stages log to an embedded sqlite database."""
    s3_endpoint_url: str | None
    """AWS_ENDPOINT_URL_S3 (or MLFLOW_S3_ENDPOINT_URL): S3-compatible endpoint."""
    hf_home: str | None
    """HF_HOME: Hugging Face cache (read by transformers itself; recorded for logs)."""
    quiet: bool
    """RLHF_QUIET=1 turns progress bars off (same as --quiet)."""
    num_threads: int | None
    """RLHF_NUM_THREADS: torch intra-op threads; default leaves torch's choice."""
    fault_kill_at_step: int | None = None
    """RLHF_FAULT_KILL_AT_STEP: fault injection for crash-recovery tests: a training
    stage sends itself SIGKILL right after this optimizer step (or PPO update).
    `ppo:6` limits it to one stage (sft, reward, ppo)."""
    fault_kill_stage: str | None = None
    """The stage part of RLHF_FAULT_KILL_AT_STEP (`ppo:6` -> "ppo"); None = any stage."""
    fault_term_at_step: int | None = None
    """RLHF_FAULT_TERM_AT_STEP: preemption tests: a training stage sends itself SIGTERM as
    this step ends (`ppo:2` for one stage), as a preempted node's kubelet would."""
    fault_term_stage: str | None = None
    fault_pace_dir: str | None = None
    """RLHF_FAULT_PACE_DIR: outage tests: while `<dir>/slow` exists, every training step
    sleeps `<dir>/slow`'s number of seconds and appends "stage step unix-time" to
    `<dir>/steps.log`, so a tiny stage lasts through a long outage."""
    fault_promote_barrier: str | None = None
    """RLHF_FAULT_PROMOTE_BARRIER: race tests: promote waits (up to 10 min) until two
    processes have reached it through this folder, so two runs' evals both precede both
    promotions and one of them loses the race for `@champion`."""
    fault_hold_finish: str | None = None
    """RLHF_FAULT_HOLD_FINISH: outage tests: the exit task waits (up to 10 min) for
    `<dir>/go` before it touches the registry, logging each attempt in `<dir>/attempts`."""
    image: str = "ghcr.io/rlhf-pipeline/rlhf:0.1.0"
    """RLHF_IMAGE: the training image the KFP components run in (read at compile time)."""
    retry_backoff: str = "30s"
    """RLHF_RETRY_BACKOFF: first wait before a failed training step is retried (doubling
    after), compiled into the pipeline spec."""
    git_sha: str | None = None
    """RLHF_GIT_SHA: commit of the running code (images bake it in); else `git rev-parse`."""
    error_file: str | None = None
    """RLHF_ERROR_FILE: set by `rlhf run` so a failing step leaves its error message for
    the command's last line."""
    aws_region: str | None = None
    """AWS_REGION (else AWS_DEFAULT_REGION): S3 region; None leaves boto3's own lookup
    (~/.aws/config). Local S3 servers accept any region."""
    s3_max_attempts: int = 8
    """RLHF_S3_MAX_ATTEMPTS: attempts per S3 request (first try included) for throttling
    (503 SlowDown, 429) and dropped connections; access errors are never retried."""
    s3_outage_tolerance_s: float = 120.0
    """RLHF_S3_OUTAGE_TOLERANCE_S: how long a request keeps retrying while the S3 server
    does not answer at all (refused or timed-out connections: a restarting SeaweedFS or
    MinIO pod) before the stage fails; 0 leaves only the RLHF_S3_MAX_ATTEMPTS retries."""
    artifact_root: str | None = None
    """RLHF_ARTIFACT_ROOT: where pipeline runs put their artifacts, a local folder or
    s3://bucket/prefix; None means a folder under `home`."""
    stack_dir: Path | None = None
    """RLHF_STACK_DIR: state folder of the local stack (`rlhf stack up`); default
    <home>/.stack. Filled in from `home` when left None."""
    aws_access_key_id: str | None = field(default=None, repr=False)
    """AWS_ACCESS_KEY_ID: carried so a Settings built from another environment (the local
    stack's, in tests) reaches boto3 without touching os.environ. Never logged."""
    aws_secret_access_key: str | None = field(default=None, repr=False)
    """AWS_SECRET_ACCESS_KEY: see `aws_access_key_id`. Never logged."""
    aws_session_token: str | None = field(default=None, repr=False)
    """AWS_SESSION_TOKEN: temporary credentials (SSO, assumed roles) need it with the two
    keys above, so it travels with them. Never logged."""
    kfp_host: str | None = None
    """KF_PIPELINES_ENDPOINT (the kfp SDK's own variable): Kubeflow Pipelines API/UI URL,
    the default of `rlhf submit|schedule|runs --host`."""
    kfp_token: str | None = field(default=None, repr=False)
    """KF_PIPELINES_TOKEN: bearer token for the Kubeflow Pipelines API (`--token-file`
    wins over it). Never logged."""
    kfp_token_path: str | None = None
    """KF_PIPELINES_SA_TOKEN_PATH (the kfp SDK's own variable): file holding a projected
    service-account token, read when no token is given otherwise (in-cluster Jobs)."""
    mlflow_tracking_token: str | None = field(default=None, repr=False)
    """MLFLOW_TRACKING_TOKEN (read by the MLflow client itself): known here so that it is
    never printed and never sent over plain http. Never logged."""
    mlflow_tracking_password: str | None = field(default=None, repr=False)
    """MLFLOW_TRACKING_PASSWORD: see `mlflow_tracking_token`. Never logged."""
    stack_admin_password: str | None = field(default=None, repr=False)
    """RLHF_STACK_ADMIN_PASSWORD: the MLflow admin password of a local stack folder that has
    none yet (`rlhf stack up`, `rlhf run --stack`); default: a random one, kept in the
    folder's auth/credentials.json. Never logged."""
    insecure: bool = False
    """RLHF_INSECURE=1 (or `--insecure`): allow a token or password over plain http to a
    host outside this machine or the cluster (`rlhf.redaction.check_transport`)."""
    rank: int = 0
    """RANK (set by torchrun / the Kubeflow Trainer): this process's rank in a distributed stage."""
    world_size: int = 1
    """WORLD_SIZE: processes in a distributed stage (1 = not distributed)."""
    local_rank: int = 0
    """LOCAL_RANK: rank on this node; picks the GPU."""
    node_rank: int = 0
    """GROUP_RANK (torchrun) or NODE_RANK: which node this process runs on."""
    stage_request: str | None = None
    """RLHF_STAGE_REQUEST: JSON arguments of `runs.stage` for `python -m rlhf.ops.worker`, the
    entry point of each process of a distributed stage (set by the launcher)."""
    worker_error_dir: str | None = None
    """RLHF_WORKER_ERROR_DIR: where each process of a local multi-process stage leaves its
    error message for the launcher (set by `distributed.launch`)."""
    warm_steps: bool = True
    """RLHF_WARM_STEPS=0 makes `rlhf run` start every step in a fresh Python, as kfp.local
    does, instead of forking it from a preloaded one (rlhf.pipelines.local.warm)."""
    trainjob: str | None = None
    """RLHF_TRAINJOB: JSON spec of the Kubeflow Trainer job that runs this stage on several
    nodes; compiled onto the step by a profile with `nodes > 1` (no secret values)."""

    def __post_init__(self):
        if self.stack_dir is None:
            object.__setattr__(self, "stack_dir", Path(self.home) / ".stack")
        # every secret this process knows is masked wherever it would be printed or logged
        register(self.aws_secret_access_key, self.aws_session_token, self.kfp_token, self.mlflow_tracking_token,
                 self.mlflow_tracking_password, self.stack_admin_password)

    def check_tracking_transport(self, uri: str) -> str:
        """`uri`, once it is safe to send this process's MLflow credentials to it (a token,
        a password, or user:password@ in the URI itself); `rlhf.redaction.InsecureTransport` otherwise."""
        secret = bool(self.mlflow_tracking_token or self.mlflow_tracking_password) or redact(uri) != uri
        check_transport(uri, secret, self.insecure, "MLflow tracking URI")
        return uri

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        threads = env.get("RLHF_NUM_THREADS")
        fault = env.get("RLHF_FAULT_KILL_AT_STEP", "").strip()
        term = env.get("RLHF_FAULT_TERM_AT_STEP", "").strip()
        return cls(
            home=Path(env.get("RLHF_HOME", "runs")).expanduser(),
            mlflow_tracking_uri=env.get("MLFLOW_TRACKING_URI") or None,
            s3_endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("MLFLOW_S3_ENDPOINT_URL") or None,
            hf_home=env.get("HF_HOME") or None,
            quiet=env.get("RLHF_QUIET", "0").lower() in {"1", "true", "yes"},
            num_threads=int(threads) if threads else None,
            fault_kill_at_step=int(fault.rpartition(":")[2]) if fault else None,
            fault_kill_stage=fault.rpartition(":")[0] or None if fault else None,
            fault_term_at_step=int(term.rpartition(":")[2]) if term else None,
            fault_pace_dir=env.get("RLHF_FAULT_PACE_DIR") or None,
            fault_promote_barrier=env.get("RLHF_FAULT_PROMOTE_BARRIER") or None,
            fault_hold_finish=env.get("RLHF_FAULT_HOLD_FINISH") or None,
            fault_term_stage=term.rpartition(":")[0] or None if term else None,
            image=env.get("RLHF_IMAGE") or cls.image,
            retry_backoff=env.get("RLHF_RETRY_BACKOFF") or cls.retry_backoff,
            git_sha=env.get("RLHF_GIT_SHA") or None,
            error_file=env.get("RLHF_ERROR_FILE") or None,
            aws_region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            s3_max_attempts=_positive_int(env, "RLHF_S3_MAX_ATTEMPTS", 8),
            s3_outage_tolerance_s=_seconds(env, "RLHF_S3_OUTAGE_TOLERANCE_S", 120.0),
            artifact_root=env.get("RLHF_ARTIFACT_ROOT") or None,
            stack_dir=Path(env["RLHF_STACK_DIR"]).expanduser() if env.get("RLHF_STACK_DIR") else None,
            aws_access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
            aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            aws_session_token=env.get("AWS_SESSION_TOKEN") or None,
            kfp_host=env.get("KF_PIPELINES_ENDPOINT") or None,
            kfp_token=env.get("KF_PIPELINES_TOKEN") or None,
            kfp_token_path=env.get("KF_PIPELINES_SA_TOKEN_PATH") or None,
            mlflow_tracking_token=env.get("MLFLOW_TRACKING_TOKEN") or None,
            mlflow_tracking_password=env.get("MLFLOW_TRACKING_PASSWORD") or None,
            stack_admin_password=env.get("RLHF_STACK_ADMIN_PASSWORD") or None,
            insecure=env.get("RLHF_INSECURE", "0").lower() in {"1", "true", "yes"},
            rank=int(env.get("RANK") or 0),
            world_size=int(env.get("WORLD_SIZE") or 1),
            local_rank=int(env.get("LOCAL_RANK") or 0),
            node_rank=int(env.get("GROUP_RANK") or env.get("NODE_RANK") or 0),
            stage_request=env.get("RLHF_STAGE_REQUEST") or None,
            worker_error_dir=env.get("RLHF_WORKER_ERROR_DIR") or None,
            trainjob=env.get("RLHF_TRAINJOB") or None,
            warm_steps=env.get("RLHF_WARM_STEPS", "1").lower() not in {"0", "false", "no"},
        )


def _positive_int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name}={raw!r}: expected a whole number >= 1 (unset it for the default {default})")
    return value


def _seconds(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name}={raw!r}: expected seconds >= 0 (unset it for the default {default:g})")
    return value


MULTIPART_MIN_BYTES = 64 * 2**20
"""Files from this size up move between MLflow clients and S3 in parts, through URLs the
server presigns; only smaller ones pass through the server (which writes each upload
whole to its temporary disk first, and each download too). 64 MiB keeps that disk's use
per request small beside the chart's 2 GiB /tmp, while a model's config, tokenizer and
small shards still take one request each."""

MLFLOW_TRANSFER_ENV = {
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "true",
    "MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE": str(MULTIPART_MIN_BYTES),
    "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "true",
    "MLFLOW_MULTIPART_DOWNLOAD_MINIMUM_FILE_SIZE": str(MULTIPART_MIN_BYTES),
}
"""The MLflow client settings of every process that talks to a tracking server: large
artifacts go straight to and from S3 (see MULTIPART_MIN_BYTES). A value already in the
environment wins."""


def use_direct_artifact_transfers() -> None:
    """Apply MLFLOW_TRANSFER_ENV to this process's environment (where the MLflow client
    reads it) without overriding what the user set."""
    for name, value in MLFLOW_TRANSFER_ENV.items():
        os.environ.setdefault(name, value)


def child_process_env(overrides: dict[str, str | None]) -> dict[str, str]:
    """The environment for a child process (the local stack's servers): ours, with
    `overrides` applied (None removes a variable). Lives here so that os.environ is
    read in one module only."""
    env = dict(os.environ)
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env
