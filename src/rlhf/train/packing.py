"""Checking a packed batch layout once, on the first step of a process.

Packed rows with block-diagonal attention (SFT) and chosen/rejected pairs over their
shared prefix (reward model) depend on custom 4D attention masks, a transformers
feature some attention implementations ignore. Before using such a layout, a stage
computes one batch both ways; every rank must agree that they match.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from rlhf.train.distributed import Dist


def packed_layout_works(what: str, packed: Callable[[], Sequence[torch.Tensor]],
                        padded: Callable[[], Sequence[torch.Tensor]], dist: Dist, *, rtol: float, atol: float,
                        fallback: str) -> bool:
    """Whether `packed()` and `padded()` give the same tensors (to `rtol`/`atol`) on
    every rank; an error in the packed path counts as a mismatch and is reported."""
    with torch.no_grad():
        try:
            ok = all(torch.allclose(a, b, rtol=rtol, atol=atol) for a, b in zip(packed(), padded()))
        except (RuntimeError, ValueError, TypeError) as e:
            print(f"{what} unavailable ({type(e).__name__}: {e}); {fallback}")
            ok = False
    return dist.sum(float(not ok)) == 0 if dist.world > 1 else ok
