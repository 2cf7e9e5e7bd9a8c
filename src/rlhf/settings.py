"""The one module that reads environment variables.

Everything else receives a `Settings` object (or values taken from it), so tests can
swap the environment without monkeypatching `os.environ` all over the code base.

Project variables share the prefix ``RLHF_``; standard variables that users already
set for MLflow, S3 and Hugging Face are honoured under their usual names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


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
    stage sends itself SIGKILL right after this optimizer step (or PPO update)."""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        threads = env.get("RLHF_NUM_THREADS")
        return cls(
            home=Path(env.get("RLHF_HOME", "runs")).expanduser(),
            mlflow_tracking_uri=env.get("MLFLOW_TRACKING_URI") or None,
            s3_endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("MLFLOW_S3_ENDPOINT_URL") or None,
            hf_home=env.get("HF_HOME") or None,
            quiet=env.get("RLHF_QUIET", "0").lower() in {"1", "true", "yes"},
            num_threads=int(threads) if threads else None,
            fault_kill_at_step=int(env["RLHF_FAULT_KILL_AT_STEP"]) if env.get("RLHF_FAULT_KILL_AT_STEP") else None,
        )


def maybe_inject_fault(step: int) -> None:
    """Die exactly like `kill -9` (no cleanup, no flush) when RLHF_FAULT_KILL_AT_STEP == step."""
    at = Settings.from_env().fault_kill_at_step
    if at is not None and step == at:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
