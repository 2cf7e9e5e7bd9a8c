"""Training across processes: the GPUs of one node with DeepSpeed, the same code in one.

A training stage (sft, reward, ppo) is written once. It asks `setup()` for its place
in the job (`Dist`: rank, world size, device) and wraps each model it trains in a
`Trainable`, which steps it either with plain torch (one process, the default on a
CPU or a single GPU) or with a DeepSpeed engine (ZeRO-0/1/2/3, CPU offload, bf16)
whose config `deepspeed_config()` generates from the stage's own settings.

Who does what in a job of N processes:
  - every rank trains on its 1/N slice of each global batch (`Dist.shard`); DeepSpeed
    averages gradients, so a step sees the whole batch;
  - every rank evaluates the whole held-out set (same number of forwards on each rank,
    which ZeRO-3 needs, and no reduction to get wrong);
  - rank 0 alone logs to MLflow and writes results and models to the store;
  - checkpoints are collective: each rank saves its ZeRO partition, each node uploads
    its files, rank 0 commits (`save_checkpoint` / `resume_checkpoint` in stages.common).

The processes are started by torchrun (`launch()` on one node; a Kubeflow Trainer
job on several, see trainjob.py), never by a launcher of our own; each runs
`python -m rlhf.ops.worker`.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from rlhf.config import DistributedConfig, PipelineConfig
from rlhf.adapters.settings import Settings, child_process_env


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


def world_size(cfg: PipelineConfig) -> int:
    """Processes per node a training stage asks for (0 = one per visible GPU)."""
    n = cfg.distributed.num_processes
    if n:
        return n
    if cfg.device != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1


def uses_deepspeed(cfg: PipelineConfig, world: int) -> bool:
    engine = cfg.distributed.engine
    return engine == "deepspeed" or (engine == "auto" and world > 1)


def setup(cfg: PipelineConfig, settings: Settings | None = None) -> Dist:
    """Threads, TF32, the device, and (in a multi-process job) the process group."""
    settings = settings or Settings.from_env()
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

            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # (`deepspeed.comm.torch` the attribute is torch)
        if not torch.distributed.is_initialized():  # torchrun set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*
            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False,
                                       auto_mpi_discovery=False)
    return Dist(settings.rank, world, settings.local_rank, settings.node_rank, device, ds)


def check_divisible(batch_sizes: dict[str, int], world: int) -> None:
    bad = {k: v for k, v in batch_sizes.items() if v % world}
    if bad:
        fields = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise DistributedError(f"{fields} must divide by the {world} training processes (each takes an equal slice "
                               "of every batch): change the batch size or distributed.num_processes")


# ----------------------------------------------------------------------------- DeepSpeed config


def bf16_enabled(dcfg: DistributedConfig, device: torch.device) -> bool:
    if dcfg.bf16 is not None:
        return dcfg.bf16
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def deepspeed_config(dcfg: DistributedConfig, *, batch_size: int, world: int, grad_clip: float | None, lr: float,
                     weight_decay: float = 0.0, eps: float = 1e-8, bf16: bool = False) -> dict:
    """The DeepSpeed config of one trained model, from the stage's settings.

    `batch_size` is the global batch of one optimizer step (split evenly over ranks,
    no gradient accumulation). Without offload the optimizer is our own torch AdamW
    (passed to deepspeed.initialize, so one process and N processes run the same
    update); with optimizer offload DeepSpeed's CPU Adam replaces it (config
    `optimizer` block), as ZeRO-Offload requires."""
    zero: dict[str, Any] = {"stage": dcfg.zero_stage}
    if dcfg.zero_stage >= 2:
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=5e7)
    if dcfg.zero_stage >= 1:
        zero["allgather_bucket_size"] = 5e7
    if dcfg.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_prefetch_bucket_size=5e7,
                    stage3_param_persistence_threshold=1e5)
    if dcfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if dcfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    cfg: dict[str, Any] = {
        "train_batch_size": batch_size,
        "train_micro_batch_size_per_gpu": batch_size // world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip or 0.0,  # 0: no clipping
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if dcfg.offload_optimizer:
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay, "eps": eps,
                                                        "betas": [0.9, 0.999]}}
    return cfg


# ----------------------------------------------------------------------------- trained models


def fused_adamw(device: torch.device) -> dict:
    """AdamW's fused kernel where torch has one: one kernel for all parameters instead
    of a loop of small ops (CPU: 0.8 ms instead of 3.7 ms a step for a 1M-parameter
    model, benchmarks/features.py). The update is the same to float rounding."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


class Trainable:
    """A model with its AdamW optimiser and LR schedule, stepped the same way with or
    without DeepSpeed. Call it like the model (the forward goes through the engine);
    `.module` is the plain transformers model (generation, heads, saving)."""

    def __init__(self, model: torch.nn.Module, dist: Dist, dcfg: DistributedConfig, *, lr: float, grad_clip: float | None,
                 batch_size: int, weight_decay: float = 0.0, eps: float = 1e-8,
                 schedule: Callable[[int], float] | None = None):
        self.dist, self.grad_clip, self.zero3 = dist, grad_clip, dist.deepspeed and dcfg.zero_stage == 3
        if dcfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = model.to(dist.device)
        params = [p for p in model.parameters() if p.requires_grad]
        self.params = params
        if not dist.deepspeed:
            self.engine = None
            self.model = model
            # compiled forward over the same parameters; `.module` stays the plain model (saving, generation)
            self.forward = torch.compile(model, dynamic=True) if dcfg.compile else model
            self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, eps=eps, **fused_adamw(dist.device))
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule) if schedule else None
            return
        import deepspeed

        self.bf16 = bf16_enabled(dcfg, dist.device)
        ds_cfg = deepspeed_config(dcfg, batch_size=batch_size, world=dist.world, grad_clip=grad_clip, lr=lr,
                                  weight_decay=weight_decay, eps=eps, bf16=self.bf16)
        client_opt = None if dcfg.offload_optimizer else torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                                                                           eps=eps, **fused_adamw(dist.device))
        make_sched = (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule)) if schedule else None
        self.engine, self.opt, _, self.sched = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=client_opt, lr_scheduler=make_sched, config=ds_cfg)
        self.model = self.engine.module
        if dcfg.compile:
            self.engine.compile(compile_kwargs={"dynamic": True})
        self.forward = self.engine

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def train(self, mode: bool = True) -> "Trainable":
        (self.engine or self.model).train(mode)
        return self

    def eval(self) -> "Trainable":
        return self.train(False)

    def step(self, loss: torch.Tensor) -> float:
        """Backward, clip, optimizer and schedule step; returns the gradient norm."""
        if self.engine is None:
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip) if self.grad_clip else float("nan")
            self.opt.step()
            if self.sched:
                self.sched.step()
            return float(gnorm)
        self.engine.backward(loss)
        self.engine.step()
        gnorm = self.engine.get_global_grad_norm()
        return float(gnorm) if gnorm is not None else float("nan")

    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def gathered(self, modify: bool = False):
        """Context in which every parameter is whole on every rank (ZeRO-3); a no-op otherwise.
        With `modify`, what rank 0 changes inside it is kept (broadcast, re-partitioned)."""
        if not self.zero3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=0 if modify else None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights as CPU tensors on every rank (collective under ZeRO-3)."""
        with self.gathered():
            return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        with self.gathered(modify=True):
            self.model.load_state_dict(weights)

    # torch path: what goes into a checkpoint's objects.pt
    def objects(self) -> dict[str, Any]:
        out = {"opt": self.opt.state_dict()}
        if self.sched is not None:
            out["sched"] = self.sched.state_dict()
        return out

    def load_objects(self, objects: dict[str, Any]) -> None:
        self.opt.load_state_dict(objects["opt"])
        if self.sched is not None:
            self.sched.load_state_dict(objects["sched"])


def save_trained(model: Trainable, tok, store, key: str, tracker, kind: str) -> str | None:
    """Rank 0 writes the trained model (safetensors + tokenizer) to `key` in the store
    and logs it to MLflow as `kind`; returns its MLflow URI (None on other ranks).
    Every rank calls it: under ZeRO-3 all of them take part in gathering the weights."""
    from rlhf.models import save_model

    with model.gathered():
        if model.dist.main:
            with tempfile.TemporaryDirectory() as tmp:
                store.put_dir(save_model(model.module, tok, Path(tmp) / "model"), key)
    return tracker.log_model(store.get_dir(key), kind) if model.dist.main else None


def frozen(model: torch.nn.Module, dist: Dist, dcfg: DistributedConfig) -> torch.nn.Module:
    """A model that is only scored with (reference policy, reward model): eval mode, no
    gradients, replicated on every GPU, in bf16 when the trained models are."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if dist.deepspeed and bf16_enabled(dcfg, dist.device):
        model = model.to(torch.bfloat16)
    return model.to(dist.device)


def scratch_dir(store_uri: str, stage: str, dist: Dist) -> Path:
    """A folder every rank of this node agrees on (same path, no coordination), for
    DeepSpeed checkpoint files on their way to or from the store."""
    import hashlib

    key = hashlib.sha256(f"{store_uri}|{stage}".encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"rlhf-dist-{key}-node{dist.node}"


# ----------------------------------------------------------------------------- launching


TRAINING_STAGES = ("sft", "reward", "ppo")


def launcher_for(name: str, cfg: PipelineConfig, settings: Settings) -> str | None:
    """How a stage must be started from this process: "trainjob" (several nodes),
    "torchrun" (several processes here) or None (run it in this process)."""
    if name not in TRAINING_STAGES or settings.stage_request:  # not a training stage, or already a worker
        return None
    if settings.trainjob:
        return "trainjob"
    n = world_size(cfg)
    return "torchrun" if n > 1 or uses_deepspeed(cfg, n) else None  # DeepSpeed wants a launcher even for one


def launch(request: dict, nproc: int, settings: Settings) -> None:
    """Run `runs.stage(**request)` in `nproc` processes on this node with torchrun and
    wait; rank 0 writes the stage's result to the store as usual. A failure raises
    DistributedError with the first failing rank's error message."""
    with tempfile.TemporaryDirectory(prefix="rlhf-launch-") as tmp:
        env = child_process_env({"RLHF_STAGE_REQUEST": json.dumps(request), "RLHF_WORKER_ERROR_DIR": tmp})
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "rlhf.ops.worker"]
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0:
            errors = sorted(Path(tmp).glob("rank-*.txt"), key=lambda p: p.stat().st_mtime)  # the first to fail
            detail = errors[0].read_text().strip() if errors else f"torchrun exited with status {proc.returncode}"
            raise DistributedError(f"stage {request.get('name')!r} failed in {nproc} processes: {detail}")
