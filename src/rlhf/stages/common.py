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


def lr_lambda(warmup: int, total: int, floor: float = 0.1):
    """Linear warm-up then cosine decay to `floor` x peak."""
    import math

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress_))

    return f


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

    d = cfg.model_dump(exclude={"tracking", "num_threads", "device", "eval", "gate"})
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class CheckpointMismatch(RuntimeError):
    pass


KEEP_CHECKPOINTS = 2


def _checkpoints(store, stage: str) -> list[str]:
    """Committed checkpoint prefixes of a stage, oldest first."""
    base = f"{stage}/checkpoints"
    return [f"{base}/{d}" for d in store.list_dirs(base) if d.startswith("step-") and store.is_committed(f"{base}/{d}")]


def save_checkpoint(store, stage: str, step: int, models: dict, optimizers: dict, state: dict,
                    cfg: PipelineConfig) -> None:
    """Write a checkpoint locally (atomic), commit it to the store, prune old ones.

    Checkpoints live in the artifact store, not on the worker's disk, so a retried
    pipeline task on another machine finds them. The store's commit marker is what
    makes one count: a kill mid-upload leaves the previous checkpoint as the newest."""
    import tempfile

    from rlhf import checkpoint

    objects = {name: o.state_dict() for name, o in optimizers.items()}
    with tempfile.TemporaryDirectory(prefix="rlhf-ckpt-") as tmp:
        path = checkpoint.save(Path(tmp), step, models=models, objects=objects,
                               state={**state, "config_fingerprint": config_fingerprint(cfg)})
        store.put_dir(path, f"{stage}/checkpoints/{path.name}", move=True)
    for old in _checkpoints(store, stage)[:-KEEP_CHECKPOINTS]:
        store.delete(old)


def resume_checkpoint(store, stage: str, models: dict, optimizers: dict, cfg: PipelineConfig) -> dict | None:
    """Load the stage's newest committed checkpoint into models/optimizers; return its state or None.

    Refuses checkpoints written under a different training config: resuming them
    would silently mix two runs."""
    from rlhf import checkpoint

    found = _checkpoints(store, stage)
    if not found:
        return None
    path = store.get_dir(found[-1])  # verified against its sha256 manifest
    written = json.loads((path / "state.json").read_text()).get("config_fingerprint")
    if written != config_fingerprint(cfg):
        raise CheckpointMismatch(
            f"{store.uri(found[-1])} was written with a different configuration; to start this stage over, delete "
            f"{store.uri(stage + '/checkpoints')} (or use a new --output folder); to resume it, rerun with the "
            "original config")
    objects, state = checkpoint.load(path, models=models)
    state.pop("config_fingerprint", None)
    for name, o in optimizers.items():
        o.load_state_dict(objects[name])
    state["resumed_from"] = state["step"]
    return state


def clean_state_dict(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
