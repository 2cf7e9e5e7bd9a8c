"""Processes and devices: the GPUs of one node with DeepSpeed, the same code in one.

A training stage (sft, reward, ppo) is written once. It asks `setup()` for its place
in the job (`Dist`: rank, world size, device) and wraps each model it trains in a
`Trainable` (train/trainable.py), which steps it either with plain torch (one
process, the default on a CPU or a single GPU) or with a DeepSpeed engine.

Who does what in a job of N processes:
  - every rank trains on its 1/N slice of each global batch (`Dist.shard`); DeepSpeed
    averages gradients, so a step sees the whole batch;
  - every rank evaluates the whole held-out set (same number of forwards on each rank,
    which ZeRO-3 needs, and no reduction to get wrong);
  - rank 0 alone logs to MLflow and writes results and models to the store;
  - checkpoints are collective: each rank saves its ZeRO partition, each node uploads
    its files, rank 0 commits (`save_checkpoint` / `resume_checkpoint` in train/checkpoint.py).

The processes are started by torchrun (`rlhf.ops.launch` on one node; a Kubeflow
Trainer job on several, `rlhf.ops.trainjob`), never by a launcher of our own; each
runs `python -m rlhf.ops.worker`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlhf.adapters.settings import Settings


class DistributedError(RuntimeError):
    pass


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly one-process) training job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    node: int = 0
    device: torch.device = torch.device("cpu")
    deepspeed: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def node_main(self) -> bool:
        return self.local_rank == 0

    def shard(self, items: list) -> list:
        """This rank's contiguous slice of a global batch. A batch that does not divide
        evenly (an epoch's last) is first filled up with its own first items, as
        torch's DistributedSampler does, so every rank gets the same non-empty count."""
        if self.world == 1 or not items:
            return items
        n = -(-len(items) // self.world)  # per rank, rounded up
        filled = [items[i % len(items)] for i in range(n * self.world)]
        return filled[self.rank * n:(self.rank + 1) * n]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, x: float) -> float:
        """Average of a number over ranks (metrics: every rank saw a different slice)."""
        if self.world == 1:
            return float(x)
        t = torch.tensor([float(x)], dtype=torch.float64, device=self._comm_device)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world

    def sum(self, x: float) -> float:
        if self.world == 1:
            return float(x)
        t = torch.tensor([float(x)], dtype=torch.float64, device=self._comm_device)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def sum_dict(self, values: dict[str, float]) -> dict[str, float]:
        """Each number summed over ranks, in one reduction."""
        if self.world == 1:
            return {k: float(v) for k, v in values.items()}
        t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=self._comm_device)
        torch.distributed.all_reduce(t)
        return dict(zip(values, t.tolist()))

    def mean_dict(self, values: dict[str, float]) -> dict[str, float]:
        """Each number averaged over ranks, in one reduction."""
        return {k: v / self.world for k, v in self.sum_dict(values).items()}

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's value of a picklable object, on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def world_size(cfg) -> int:
    """Processes per node a training stage asks for (0 = one per visible GPU)."""
    n = cfg.distributed.num_processes
    if n:
        return n
    if cfg.device != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1


def uses_deepspeed(cfg, world: int) -> bool:
    engine = cfg.distributed.engine
    return engine == "deepspeed" or (engine == "auto" and world > 1)


def setup(cfg, settings: Settings) -> Dist:
    """Threads, TF32, the device, and (in a multi-process job) the process group. `cfg`
    is a stage's `Runtime` (or the `PipelineConfig`): device, num_threads, distributed."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.set_device(settings.local_rank)
        device = torch.device("cuda", settings.local_rank)
    else:
        device = torch.device("cpu")
    world = settings.world_size
    ds = uses_deepspeed(cfg, world)
    if world > 1 or ds:
        if world > 1 and not ds:
            raise DistributedError(f"{world} processes need DeepSpeed: set distributed.engine to auto or deepspeed")
        import deepspeed

        if not cuda:
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel for
            # inference at start-up (a C++ compiler on every CPU machine, seconds per
            # process); training reduces through gloo, so go without it.
            import importlib

            # (the module `deepspeed.comm.torch`: the attribute of that name is torch itself)
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        if not torch.distributed.is_initialized():  # torchrun set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*
            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False,
                                       auto_mpi_discovery=False)
    return Dist(settings.rank, world, settings.local_rank, settings.node_rank, device, ds)


def setup_one_process(cfg) -> torch.device:
    """Threads, TF32 and the device of a stage that always runs in one process (eval):
    no process group, whatever `distributed` says."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.use_deterministic_algorithms(False)
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        torch.backends.cuda.matmul.allow_tf32 = True
        return torch.device("cuda")
    return torch.device("cpu")


def check_divisible(batch_sizes: dict[str, int], world: int, grad_accum: int = 1) -> None:
    """Each process takes an equal slice of every batch, in `grad_accum` equal micro-batches."""
    bad = {k: v for k, v in batch_sizes.items() if v % (world * grad_accum)}
    if bad:
        fields = ", ".join(f"{k}={v}" for k, v in bad.items())
        accum = f" x {grad_accum} micro-batches (grad_accum_steps)" if grad_accum > 1 else ""
        raise DistributedError(f"{fields} must divide by the {world} training processes{accum} (each takes an equal "
                               "slice of every batch): change the batch size, distributed.num_processes or "
                               "grad_accum_steps")
