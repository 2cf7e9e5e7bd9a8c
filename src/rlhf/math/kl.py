"""Per-token KL estimators and KL-coefficient controllers.

The PPO stage penalizes the policy for drifting from the SFT (reference)
model: InstructGPT (arXiv 2203.02155, eq. 2) adds ``-beta * log(pi/pi_ref)``
to the reward at every token. With tokens sampled from the policy pi, the
per-token KL(pi || pi_ref) can be estimated by (Schulman, "Approximating KL
divergence", http://joschu.net/blog/kl-approx.html):

* k1 = log pi - log pi_ref            unbiased, high variance, can be negative
* k3 = (ratio - 1) - log ratio,       ratio = pi_ref / pi
                                      unbiased, lower variance, always >= 0
"""

from __future__ import annotations

import torch

__all__ = [
    "kl_k1",
    "kl_k3",
    "kl_estimate",
    "sequence_kl",
    "KL_ESTIMATORS",
    "FixedKLController",
    "AdaptiveKLController",
]

KL_ESTIMATORS = ("k1", "k3")


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 estimator: ``logprobs - ref_logprobs`` elementwise (same shape in/out)."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 estimator: ``exp(r) - 1 - r`` with ``r = ref_logprobs - logprobs``.

    Non-negative for every sample (since e^r >= 1 + r), and ~ k1**2 / 2 when
    the two distributions are close.
    """
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Dispatch to the named per-token KL estimator ("k1" or "k3")."""
    if estimator == "k1":
        return kl_k1(logprobs, ref_logprobs)
    if estimator == "k3":
        return kl_k3(logprobs, ref_logprobs)
    raise ValueError(f"unknown kl_estimator {estimator!r}; allowed values: {', '.join(KL_ESTIMATORS)}")


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(pi || pi_ref) of each whole response: k1 summed over its tokens.

    For a response sampled from pi, sum_t (log pi(y_t|.) - log pi_ref(y_t|.))
    = log pi(y) - log pi_ref(y), an unbiased estimate of the sequence-level
    KL (Schulman, "Approximating KL divergence"); evaluation reports it per
    prompt. logprobs, ref_logprobs, mask: (B, R); the mask is cast to the
    log-probs' dtype and multiplied in (so a NaN in a masked position leaks).
    Returns (B,).
    """
    per_token = (logprobs - ref_logprobs) * mask.to(logprobs.dtype)  # (B, R)
    return per_token.sum(1)  # (B,)


class FixedKLController:
    """Constant KL coefficient beta (InstructGPT uses a fixed beta, arXiv 2203.02155 §3.5)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op; present so both controllers are interchangeable."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller that steers the measured KL towards ``target``.

    Ziegler et al. 2019 (arXiv 1909.08593, §2.2):
        e_t  = clip(KL_t / target - 1, -0.2, 0.2)
        beta <- beta * (1 + K_beta * e_t),   K_beta = n_steps / horizon
    so beta grows when the policy drifts too far and shrinks when it stays close.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = float(current_kl) / self.target - 1.0
        proportional_error = min(max(proportional_error, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])
