"""What a training loop steps through: the learning-rate schedule and the order of
the data (fixed by seed and epoch, so a resumed run sees the same batches)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation fixed by (seed, epoch): the data position is just a step count."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def lr_lambda(warmup: int, total: int, kind: str = "cosine", floor: float = 0.1):
    """LR factor after `step` scheduler steps: linear warm-up over `warmup` steps, then
    cosine decay to `floor` x peak, linear decay to 0 (as the Hugging Face Trainer's
    "linear"), or constant."""
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


def steps_per_epoch(rows: int, batch_size: int) -> int:
    """Optimizer steps in one pass over `rows` rows (the last batch may be short)."""
    return math.ceil(rows / batch_size)
