"""Starting a training stage in several processes: torchrun on this node (each process
runs `python -m rlhf.ops.worker`), or a Kubeflow Trainer job on several nodes
(`rlhf.ops.trainjob`). Which stages train is read from the stage table.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from rlhf.adapters.settings import Settings, child_process_env
from rlhf.config import PipelineConfig
from rlhf.train.distributed import DistributedError, uses_deepspeed, world_size
from rlhf.train.preemption import Preempted


def launcher_for(name: str, cfg: PipelineConfig, settings: Settings) -> str | None:
    """How a stage must be started from this process: "trainjob" (several nodes),
    "torchrun" (several processes here) or None (run it in this process)."""
    from rlhf.stages.table import STAGES

    if not STAGES[name].trains or settings.stage_request:  # not a training stage, or already a worker
        return None
    if settings.trainjob:
        return "trainjob"
    n = world_size(cfg)
    return "torchrun" if n > 1 or uses_deepspeed(cfg, n) else None  # DeepSpeed wants a launcher even for one


def launch(request: dict, nproc: int, settings: Settings) -> None:
    """Run the stage of `request` (`rlhf.dispatch.StageRequest.for_workers`) in `nproc`
    processes on this node with torchrun and wait; each process dispatches it again as
    its rank (`rlhf.ops.worker`), and rank 0 writes the stage's result to the store. A failure raises
    DistributedError with the first failing rank's error message."""
    with tempfile.TemporaryDirectory(prefix="rlhf-launch-") as tmp:
        env = child_process_env({"RLHF_STAGE_REQUEST": json.dumps(request), "RLHF_WORKER_ERROR_DIR": tmp})
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "rlhf.ops.worker"]
        proc = subprocess.Popen(cmd, env=env)
        # a preempted pod's SIGTERM reaches this process: pass it on to torchrun, which signals
        # every rank; they checkpoint the step in flight and exit (rlhf.train.preemption)
        forward = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM)) \
            if forward else None
        try:
            proc.wait()
        finally:
            if forward:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        if proc.returncode != 0:
            errors = sorted(Path(tmp).glob("rank-*.txt"), key=lambda p: p.stat().st_mtime)  # the first to fail
            detail = errors[0].read_text().strip() if errors else f"torchrun exited with status {proc.returncode}"
            if "Preempted:" in detail:  # the ranks checkpointed and stopped for SIGTERM: exit 143 for the retry
                raise Preempted(detail)
            raise DistributedError(f"stage {request.get('name')!r} failed in {nproc} processes: {detail}")
