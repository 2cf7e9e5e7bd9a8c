"""The loop driver beneath every training stage.

A stage says what a batch is and what its loss is; `Loop` owns the rest of stepping:
the step counter and its stopping condition, resume from the newest checkpoint, the
progress bar, steady-state throughput, metric logging, periodic checkpoints (with a
tracker flush, so metrics up to a checkpoint survive a crash like the weights do),
fault injection, and the loop's part of the result record. With `history` (metric
names), every step's values of those metrics are kept in the loop state (so a resumed
run keeps the steps before its checkpoint) and written to `<stage>/history.json` when
the loop ends: the curve without MLflow (eval's report plots PPO's).

`fit` is the whole loop of a supervised stage (SFT, reward model): order -> batch ->
loss -> optimizer step -> metrics -> periodic evaluation -> log/checkpoint. PPO, whose
"step" is a rollout and several optimizer steps, drives `Loop` directly.

Gradient accumulation and mixed precision live here and in `Trainable`, once:
`accumulate` is one optimizer step over a batch in `grad_accum` micro-batches, each
forward under the model's autocast, each loss (a mean over its micro-batch) scaled by
the micro-batch's share of the batch's tokens or pairs, so the gradients add up to
those of the whole batch's mean loss; SFT, the reward model and PPO all step through it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from rlhf.train.checkpoint import resume_checkpoint, save_checkpoint
from rlhf.train.distributed import Dist
from rlhf.train.faults import Faults
from rlhf.train.preemption import PREEMPTED_EXIT_CODE, Preempted, Preemption
from rlhf.train.progress import StepClock, Timer, progress
from rlhf.train.schedule import batch_order
from rlhf.train.trainable import Trainable


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite."""


class Loop:
    """Step bookkeeping of one stage. Iterate it for the index of each step to run;
    call `advance` after the optimizer step and `end_step` once its metrics are known."""

    def __init__(self, stage: str, *, total: int, checkpoint_every: int, models: dict, state: dict, store, tracker,
                 dist: Dist, faults: Faults, fingerprint: str, quiet: bool, checkpoint_every_s: float | None = None,
                 history: tuple[str, ...] = ()):
        self.stage, self.total, self.checkpoint_every = stage, total, checkpoint_every
        self.history = history
        self.checkpoint_every_s, self.last_checkpoint = checkpoint_every_s, time.monotonic()
        self.preemption = Preemption()
        self.models, self.state = models, {"step": 0, **state, **({"history": []} if history else {})}
        self.store, self.tracker, self.dist, self.faults, self.fingerprint = store, tracker, dist, faults, fingerprint
        self.quiet = quiet or not dist.main
        self.clock = StepClock()  # steady-state throughput (the first 2 steps of the process are warm-up)
        self.bar = None

    @property
    def step(self) -> int:
        """Steps done (optimizer steps; PPO updates)."""
        return self.state["step"]

    @property
    def done(self) -> bool:
        return self.step >= self.total or bool(self.state.get("stopped"))

    def resume(self) -> bool:
        """Load the newest committed checkpoint into the models and the state, if any."""
        resumed = resume_checkpoint(self.store, self.stage, self.models, self.fingerprint, self.dist)
        if resumed:
            self.state.update(resumed)
        return bool(resumed)

    def __iter__(self) -> Iterator[int]:
        self.bar = progress(self.total, self.stage, self.quiet)
        self.bar.update(self.step)
        self.preemption.install()  # SIGTERM from here on: finish the step, checkpoint, exit 143
        try:
            while not self.done:
                yield self.step
        finally:
            self.preemption.uninstall()
        self.bar.close()
        if self.history and self.dist.main:
            self.store.write_json(f"{self.stage}/history.json", self.state["history"])

    def advance(self, units: float, **parts: float) -> int:
        """Count the step that just ran (its global work `units` for throughput, and its
        time split); returns the new step number."""
        self.state["step"] += 1
        self.clock.tick(units, **parts)
        return self.step

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log metrics at `step` (and keep the `history` ones in the state); `end_step` logs the step's."""
        if self.history:
            row = {k: metrics[k] for k in self.history if k in metrics}
            if row:
                self.state["history"].append({"step": step, **row})
        self.tracker.log_metrics(metrics, step=step)

    def end_step(self, metrics: dict[str, float], **postfix: str) -> None:
        """Log the step's metrics; checkpoint when due: every `checkpoint_every` steps, every
        `checkpoint_every_s` seconds, when the stage stopped early, or when SIGTERM came
        (then exit with 143 for the retry to resume here)."""
        self.bar.update(1)
        self.bar.set_postfix(**postfix)
        self.log(metrics, step=self.step)
        bad = sorted(k for k, v in metrics.items() if "loss" in k and isinstance(v, float) and not math.isfinite(v))
        if bad:  # never checkpoint a diverged model: the retry resumes from the last good one
            self.tracker.flush()
            raise TrainingDiverged(
                f"{self.stage}: training diverged at step {self.step}: {', '.join(f'{k} = {metrics[k]}' for k in bad)}; "
                f"no checkpoint was written for it. Lower {self.stage}.lr or raise warm-up, check the data; the newest "
                f"checkpoint before it is kept")
        self.faults.terminate_after_step(self.step, self.stage)  # preemption tests: SIGTERM mid-stage
        timed = self.checkpoint_every_s is not None and time.monotonic() - self.last_checkpoint >= self.checkpoint_every_s
        # every rank decides alike: a signal or a clock on any rank counts for all (one reduction)
        votes = self.dist.sum_dict({"term": float(self.preemption.requested), "timed": float(timed)})
        preempted = votes["term"] > 0
        if self.step % self.checkpoint_every == 0 or self.state.get("stopped") or preempted or votes["timed"] > 0:
            save_checkpoint(self.store, self.stage, self.step, self.models, self.state, self.fingerprint, self.dist)
            self.tracker.flush()
            self.last_checkpoint = time.monotonic()
        self.faults.after_step(self.step, self.stage)
        self.faults.pace(self.step, self.stage)
        if preempted and not self.done:
            self.bar.close()
            message = (f"{self.stage}: SIGTERM: stopped after step {self.step} of {self.total} and checkpointed it; "
                       f"exiting with {PREEMPTED_EXIT_CODE} for the retry to resume there")
            if self.dist.main:
                print(message, file=sys.stderr, flush=True)
            raise Preempted(message)

    def result(self, unit: str) -> dict:
        """The loop's part of the stage result (with the process's peak GPU memory on a GPU:
        what `rlhf plan` estimates)."""
        peak = (torch.cuda.max_memory_allocated(self.dist.device) / 2**30 if self.dist.device.type == "cuda"
                else None)
        return {"steps": self.step, "resumed_from": self.state.get("resumed_from"), f"{unit}_per_s": self.clock.rate(),
                "throughput": self.clock.summary(unit), "processes": self.dist.world, "peak_gpu_memory_gib": peak}


@dataclass
class StepLoss:
    """What a stage's loss function returns for one (micro-)batch."""

    loss: torch.Tensor
    """The mean loss over the (micro-)batch's tokens or pairs."""
    units: float
    """Work in this batch over every rank (tokens, pairs), for throughput."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Further per-step metrics (already averaged over ranks)."""
    postfix: dict[str, str] = field(default_factory=dict)
    """Progress-bar extras."""


def micro_batches(items: list, n: int) -> list[list]:
    """`items` in `n` consecutive, nearly equal, non-empty parts (fewer if there are fewer items)."""
    n = max(1, min(n, len(items)))
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out


@dataclass
class Auxiliary:
    """A second objective in the same optimizer step (PPO-ptx: the SFT loss of a batch of
    demonstrations beside the policy loss): its items, its loss, what that loss averages
    over, and its coefficient; its loss is reported as the metric `name`."""

    items: list
    loss_fn: Callable[[list], StepLoss]
    weigh: Callable[[list], float]
    coef: float
    name: str


def accumulate(model: Trainable, items: list, loss_fn: Callable[[list], StepLoss],
               weigh: Callable[[list], float], aux: Auxiliary | None = None) -> tuple[float, StepLoss]:
    """One optimizer step of `model` over `items` (this rank's share of a batch) in
    `model.grad_accum` micro-batches. `weigh(part)` is what the loss of a part averages
    over (its loss tokens, its pairs); each part's mean loss is scaled by its weight's
    share of the whole, so the step's gradient is that of the batch's mean loss. With one
    micro-batch the scale is exactly 1. `aux` adds `coef` times a second objective's
    batch mean loss, in as many micro-batches, to the same step. Returns the gradient
    norm and the batch's loss, units and metrics (weighted means of the parts'; the
    auxiliary loss under its name)."""
    groups = [(micro_batches(items, model.grad_accum), loss_fn, weigh, 1.0, None)]
    if aux is not None and aux.items:
        groups.append((micro_batches(aux.items, model.grad_accum), aux.loss_fn, aux.weigh, aux.coef, aux.name))
    n_parts = sum(len(g[0]) for g in groups)
    loss, units, metrics, postfix, done = None, 0.0, {}, {}, 0
    for parts, fn, weigh_fn, coef, name in groups:
        weights = [float(weigh_fn(p)) for p in parts]
        total = sum(weights) or 1.0
        for part, w in zip(parts, weights):
            done += 1
            model.micro_batch(last=done == n_parts)
            with model.autocast():
                out = fn(part)
            share = w / total
            model.backward(out.loss, share * coef)
            part_loss = out.loss.detach().float() * share if share != 1.0 else out.loss.detach().float()
            if name is not None:
                metrics[name] = metrics.get(name, 0.0) + float(part_loss)
                continue
            loss = part_loss if loss is None else loss + part_loss
            units += out.units
            for k, v in out.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + (v * share if share != 1.0 else v)
            postfix = out.postfix
    return model.optimizer_step(), StepLoss(loss, units, metrics, postfix)


@dataclass
class Evaluation:
    """Periodic evaluation inside `fit`: when it is due, and what it logs."""

    due: Callable[[int], bool]
    run: Callable[[int], dict[str, float]]
    unit: str
    """Throughput over the steps since the last evaluation is logged as perf/<unit>_per_s."""


@dataclass
class Batches:
    """Consecutive batches of an order fixed by (seed, epoch): the data position is the
    step count, so a resumed loop sees the same batches. Each rank takes its slice."""

    data: list
    batch_size: int
    seed: int
    lengths: list[int]
    group_by_length: bool
    dist: Dist
    _orders: dict = field(default_factory=dict)

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def __call__(self, step: int) -> list:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch not in self._orders:
            self._orders = {epoch: batch_order(self.lengths, self.batch_size, self.seed, epoch, self.group_by_length)}
        order = self._orders[epoch]
        return self.dist.shard([self.data[j] for j in order[i * self.batch_size:(i + 1) * self.batch_size]])


def fit(loop: Loop, model: Trainable, batches: Batches, loss_fn: Callable[[list], StepLoss], *, prefix: str,
        evaluation: Evaluation, log_epoch: bool = False, weigh: Callable[[list], float] = len) -> None:
    """Train `model` until the loop is done: each step takes a batch, its loss, one
    optimizer step (`accumulate`: micro-batches whose losses average over `weigh`);
    metrics `<prefix>/loss|grad_norm|lr` (and `<prefix>/epoch`) plus the stage's own;
    the evaluation when due (under the model's autocast), with the throughput since the
    last one."""
    window_units, window = 0.0, Timer()
    for step in loop:
        gnorm, out = accumulate(model, batches(step), loss_fn, weigh)
        step = loop.advance(out.units)
        window_units += out.units
        metrics = {f"{prefix}/loss": loop.dist.mean(out.loss.item()), **out.metrics,
                   f"{prefix}/grad_norm": gnorm, f"{prefix}/lr": model.lr()}
        if log_epoch:
            metrics[f"{prefix}/epoch"] = step / batches.steps_per_epoch
        if evaluation.due(step):
            with model.autocast():
                metrics.update(evaluation.run(step))
            metrics[f"perf/{evaluation.unit}_per_s"] = window_units / max(window(), 1e-9)
            window_units, window = 0.0, Timer()
        loop.end_step(metrics, loss=f"{out.loss.item():.3f}", **out.postfix)
