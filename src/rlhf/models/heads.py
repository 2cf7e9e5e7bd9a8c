"""Scalar heads on a transformer backbone: sequence rewards and per-token values.

Reward and value models are `AutoModelForSequenceClassification(num_labels=1)`, so a
user can load them with plain transformers. We call the backbone and the head
ourselves to get (a) the score at the last non-pad token under any padding side and
(b) per-token values for the PPO critic, from the same weights.
"""

from __future__ import annotations

from typing import NamedTuple

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


class Group(NamedTuple):
    """Comparisons that share a prompt: the distinct token sequences once, and the
    (chosen, rejected) index pairs among them. A plain preference pair is a group of two."""

    seqs: list[list[int]]
    pairs: list[tuple[int, int]]


def tree_segment(seqs: list[list[int]]) -> tuple[Segment, list[int]]:
    """Several sequences as one segment over their shared prefixes: a token trie laid
    out in insertion order, each token once per distinct prefix. A token takes the
    position it has in its sequences and attends to exactly its ancestors and itself,
    so every sequence's tokens see their own context and nothing else. For a chosen /
    rejected pair this is `[chosen | rejected after the common prefix]`. Returns the
    segment and the index of each sequence's last token in it (where it is scored;
    a sequence that is a prefix of another ends inside it, which is its own context)."""
    ids: list[int] = []
    pos: list[int] = []
    parent: list[int] = []
    children: list[dict[int, int]] = [{}]  # children[node + 1]: token -> node; [0] is the root's
    ends = []
    for seq in seqs:
        node = -1
        for depth, t in enumerate(seq):
            kids = children[node + 1]
            if t not in kids:
                kids[t] = len(ids)
                ids.append(t)
                pos.append(depth)
                parent.append(node)
                children.append({})
            node = kids[t]
        ends.append(node)
    mask = torch.zeros((len(ids), len(ids)), dtype=torch.bool)
    for i, p in enumerate(parent):  # a parent precedes its children: its row is final
        if p >= 0:
            mask[i] = mask[p]
        mask[i, i] = True
    return Segment(ids, pos, mask), ends


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
    """Rewards of chosen and rejected, (B,) each, from one forward (`group_scores`
    with each pair as a group of two)."""
    return group_scores(model, [Group([c, r], [(0, 1)]) for c, r in pairs], pad_id, device, share_prefix, packed)


def group_scores(model, groups: list[Group], pad_id: int, device, share_prefix: bool = True,
                 packed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen and the rejected side of every pair of every group, in
    order, (P,) each, from one forward: each group as one segment over its shared
    prefixes (`tree_segment`; every distinct sequence scored once, however many pairs
    it is in) or each sequence as its own segment, the segments packed into few rows
    or one per row (`pack`)."""
    segments, at = [], []  # at[g][i]: (segment, index) where sequence i of group g ends
    for g in groups:
        if share_prefix:
            seg, ends = tree_segment(g.seqs)
            segments.append(seg)
            at.append([(len(segments) - 1, e) for e in ends])
        else:
            segments += [Segment(q) for q in g.seqs]
            at.append([(len(segments) - len(g.seqs) + i, len(q) - 1) for i, q in enumerate(g.seqs)])
    b = pack(segments, pad_id, packed)
    backbone, head = backbone_and_head(model)
    out = backbone(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                   position_ids=b["position_ids"].to(device))
    values = head(out.last_hidden_state).squeeze(-1).float()  # (R, L)

    def gather(side: int) -> torch.Tensor:
        cells = [(b["where"][seg][0], b["where"][seg][1] + i)
                 for g, ends in zip(groups, at) for pair in g.pairs for seg, i in [ends[pair[side]]]]
        rows, cols = torch.tensor(cells, device=values.device).T
        return values[rows, cols]

    return gather(0), gather(1)
