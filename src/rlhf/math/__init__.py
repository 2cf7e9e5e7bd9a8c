"""Pure tensor math for the RLHF engine: masked reductions, losses, KL, GAE,
reward normalisation.

Imports only torch and the standard library; tensors and masks in, tensors
(and a stats dict for losses) out. Sums over processes come in through a `reduce`
callback, never a process group. See docs/architecture.md.
"""

from rlhf.math.advantages import gae, shaped_rewards
from rlhf.math.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_k1,
    kl_k3,
    sequence_kl,
)
from rlhf.math.losses import (
    entropy_from_logits,
    gather_logprobs,
    pairwise_reward_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sft_loss,
    token_logprobs,
)
from rlhf.math.masked import Reduce, masked_mean, masked_sum, masked_var, masked_whiten
from rlhf.math.rewards import MeanReduce, normalize_scores, score_stats

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "Reduce",
    "gather_logprobs",
    "token_logprobs",
    "entropy_from_logits",
    "sft_loss",
    "pairwise_reward_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "gae",
    "shaped_rewards",
    "kl_k1",
    "kl_k3",
    "kl_estimate",
    "sequence_kl",
    "KL_ESTIMATORS",
    "FixedKLController",
    "AdaptiveKLController",
    "score_stats",
    "normalize_scores",
    "MeanReduce",
]
