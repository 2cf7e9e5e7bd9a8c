"""Scalar heads on a transformer backbone: sequence rewards and per-token values.

Reward and value models are `AutoModelForSequenceClassification(num_labels=1)`, so a
user can load them with plain transformers. We call the backbone and the head
ourselves to get (a) the score at the last non-pad token under any padding side and
(b) per-token values for the PPO critic, from the same weights.
"""

from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: 0 at each row's first real token."""
    pos = attention_mask.long().cumsum(-1) - 1  # (B, T)
    return pos.clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token of each row (works for left and right padding)."""
    T = attention_mask.shape[1]
    idx = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return (idx * attention_mask.long()).argmax(-1)  # (B,)


def _head(model) -> torch.nn.Module:
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if head is not None:
            return head
    raise TypeError(f"{type(model).__name__} has no scalar head (expected .score or .classifier)")


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Head applied at every position: (B, T) values."""
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids_from_mask(attention_mask))
    hidden = out.last_hidden_state  # (B, T, H)
    return _head(model)(hidden).squeeze(-1).float()  # (B, T)


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward: the head at the last non-pad token, (B,)."""
    values = token_values(model, input_ids, attention_mask)  # (B, T)
    return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)
