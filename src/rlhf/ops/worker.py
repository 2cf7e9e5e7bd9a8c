"""Entry point of every process of a distributed training stage.

torchrun (one node, `distributed.launch`) or a Kubeflow Trainer job (several nodes,
`trainjob.py`) starts `python -m rlhf.ops.worker` once per GPU with the usual RANK /
WORLD_SIZE / LOCAL_RANK variables and the stage's arguments as JSON in
RLHF_STAGE_REQUEST:

    {"kind": "pipeline", "args": {...runs.stage arguments...}}   # a pipeline step
    {"kind": "cli", "name": "sft", "config_json": "...", "output": "...", "quiet": true}

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


def run_request(request: dict) -> dict:
    if request.get("kind") == "pipeline":
        from rlhf.runs import stage

        return stage(**request["args"])
    if request.get("kind") == "cli":
        from rlhf.cli import run_stage
        from rlhf.config import PipelineConfig

        cfg = PipelineConfig.model_validate_json(request["config_json"])
        return run_stage(request["name"], cfg, request["output"], request.get("quiet", True), Settings.from_env())
    raise ValueError(f"RLHF_STAGE_REQUEST: unknown kind {request.get('kind')!r} (expected pipeline or cli)")


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
    settings = Settings.from_env()
    if not settings.stage_request:
        print("rlhf.ops.worker: RLHF_STAGE_REQUEST is not set; this module is started by `rlhf` itself "
              "(torchrun or a Kubeflow Trainer job), not by hand", file=sys.stderr)
        return 2
    try:
        run_request(json.loads(settings.stage_request))
        finish_process_group()
    except BaseException as e:
        if settings.worker_error_dir:
            msg = f"rank {settings.rank}: {type(e).__name__}: {e}"
            Path(settings.worker_error_dir, f"rank-{settings.rank:05d}.txt").write_text(msg)
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
