"""Per-token rewards and Generalized Advantage Estimation for PPO.

Each response is one episode whose actions are its tokens. ``mask`` (B, T)
marks the response tokens of each row; they are contiguous, and anything to
the right of the last one is padding.
"""

from __future__ import annotations

import torch

from rlhf.math.kl import kl_estimate

__all__ = ["gae", "shaped_rewards"]


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2015, arXiv 1506.02438).

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t   (value-function target)

    The episode ends at the last masked token, so V after it is 0. Padded
    positions have their rewards and values zeroed, which both gives V = 0
    past the end and makes them contribute nothing; their advantage and
    return are 0. Computed without gradient: these are regression targets.

    rewards, values, mask: (B, T). Returns (advantages, returns), each (B, T).
    """
    keep = mask.to(torch.bool)  # (B, T)
    zeros = torch.zeros_like(rewards)
    rewards = torch.where(keep, rewards, zeros)  # (B, T)
    values = torch.where(keep, values.to(rewards.dtype), zeros)  # (B, T)
    step_mask = keep.to(rewards.dtype)  # (B, T)

    batch_size, seq_len = rewards.shape
    advantages = torch.zeros_like(rewards)  # (B, T)
    next_value = rewards.new_zeros(batch_size)  # (B,)
    next_advantage = rewards.new_zeros(batch_size)  # (B,)
    for t in reversed(range(seq_len)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        advantage_t = (delta + gamma * lam * next_advantage) * step_mask[:, t]  # (B,)
        advantages[:, t] = advantage_t
        next_value = values[:, t]
        next_advantage = advantage_t

    returns = torch.where(keep, advantages + values, zeros)  # (B, T)
    return advantages, returns


@torch.no_grad()
def shaped_rewards(
    score: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    kl_estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO reward: KL penalty at every token, RM score at the last.

    InstructGPT (arXiv 2203.02155, eq. 2) and Ziegler et al. 2019 (arXiv
    1909.08593, §2.2) optimize R(x, y) = r(x, y) - beta * log(pi(y|x) / pi_ref(y|x)).
    Spread over tokens: each response token gets ``-kl_coef * kl_t`` and the
    reward-model ``score`` is added at the last response token of its row.

    score (B,); logprobs, ref_logprobs, mask (B, T).
    Returns (rewards, kl), each (B, T), 0 at masked-out positions.
    A row with no masked tokens gets no score.
    """
    keep = mask.to(torch.bool)  # (B, T)
    kl = kl_estimate(logprobs, ref_logprobs, kl_estimator)  # (B, T)
    kl = torch.where(keep, kl, torch.zeros_like(kl))  # (B, T)
    rewards = -kl_coef * kl  # (B, T)

    seq_len = mask.shape[1]
    positions = torch.arange(seq_len, device=mask.device).expand_as(keep)  # (B, T)
    last_index = torch.where(keep, positions, -1).max(dim=1).values  # (B,), -1 if row is empty
    is_last = positions == last_index.unsqueeze(1)  # (B, T)
    rewards = rewards + is_last.to(rewards.dtype) * score.to(rewards.dtype).unsqueeze(1)  # (B, T)
    return rewards, kl
