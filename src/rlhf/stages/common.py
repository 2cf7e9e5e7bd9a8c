"""Helpers every stage shares: devices, seeding, batching, progress, results."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from rlhf.config import PipelineConfig
from rlhf.data.processing import read_jsonl_rows


def setup_torch(cfg: PipelineConfig) -> torch.device:
    """Threads, TF32 and the device of a one-process stage (eval); training stages use
    `distributed.setup`, which also joins the process group of a multi-GPU job."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.use_deterministic_algorithms(False)
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        torch.backends.cuda.matmul.allow_tf32 = True
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def progress(total: int, desc: str, quiet: bool):
    return tqdm(total=total, desc=desc, disable=quiet, dynamic_ncols=True, leave=False)


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def pad_right(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask, both (B, T)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_left(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, T - len(s):] = 1
    return ids, mask


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation fixed by (seed, epoch): the data position is just a step count."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def lr_lambda(warmup: int, total: int, kind: str = "cosine", floor: float = 0.1):
    """LR factor after `step` scheduler steps: linear warm-up over `warmup` steps, then
    cosine decay to `floor` x peak, linear decay to 0 (as the Hugging Face Trainer's
    "linear"), or constant."""
    import math

    if kind not in ("cosine", "linear", "constant"):
        raise ValueError(f"unknown lr schedule {kind!r} (expected cosine, linear or constant)")

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress_ = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress_
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress_))

    return f


def batch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[int]:
    """The order of one epoch, read in consecutive batches of `batch_size`.

    Plain: a permutation fixed by (seed, epoch). Grouped by length: that permutation is
    cut into chunks of 64 batches, each chunk sorted by length (longest first) and cut
    into batches, and the batches are shuffled, so each batch holds sequences of about
    one length (padding is waste: every pad token costs a full forward and backward)
    while the epoch still visits every row once in a random batch order."""
    order = epoch_order(len(lengths), seed, epoch)
    if not group_by_length or batch_size <= 1:
        return order
    chunk = 64 * batch_size
    batches: list[list[int]] = []
    for c in range(0, len(order), chunk):
        part = sorted(order[c:c + chunk], key=lambda i: -lengths[i])
        batches += [part[b:b + batch_size] for b in range(0, len(part), batch_size)]
    last = batches.pop() if len(order) % batch_size else None  # a short batch stays last (same step count)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7_777)
    out = [i for k in torch.randperm(len(batches), generator=g).tolist() for i in batches[k]]
    return out + (last or [])


class StepClock:
    """Steady-state throughput of a training loop: `tick(units)` at the end of every
    step; the first `untimed` steps of this process (warm-up: allocator, thread pools,
    first-call kernels) are not counted, so rates are comparable between runs of any
    length. Evaluations and checkpoints between two timed step ends count."""

    def __init__(self, untimed: int = 2):
        untimed = max(untimed, 1)  # the clock starts at the end of a step: at least the first is untimed
        self.untimed, self.ticks, self.units, self.t0, self.t_last = untimed, 0, 0.0, None, None
        self.parts: dict[str, float] = {}

    def tick(self, units: float = 1.0, **parts: float) -> None:
        now = time.perf_counter()
        self.ticks += 1
        if self.ticks == self.untimed:
            self.t0 = now
        elif self.ticks > self.untimed:
            self.units += units
            for k, v in parts.items():
                self.parts[k] = self.parts.get(k, 0.0) + v
        self.t_last = now

    @property
    def timed_steps(self) -> int:
        return max(0, self.ticks - self.untimed)

    @property
    def seconds(self) -> float:
        return (self.t_last - self.t0) if self.t0 is not None else 0.0

    def rate(self) -> float | None:
        """Units per second over the timed steps (None when too few steps ran)."""
        return self.units / self.seconds if self.timed_steps and self.seconds > 0 else None

    def summary(self, unit: str) -> dict:
        return {"untimed_steps": self.untimed, "timed_steps": self.timed_steps, "timed_s": self.seconds,
                f"{unit}_per_s": self.rate(), **{f"{k}_s": v for k, v in self.parts.items()}}


class PrepData:
    """The committed output of data prep, read back for later stages."""

    def __init__(self, store):
        self.dir = store.get_dir("prep")
        self.manifest = json.loads((self.dir / "report.json").read_text())

    def rows(self, name: str):
        return read_jsonl_rows(self.dir / f"{name}.jsonl", name.split("_")[0])  # e.g. "sft_train" -> kind "sft"

    @property
    def tokenizer_dir(self) -> Path | None:
        p = self.dir / "tokenizer"
        return p if p.is_dir() else None


def write_result(store, stage: str, result: dict) -> None:
    store.write_json(f"{stage}/result.json", result)


def tokenize_pair(tok, prompt: str, response: str) -> tuple[list[int], int]:
    """prompt + response + EOS token ids, and the prompt length."""
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p + r, len(p)


def config_fingerprint(cfg: PipelineConfig) -> str:
    """Hash of everything that shapes training (not tracking, threads or eval settings)."""
    import hashlib

    # the process count is checked on its own (a clearer message); these two change no number
    d = cfg.model_dump(exclude={"tracking": True, "num_threads": True, "device": True, "eval": True, "gate": True,
                                "distributed": {"num_processes", "gradient_checkpointing", "zero3_generation"}})
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class CheckpointMismatch(RuntimeError):
    pass


KEEP_CHECKPOINTS = 2


def _checkpoints(store, stage: str) -> list[str]:
    """Committed checkpoint prefixes of a stage, oldest first."""
    base = f"{stage}/checkpoints"
    return [f"{base}/{d}" for d in store.list_dirs(base)
            if d.startswith("step-") and ".node-" not in d and store.is_committed(f"{base}/{d}")]


def _split(models: dict) -> tuple[dict, dict, dict]:
    """Trainables (with or without a DeepSpeed engine) and plain weights of a checkpoint."""
    from rlhf.train.distributed import Trainable

    engines = {k: m for k, m in models.items() if isinstance(m, Trainable) and m.engine is not None}
    plain = {k: (m.module if isinstance(m, Trainable) else m) for k, m in models.items() if k not in engines}
    objects_of = {k: m for k, m in models.items() if isinstance(m, Trainable) and m.engine is None}
    return engines, plain, objects_of


def save_checkpoint(store, stage: str, step: int, models: dict, state: dict, cfg: PipelineConfig, dist=None) -> None:
    """Write a checkpoint, commit it to the store, prune old ones. Every rank calls it.

    `models` maps names to `Trainable`s (weights, optimiser and schedule), modules or
    plain state dicts. Checkpoints live in the artifact store, not on the worker's
    disk, so a retried pipeline task on another machine finds them; the store's commit
    marker is what makes one count, so a kill mid-upload leaves the previous one newest.

    One process: one folder (safetensors, objects.pt, state.json) written locally and
    moved into the store. DeepSpeed: each model's `engine.save_checkpoint` (every rank
    writes its ZeRO partition, plus its RNG state) into a folder shared by the node's
    ranks; each node but the first uploads its part as `step-N.node-K`, then rank 0
    uploads node 0's part with our own files as `step-N`, committed last."""
    import tempfile

    from rlhf.train import checkpoint

    engines, plain, objects_of = _split(models)
    state = {**state, "config_fingerprint": config_fingerprint(cfg), "world_size": dist.world if dist else 1}
    if not engines:
        objects = {f"{k}.{o}": v for k, t in objects_of.items() for o, v in t.objects().items()}
        with tempfile.TemporaryDirectory(prefix="rlhf-ckpt-") as tmp:
            path = checkpoint.save(Path(tmp), step, models=plain, objects=objects, state=state)
            store.put_dir(path, f"{stage}/checkpoints/{path.name}", move=True)
    else:
        import shutil

        import torch

        from rlhf.train.distributed import scratch_dir

        name = f"step-{step:08d}"
        local = scratch_dir(store.uri(""), stage, dist) / name
        if dist.node_main:
            shutil.rmtree(local, ignore_errors=True)
            local.mkdir(parents=True)
        dist.barrier()
        for k, t in engines.items():
            t.engine.save_checkpoint(str(local / f"ds-{k}"), tag="ckpt", save_latest=False)
        torch.save(checkpoint.rng_state(), local / f"rng-rank-{dist.rank:05d}.pt")
        nodes = _nodes(dist)  # collective: every rank
        if dist.main:
            checkpoint.save(local / "main", step, models=plain, objects={}, state={**state, "nodes": nodes}, keep=1)
        dist.barrier()
        if dist.node_main and not dist.main:
            store.put_dir(local, f"{stage}/checkpoints/{name}.node-{dist.node}")
        dist.barrier()
        if dist.main:
            store.put_dir(local, f"{stage}/checkpoints/{name}")
        dist.barrier()
        if dist.node_main:
            shutil.rmtree(local, ignore_errors=True)
    if dist is None or dist.main:
        for old in _checkpoints(store, stage)[:-KEEP_CHECKPOINTS]:
            for part in [old, *(f"{old}.node-{n}" for n in range(1, 1 + _nodes_of(store, old)))]:
                store.delete(part)
    if dist is not None:
        dist.barrier()


def _nodes(dist) -> int:
    import torch

    if dist.world == 1:
        return 1
    t = torch.tensor([dist.node], device=dist._comm_device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item()) + 1


def _nodes_of(store, prefix: str) -> int:
    """Node parts beside a checkpoint (DeepSpeed on several nodes), read from its state."""
    key = f"{prefix}/main/{prefix.rsplit('/', 1)[-1]}/state.json"
    return json.loads(store.read_bytes(key)).get("nodes", 1) - 1 if store.exists(key) else 0


def resume_checkpoint(store, stage: str, models: dict, cfg: PipelineConfig, dist=None) -> dict | None:
    """Load the stage's newest committed checkpoint into `models` (see save_checkpoint);
    return its state, or None when there is none. Every rank calls it.

    Refuses checkpoints written under a different training config or process count:
    resuming them would silently mix two runs (ZeRO partitions depend on the count)."""
    from rlhf.train import checkpoint

    engines, plain, objects_of = _split(models)
    found = _checkpoints(store, stage)
    if not found:
        return None
    world = dist.world if dist else 1
    if not engines:
        path = store.get_dir(found[-1])  # verified against its sha256 manifest
        _check_resumable(store, found[-1], _written_state(path), cfg, world)
        objects, state = checkpoint.load(path, models=plain)
        for k, t in objects_of.items():
            t.load_objects({o.split(".", 1)[1]: v for o, v in objects.items() if o.startswith(f"{k}.")})
    else:
        import shutil

        import torch

        from rlhf.train.distributed import scratch_dir

        local = scratch_dir(store.uri(""), stage, dist) / "resume"
        if dist.node_main:
            shutil.rmtree(local, ignore_errors=True)
            store.get_dir(found[-1], local)
            for n in range(1, 1 + _nodes_of(store, found[-1])):  # other nodes' ZeRO partitions
                store.get_dir(f"{found[-1]}.node-{n}", local)
        dist.barrier()
        _check_resumable(store, found[-1], _written_state(local), cfg, world)
        main = next((local / "main").glob("step-*"))
        objects, state = checkpoint.load(main, models=plain)
        for k, t in engines.items():
            t.engine.load_checkpoint(str(local / f"ds-{k}"), tag="ckpt")
        checkpoint.set_rng_state(torch.load(local / f"rng-rank-{dist.rank:05d}.pt", weights_only=True))
        dist.barrier()
        if dist.node_main:
            shutil.rmtree(local, ignore_errors=True)
    for key in ("config_fingerprint", "world_size", "nodes"):
        state.pop(key, None)
    state["resumed_from"] = state["step"]
    return state


def _written_state(path: Path) -> dict:
    """state.json of a checkpoint folder, one-process or DeepSpeed layout (main/step-N/)."""
    found = [path / "state.json", *sorted((path / "main").glob("step-*/state.json"))]
    return next((json.loads(f.read_text()) for f in found if f.is_file()), {})


def _check_resumable(store, prefix: str, written: dict, cfg: PipelineConfig, world: int) -> None:
    if written.get("config_fingerprint") != config_fingerprint(cfg):
        raise CheckpointMismatch(
            f"{store.uri(prefix)} was written with a different configuration; to start this stage over, delete "
            f"{store.uri(prefix.rsplit('/', 1)[0])} (or use a new --output folder); to resume it, rerun with the "
            "original config")
    if written.get("world_size", 1) != world:
        raise CheckpointMismatch(
            f"{store.uri(prefix)} was written by {written.get('world_size', 1)} training processes and this run has "
            f"{world}; resume with the same distributed.num_processes / GPU count, or delete "
            f"{store.uri(prefix.rsplit('/', 1)[0])} to start the stage over")


def clean_state_dict(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
