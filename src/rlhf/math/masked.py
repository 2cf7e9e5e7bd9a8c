"""Reductions over masked token positions.

RLHF tensors are (B, T) grids in which only some positions are real tokens
(response tokens, non-padding). Every statistic — loss means, advantage
whitening, KL means — must ignore the rest. A mask is a float or bool tensor
broadcastable to ``x`` where a non-zero entry means "this position counts".

Masked-out entries are *selected away* with ``torch.where`` rather than
multiplied by zero, so a NaN or inf sitting in a padded position (e.g. a
log-prob of a pad token) cannot leak into the result.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["masked_sum", "masked_mean", "masked_var", "masked_whiten", "Reduce"]

# Sums each value over processes (e.g. ``Distributed.sum_dict``): 0-d tensors in, floats out.
Reduce = Callable[[dict[str, torch.Tensor]], dict[str, float]]


def _keep(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Bool mask broadcast to ``x``'s shape."""
    return mask.to(torch.bool).expand_as(x)


def _count(x: torch.Tensor, mask: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Number of counted entries, in ``x``'s dtype (not clamped)."""
    keep = _keep(x, mask).to(x.dtype)
    if dim is None:
        return keep.sum()
    return keep.sum(dim=dim)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over the positions where ``mask`` is non-zero.

    dim=None reduces over all entries to a 0-d tensor; otherwise reduces ``dim``.
    """
    selected = torch.where(_keep(x, mask), x, torch.zeros_like(x))
    if dim is None:
        return selected.sum()
    return selected.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is non-zero.

    The count is clamped to >= 1 so an all-masked row/batch yields 0 instead of NaN.
    """
    total = masked_sum(x, mask, dim=dim)
    count = _count(x, mask, dim=dim).clamp(min=1)
    return total / count


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all masked entries, as a 0-d tensor.

    With ``unbiased`` and more than one counted entry, the Bessel correction
    (divide by n - 1) is applied; otherwise divide by n (clamped to >= 1).
    """
    mean = masked_mean(x, mask)
    squared_dev = masked_sum((x - mean) ** 2, mask)
    count = _count(x, mask, dim=None)
    if unbiased:
        denominator = torch.where(count > 1, count - 1, count.clamp(min=1))
    else:
        denominator = count.clamp(min=1)
    return squared_dev / denominator


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    *,
    reduce: Reduce | None = None,
) -> torch.Tensor:
    """Normalize ``x`` to zero mean / unit variance over masked entries.

    Used to whiten PPO advantages per batch (a standard PPO implementation
    detail, cf. Schulman et al. 2017, arXiv 1707.06347, and the InstructGPT
    PPO setup, arXiv 2203.02155). With ``shift_mean=False`` the mean is added
    back, so only the scale changes (used for rewards). Masked-out positions
    are returned as 0.

    ``reduce`` (e.g. ``dist.sum_dict``) whitens over the batch of *every*
    process, as if one process held it all: each process sends its masked
    ``sum``, ``sq`` (sum of squares) and ``n`` (count), the callback sums them,
    and mean and unbiased variance come from those totals in float64 Python
    arithmetic (var = (sq - n * mean^2) / (n - 1)). That one-pass formula is not
    bit-identical to the ``reduce=None`` two-pass path, only close; and there
    masked-out entries are multiplied by 0 rather than selected away, so a
    NaN/inf in a padded position would leak.
    """
    if reduce is not None:
        return _whiten_reduced(x, mask, shift_mean, eps, reduce)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(_keep(x, mask), whitened, torch.zeros_like(whitened))


def _whiten_reduced(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, eps: float, reduce: Reduce
) -> torch.Tensor:
    """``masked_whiten`` with statistics summed over processes by ``reduce``."""
    t = reduce({"sum": (x * mask).sum(), "sq": (x * x * mask).sum(), "n": mask.sum()})  # floats
    mean = t["sum"] / max(t["n"], 1.0)
    var = (t["sq"] - t["n"] * mean * mean) / max(t["n"] - 1, 1.0)
    whitened = (x - mean) / (max(var, 0.0) + eps) ** 0.5
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask
