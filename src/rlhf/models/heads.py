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


def shared_prefix_batch(pairs, pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen and rejected of each pair packed into one row that holds their common
    prefix once: `[chosen | rejected after the prefix]`.

    The rejected tokens take the positions they would have alone (k, k+1, ... for a
    prefix of k tokens) and a block mask lets them attend to the prefix and to each
    other, never to chosen's own tokens, so every token sees exactly the context it
    has in its own sequence and the scores equal two separate forwards (to float
    rounding). Each side keeps at least its last token (where it is scored) out of the
    prefix. Rows are right-padded; a pad attends only to itself.

    Returns input_ids (B, L), position_ids (B, L), attention_mask (B, 1, L, L) bool,
    chosen_index and rejected_index (B,): where each side's last token sits."""
    rows, positions, ends = [], [], []
    for c, r in pairs:
        k, most = 0, min(len(c), len(r)) - 1
        while k < most and c[k] == r[k]:
            k += 1
        rows.append((list(c) + list(r[k:]), len(c), k))
        positions.append(list(range(len(c))) + list(range(k, len(r))))
    B, L = len(rows), max(len(x) for x, _, _ in rows)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    mask = torch.eye(L, dtype=torch.bool).repeat(B, 1, 1)  # (B, L, L); pads see themselves only
    for i, ((x, lc, k), p) in enumerate(zip(rows, positions)):
        n = len(x)
        ids[i, :n] = torch.tensor(x)
        pos[i, :n] = torch.tensor(p)
        block = torch.ones((n, n), dtype=torch.bool).tril()
        block[lc:, k:lc] = False  # rejected's tokens skip chosen's own
        mask[i, :n, :n] = block
        ends.append((lc - 1, n - 1))
    idx = torch.tensor(ends, dtype=torch.long)
    return {"input_ids": ids, "position_ids": pos, "attention_mask": mask[:, None],
            "chosen_index": idx[:, 0], "rejected_index": idx[:, 1]}


def pair_scores(model, pairs, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of chosen and rejected, (B,) each, from one forward of shared-prefix rows
    (`shared_prefix_batch`): the common prefix (prompt and more) is computed once."""
    b = {k: v.to(device) for k, v in shared_prefix_batch(pairs, pad_id).items()}
    out = model.base_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                           position_ids=b["position_ids"])
    values = _head(model)(out.last_hidden_state).squeeze(-1).float()  # (B, L)
    rows = torch.arange(values.shape[0], device=values.device)
    return values[rows, b["chosen_index"]], values[rows, b["rejected_index"]]
