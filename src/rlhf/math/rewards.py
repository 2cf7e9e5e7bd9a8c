"""Normalisation of reward-model scores before they enter PPO's rewards.

A reward model trained with a pairwise loss has an arbitrary offset and scale
(only differences are learnt), so PPO standardises its score with statistics
measured once on samples of the initial (SFT) policy, as Ziegler et al. 2019
(arXiv 1909.08593) normalise the reward to mean 0 and variance 1 on samples
of the initial policy; the KL coefficient then has a meaning independent of
the reward model.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["score_stats", "normalize_scores", "MeanReduce"]

# Averages each value over processes (e.g. ``Distributed.mean_dict``): 0-d tensors in, floats out.
MeanReduce = Callable[[dict[str, torch.Tensor]], dict[str, float]]


def score_stats(scores: torch.Tensor, mean_reduce: MeanReduce | None = None) -> tuple[float, float]:
    """(mean, std) of reward-model scores on samples of the initial policy.

    scores: (N,) float. One process (``mean_reduce=None``): ``scores.mean()``
    and the unbiased (n - 1) ``scores.std()``, floored at 1e-6. Several
    processes: ``mean_reduce`` averages each process's mean and mean square,
    and std = sqrt(max(E[s^2] - E[s]^2, 1e-12)), the *population* (divide by n)
    std. So the two paths differ by a factor sqrt(n / (n - 1)) in std, and the
    averaged means equal the global ones only when every process holds the
    same number of scores.
    """
    if mean_reduce is None:
        return float(scores.mean()), float(scores.std().clamp(min=1e-6))
    m = mean_reduce({"m": scores.mean(), "sq": (scores * scores).mean()})  # floats
    return float(m["m"]), float(max(m["sq"] - m["m"] ** 2, 1e-12) ** 0.5)


def normalize_scores(
    raw: torch.Tensor,
    mean: float,
    std: float,
    has_eos: torch.Tensor,
    clip: float | None = None,
    missing_eos_penalty: float = 0.0,
) -> torch.Tensor:
    """Standardised, optionally clipped score, minus a penalty for missing EOS.

    raw: (B,) reward-model scores; ``mean``/``std`` from ``score_stats``.
    ``clip`` (when truthy) bounds the score to [-clip, clip] so outliers of
    the reward model cannot dominate an update. A response cut off at the
    length limit without EOS is scored as if complete, so it loses
    ``missing_eos_penalty`` (as TRL's ``missing_eos_penalty``). has_eos: (B,)
    bool (``~`` on an integer tensor would be a bitwise not). Returns (B,).
    """
    score = (raw - mean) / std  # (B,)
    if clip:
        score = score.clamp(-clip, clip)  # (B,)
    return score - missing_eos_penalty * (~has_eos).float()  # (B,)
