"""Losses for the three training stages: SFT, reward model, PPO.

Every loss returns ``(loss, stats)``; ``loss`` carries gradient, ``stats``
maps names to detached 0-d tensors for logging.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf.math.masked import masked_mean, masked_sum

__all__ = [
    "gather_logprobs",
    "token_logprobs",
    "entropy_from_logits",
    "sft_loss",
    "pairwise_reward_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
]


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each token under ``softmax(logits / temperature)``, in float32.

    logits (B, R, V) must already be aligned with tokens (B, R): ``logits[:, r]``
    scores ``tokens[:, r]``. Sampling at temperature T draws from
    softmax(logits / T), so PPO's ratios and KL must score tokens under that
    same distribution. The division happens only when ``temperature != 1.0``
    and *before* the float32 cast (``(logits / T).float()``); for float32 logits
    that equals casting first, for bf16/fp16 the division rounds in low
    precision. Greedy decoding (temperature 0) is not a temperature: pass 1.0.

    Returns (B, R): ``out[b, r] = log softmax(logits[b, r] / T)[tokens[b, r]]``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (pass 1.0 for greedy decoding), got {temperature}")
    if temperature != 1.0:
        logits = logits / temperature  # (B, R, V)
    logprobs_all = torch.log_softmax(logits.float(), dim=-1)  # (B, R, V)
    return torch.gather(logprobs_all, dim=-1, index=tokens.unsqueeze(-1)).squeeze(-1)  # (B, R)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each next token under a causal LM.

    logits (B, T, V) at position t predict token t + 1, so position t is
    scored against ``labels[:, t + 1]``. Computed in float32 so bf16/fp16
    logits do not lose precision in the softmax normalizer.

    Returns (B, T - 1): ``out[:, t] = log p(labels[:, t + 1] | labels[:, :t + 1])``.
    """
    return gather_logprobs(logits[:, :-1, :], labels[:, 1:])  # (B, T-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at each position, in float32.

    logits (B, T, V) -> (B, T). Logged during PPO to watch for collapse.
    """
    logprobs_all = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    probs = logprobs_all.exp()  # (B, T, V)
    return -(probs * logprobs_all).sum(dim=-1)  # (B, T)


def sft_loss(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Supervised fine-tuning loss: mean next-token NLL over response tokens.

    InstructGPT (arXiv 2203.02155, §3.5) fine-tunes on demonstrations; only the
    response tokens are trained on, prompt tokens are context.

    logits (B, T, V); labels (B, T) are the input ids; loss_mask (B, T) marks the
    *label* tokens that are response tokens. The shift is done here: logits at
    position t score ``labels[:, t + 1]`` with weight ``loss_mask[:, t + 1]``.

    stats: ``nll_sum`` (summed NLL) and ``tokens`` (count, float) so callers can
    aggregate an exact token-weighted mean across batches.
    """
    logprobs = token_logprobs(logits, labels)  # (B, T-1)
    target_mask = loss_mask[:, 1:]  # (B, T-1)
    nll_sum = -masked_sum(logprobs, target_mask)
    tokens = target_mask.to(torch.bool).sum().to(nll_sum.dtype)
    loss = nll_sum / tokens.clamp(min=1)
    stats = {"nll_sum": nll_sum.detach(), "tokens": tokens.detach()}
    return loss, stats


def pairwise_reward_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry pairwise loss for the reward model.

    InstructGPT (arXiv 2203.02155, eq. 1): ``-log sigmoid(r(x, y_c) - r(x, y_r))``.
    With ``margin`` (tensor (B,) or float), Llama 2's variant (arXiv 2307.09288,
    eq. 2) subtracts it inside the sigmoid so clearly-better pairs must be
    separated by more.

    r_chosen, r_rejected: (B,) scalar rewards.
    """
    diff = r_chosen - r_rejected  # (B,)
    logits = diff if margin is None else diff - margin  # (B,)
    loss = -F.logsigmoid(logits).mean()
    stats = {
        "accuracy": (r_chosen > r_rejected).float().mean().detach(),
        "margin_mean": diff.mean().detach(),
        "reward_chosen": r_chosen.mean().detach(),
        "reward_rejected": r_rejected.mean().detach(),
    }
    return loss, stats


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate objective, negated to a loss.

    Schulman et al. 2017 (arXiv 1707.06347, eq. 7):
        L = -E[min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)]
          =  E[max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))]
    averaged over masked (response) tokens.

    All inputs (B, T). ``old_logprobs`` and ``advantages`` are rollout-time
    constants and are detached here.

    stats: ``clipfrac`` (share of tokens where the clipped term is strictly
    larger, i.e. the gradient is cut off), ``approx_kl`` (mean of
    0.5 * (log ratio)^2, k2 from Schulman's KL note), ``ratio_mean``.
    """
    old_logprobs = old_logprobs.detach()
    advantages = advantages.detach()

    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)  # (B, T)
    per_token = torch.maximum(unclipped, clipped)  # (B, T)
    loss = masked_mean(per_token, mask)

    stats = {
        "clipfrac": masked_mean((clipped > unclipped).to(per_token.dtype), mask).detach(),
        "approx_kl": masked_mean(0.5 * log_ratio.detach() ** 2, mask),
        "ratio_mean": masked_mean(ratio.detach(), mask),
    }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value-function loss.

    The value head is kept near its rollout-time prediction the same way the
    policy is (PPO2-style value clipping; Schulman et al. 2017, arXiv
    1707.06347, as used in Ziegler et al. 2019, arXiv 1909.08593):
        v_clipped = old + clamp(v - old, -eps, eps)
        L = 0.5 * E[max((v - R)^2, (v_clipped - R)^2)]
    averaged over masked tokens. All inputs (B, T); ``old_values`` and
    ``returns`` are detached.

    stats: ``vf_clipfrac`` (share where the clipped error is strictly larger),
    ``value_mean``.
    """
    old_values = old_values.detach()
    returns = returns.detach()

    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)  # (B, T)
    error_unclipped = (values - returns) ** 2  # (B, T)
    error_clipped = (values_clipped - returns) ** 2  # (B, T)
    per_token = torch.maximum(error_unclipped, error_clipped)  # (B, T)
    loss = 0.5 * masked_mean(per_token, mask)

    stats = {
        "vf_clipfrac": masked_mean((error_clipped > error_unclipped).to(per_token.dtype), mask).detach(),
        "value_mean": masked_mean(values.detach(), mask),
    }
    return loss, stats
