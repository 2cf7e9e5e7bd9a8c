"""A trained model with its optimiser and schedule, stepped the same way with plain
torch (one process) or a DeepSpeed engine (ZeRO-0/1/2/3, CPU offload, bf16), whose
config `deepspeed_config()` generates from the stage's own settings; plus the
replicated frozen models (reference policy, reward model) and saving a trained one.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from rlhf.config import DistributedConfig
from rlhf.train.distributed import Dist


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, dcfg: DistributedConfig, device: torch.device) -> str:
    """fp32, bf16 or fp16 from `train.precision` (auto: bf16 on a GPU that supports it,
    fp32 elsewhere); the older `distributed.bf16`, when set, decides auto."""
    if precision != "auto":
        return precision
    if dcfg.bf16 is not None:
        return "bf16" if dcfg.bf16 else "fp32"
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def deepspeed_config(dcfg: DistributedConfig, *, batch_size: int, world: int, grad_clip: float | None, lr: float,
                     weight_decay: float = 0.0, eps: float = 1e-8, precision: str = "fp32",
                     grad_accum: int = 1) -> dict:
    """The DeepSpeed config of one trained model, from the stage's settings.

    `batch_size` is the global batch of one optimizer step, split evenly over ranks and
    then into `grad_accum` micro-batches. Without offload the optimizer is our own torch
    AdamW (passed to deepspeed.initialize, so one process and N processes run the same
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
        "train_micro_batch_size_per_gpu": batch_size // (world * grad_accum),
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip or 0.0,  # 0: no clipping
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # dynamic loss scaling (loss_scale 0), as torch's GradScaler on the plain path
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
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
    `.module` is the plain transformers model (generation, heads, saving).

    One optimizer step is `grad_accum` calls of `backward` (one per micro-batch, each
    loss scaled by its share of the step's tokens or pairs) and one `optimizer_step`;
    `step(loss)` is both at once. Forwards run inside `autocast()`: bf16 or fp16 mixed
    precision on the plain-torch path (fp32 master weights, a dynamic loss scaler for
    fp16); DeepSpeed keeps its own bf16 / fp16 weights, so there it is a no-op."""

    def __init__(self, model: torch.nn.Module, dist: Dist, dcfg: DistributedConfig, *, lr: float,
                 grad_clip: float | None,
                 batch_size: int, weight_decay: float = 0.0, eps: float = 1e-8,
                 schedule: Callable[[int], float] | None = None, precision: str = "fp32", grad_accum: int = 1):
        self.dist, self.grad_clip, self.zero3 = dist, grad_clip, dist.deepspeed and dcfg.zero_stage == 3
        self.precision, self.grad_accum = resolve_precision(precision, dcfg, dist.device), grad_accum
        if dcfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = model.to(dist.device)
        params = [p for p in model.parameters() if p.requires_grad]
        self.params = params
        self.scaler = None
        if not dist.deepspeed:
            self.engine = None
            self.model = model
            # compiled forward over the same parameters; `.module` stays the plain model (saving, generation)
            self.forward = torch.compile(model, dynamic=True) if dcfg.compile else model
            self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, eps=eps, **fused_adamw(dist.device))
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule) if schedule else None
            if self.precision == "fp16":
                self.scaler = torch.amp.GradScaler(dist.device.type)
            return
        import deepspeed

        ds_cfg = deepspeed_config(dcfg, batch_size=batch_size, world=dist.world, grad_clip=grad_clip, lr=lr,
                                  weight_decay=weight_decay, eps=eps, precision=self.precision, grad_accum=grad_accum)
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

    def autocast(self):
        """The context of this model's forwards (and of the losses computed from them)."""
        if self.engine is not None or self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=DTYPES[self.precision])

    def micro_batch(self, last: bool) -> None:
        """Before each micro-batch's forward: whether it is the step's last. DeepSpeed is
        told the accumulation boundary rather than counting micro-batches, so a short last
        batch of an epoch (fewer micro-batches than grad_accum) still ends its step."""
        if self.engine is not None:
            self.engine.set_gradient_accumulation_boundary(last)

    def backward(self, loss: torch.Tensor, scale: float = 1.0) -> None:
        """Add `scale * loss`'s gradient to the step's (one micro-batch of it)."""
        if scale != 1.0:
            loss = loss * scale
        if self.engine is None:
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            return
        self.engine.backward(loss, scale_wrt_gas=False)  # already scaled by its share of the step

    def optimizer_step(self) -> float:
        """Clip, optimizer and schedule step after the step's micro-batches; returns the
        gradient norm before clipping (NaN when not clipping on the plain path)."""
        if self.engine is not None:
            self.engine.step()
            gnorm = self.engine.get_global_grad_norm()
            return float(gnorm) if gnorm is not None else float("nan")
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip) if self.grad_clip else float("nan")
        if self.scaler is not None:
            self.scaler.step(self.opt)  # skipped when the scaled gradients overflowed
            self.scaler.update()
        else:
            self.opt.step()
        if self.sched:
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(gnorm)

    def step(self, loss: torch.Tensor) -> float:
        """Backward, clip, optimizer and schedule step of a one-micro-batch step."""
        self.micro_batch(last=True)
        self.backward(loss)
        return self.optimizer_step()

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
        if self.scaler is not None:
            out["scaler"] = self.scaler.state_dict()
        return out

    def load_objects(self, objects: dict[str, Any]) -> None:
        self.opt.load_state_dict(objects["opt"])
        if self.sched is not None:
            self.sched.load_state_dict(objects["sched"])
        if self.scaler is not None and "scaler" in objects:
            self.scaler.load_state_dict(objects["scaler"])


def save_trained(model: Trainable, tok, store, key: str, tracker, kind: str) -> str | None:
    """Rank 0 writes the trained model (safetensors + tokenizer) to `key` in the store
    and logs it to MLflow as `kind` (not without a `tracker`); returns its MLflow URI
    (None on other ranks).
    Every rank calls it: under ZeRO-3 all of them take part in gathering the weights."""
    from rlhf.models import save_model

    with model.gathered():
        if model.dist.main:
            with tempfile.TemporaryDirectory() as tmp:
                store.put_dir(save_model(model.module, tok, Path(tmp) / "model"), key)
    return tracker.log_model(store.get_dir(key), kind) if model.dist.main and tracker is not None else None


def frozen(model: torch.nn.Module, dist: Dist, dcfg: DistributedConfig, precision: str = "fp32") -> torch.nn.Module:
    """A model that is only scored with (reference policy, reward model): eval mode, no
    gradients, replicated on every GPU, in bf16 / fp16 when the trained models compute in it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    dtype = DTYPES[resolve_precision(precision, dcfg, dist.device)]
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.to(dist.device)


def make_trainable(model: torch.nn.Module, dist: Dist, dcfg: DistributedConfig, optim, *, total_steps: int,
                   batch_size: int, lr: float | None = None, eps: float = 1e-8, precision: str = "fp32") -> Trainable:
    """A `Trainable` in train mode from a stage's `OptimConfig` fields (lr, weight decay,
    clip, warm-up and schedule over `total_steps` optimizer steps, gradient accumulation)
    and the run's precision; `lr` overrides the section's (PPO's value model has its own)."""
    from rlhf.train.schedule import lr_lambda

    return Trainable(model, dist, dcfg, lr=optim.lr if lr is None else lr, weight_decay=optim.weight_decay, eps=eps,
                     grad_clip=optim.grad_clip, batch_size=batch_size,
                     schedule=lr_lambda(optim.warmup_steps, total_steps, optim.lr_schedule), precision=precision,
                     grad_accum=optim.grad_accum_steps).train()
