"""Entry point of every process of a distributed training stage.

torchrun (one node, `distributed.launch`) or a Kubeflow Trainer job (several nodes,
`trainjob.py`) starts `python -m rlhf.ops.worker` once per GPU with the usual RANK /
WORLD_SIZE / LOCAL_RANK variables and one request shape as JSON in
RLHF_STAGE_REQUEST: a `rlhf.dispatch.StageRequest` plus the config,

    {"name": "sft", "run_root": "...", "dataset_root": "...", "parent_run_id": "", "options": {},
     "quiet": true, "tracking": true, "config_json": "..."}

Each process runs the stage; rank 0 logs and writes the result to the store, where
the launcher reads it. A failing process leaves its message in RLHF_WORKER_ERROR_DIR
(when set) so the launcher can say what went wrong instead of "exit status 1".
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from rlhf.adapters.settings import Settings
from rlhf.redaction import guard_streams, redact
from rlhf.train.preemption import PREEMPTED_EXIT_CODE, Preempted


def run_request(request: dict, settings: Settings) -> dict:
    """The stage of `request` (`rlhf.dispatch.StageRequest` plus the config JSON), run
    through the one dispatcher, as this process's rank."""
    from rlhf.dispatch import StageRequest, dispatch

    req, cfg = StageRequest.of_worker(request)
    return dispatch(req, cfg, settings)


def finish_process_group() -> None:
    """Wait for every rank, then tear the process group down before the interpreter
    exits. Without it a rank that finishes first (rank 0 may still be writing the
    model) exits with gloo/NCCL threads alive and C++ aborts it ("terminate called
    without an active exception", SIGABRT), failing the whole job. Only on success:
    after a failure the other ranks may never reach the barrier."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.barrier()
        td.destroy_process_group()


def main() -> int:
    guard_streams()  # each process's log passes through the one redaction, as the CLI's and a step's do
    settings = Settings.from_env()
    if not settings.stage_request:
        print("rlhf.ops.worker: RLHF_STAGE_REQUEST is not set; this module is started by `rlhf` itself "
              "(torchrun or a Kubeflow Trainer job), not by hand", file=sys.stderr)
        return 2
    try:
        run_request(json.loads(settings.stage_request), settings)
        finish_process_group()
    except BaseException as e:
        if settings.worker_error_dir:
            msg = redact(f"rank {settings.rank}: {type(e).__name__}: {e}")
            Path(settings.worker_error_dir, f"rank-{settings.rank:05d}.txt").write_text(msg)
        if isinstance(e, Preempted):  # checkpointed and stopped for SIGTERM: no traceback, the retry code
            print(f"rank {settings.rank}: {e}", file=sys.stderr, flush=True)
            return PREEMPTED_EXIT_CODE
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
