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


def backbone_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer backbone and the scalar head of a sequence classifier, also when it
    is wrapped in peft LoRA adapters: peft's `.base_model` is its own wrapper (whose
    forward runs the classifier), so unwrap it first; the adapters sit inside the
    backbone's layers and the head is peft's trainable copy, so both still apply."""
    inner = model.get_base_model() if hasattr(model, "peft_config") else model
    return inner.base_model, _head(inner)


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Head applied at every position: (B, T) values."""
    backbone, head = backbone_and_head(model)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask))
    hidden = out.last_hidden_state  # (B, T, H)
    return head(hidden).squeeze(-1).float()  # (B, T)


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward: the head at the last non-pad token, (B,)."""
    values = token_values(model, input_ids, attention_mask)  # (B, T)
    return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)


class Segment:
    """One sequence (or a chosen/rejected pair sharing a prefix) to place in a packed row:
    token ids, the positions they would have alone, and which of its own tokens each
    token attends to ((n, n) bool; None = causal)."""

    __slots__ = ("ids", "pos", "mask")

    def __init__(self, ids: list[int], pos: list[int] | None = None, mask: torch.Tensor | None = None):
        self.ids, self.pos, self.mask = list(ids), list(range(len(ids))) if pos is None else list(pos), mask


def pair_segment(chosen: list[int], rejected: list[int]) -> tuple[Segment, int, int]:
    """Chosen and rejected as one segment holding their common prefix once:
    `[chosen | rejected after the prefix]`. Rejected's tokens take the positions they
    would have alone (k, k+1, ... after a k-token prefix) and attend to the prefix and
    to each other, never to chosen's own tokens, so every token sees exactly its own
    sequence's context. Each side keeps at least its last token (where it is scored)
    out of the prefix. Returns the segment and where chosen and rejected end in it."""
    k, most = 0, min(len(chosen), len(rejected)) - 1
    while k < most and chosen[k] == rejected[k]:
        k += 1
    lc, n = len(chosen), len(chosen) + len(rejected) - k
    mask = torch.ones((n, n), dtype=torch.bool).tril()
    mask[lc:, k:lc] = False  # rejected's tokens skip chosen's own
    seg = Segment(list(chosen) + list(rejected[k:]), list(range(lc)) + list(range(k, len(rejected))), mask)
    return seg, lc - 1, n - 1


def pack(segments: list[Segment], pad_id: int, packed: bool = True) -> dict:
    """Segments laid out in rows for one forward.

    packed: first-fit decreasing into rows as long as the longest segment, so short
    sequences share a row; otherwise one segment per row. Attention is block-diagonal
    (a token sees only its own segment, as its mask says) and positions restart per
    segment, so each segment's outputs equal those of its own forward (to float
    rounding; tests/unit/test_models.py checks values and gradients). Rows are right-
    padded; a pad attends only to itself.

    Returns input_ids and position_ids (R, L), attention_mask (R, 1, L, L) bool, and
    `where`: (row, offset) of each segment, in the order given."""
    L = max(len(s.ids) for s in segments)  # wider rows fill a little better but cost more attention (measured)
    rows: list[list[int]] = []  # segment indices per row
    free: list[int] = []
    order = sorted(range(len(segments)), key=lambda i: -len(segments[i].ids)) if packed else range(len(segments))
    for i in order:
        n = len(segments[i].ids)
        r = next((j for j, f in enumerate(free) if f >= n), None) if packed else None
        if r is None:
            rows.append([])
            free.append(L)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= n
    R = len(rows)
    ids = torch.full((R, L), pad_id, dtype=torch.long)
    pos = torch.zeros((R, L), dtype=torch.long)
    mask = torch.eye(L, dtype=torch.bool).repeat(R, 1, 1)
    where: list[tuple[int, int]] = [(0, 0)] * len(segments)
    for r, members in enumerate(rows):
        o = 0
        for i in members:
            s = segments[i]
            n = len(s.ids)
            ids[r, o:o + n] = torch.tensor(s.ids)
            pos[r, o:o + n] = torch.tensor(s.pos)
            mask[r, o:o + n, o:o + n] = s.mask if s.mask is not None else torch.ones((n, n), dtype=torch.bool).tril()
            where[i] = (r, o)
            o += n
    return {"input_ids": ids, "position_ids": pos, "attention_mask": mask[:, None], "where": where}


def pair_scores(model, pairs, pad_id: int, device, share_prefix: bool = True,
                packed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of chosen and rejected, (B,) each, from one forward: each pair as one
    segment over its shared prefix (`pair_segment`) or as two sequences, the segments
    packed into few rows or one per row (`pack`)."""
    segments, ends = [], []  # ends: (segment, index) of chosen and of rejected
    for c, r in pairs:
        if share_prefix:
            seg, ic, ir = pair_segment(c, r)
            segments.append(seg)
            ends.append(((len(segments) - 1, ic), (len(segments) - 1, ir)))
        else:
            segments += [Segment(c), Segment(r)]
            ends.append(((len(segments) - 2, len(c) - 1), (len(segments) - 1, len(r) - 1)))
    b = pack(segments, pad_id, packed)
    backbone, head = backbone_and_head(model)
    out = backbone(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                   position_ids=b["position_ids"].to(device))
    values = head(out.last_hidden_state).squeeze(-1).float()  # (R, L)

    def gather(side: int) -> torch.Tensor:
        at = [(b["where"][seg][0], b["where"][seg][1] + i) for seg, i in (e[side] for e in ends)]
        rows, cols = torch.tensor(at, device=values.device).T
        return values[rows, cols]

    return gather(0), gather(1)
