"""Preference comparisons as the reward model trains on them: encoded pairs grouped
by prompt (InstructGPT's K answers of one prompt, all C(K, 2) comparisons, as one batch
element), how many groups make a step, and the padded-rows scoring that the packed
layout (`rlhf.models.heads.group_scores`) falls back to.
"""

from __future__ import annotations

import torch

from rlhf.models import Group, sequence_scores
from rlhf.models.batching import pad_right
from rlhf.models.chat import ChatFormat


def encode_pairs(fmt: ChatFormat, rows) -> list[tuple[list[int], list[int]]]:
    """Chosen and rejected token ids of each pair (`rlhf.models.chat`)."""
    return [fmt.pair(r) for r in rows]


MAX_GROUP = 9
"""Most distinct answers in one group (InstructGPT ranked K = 4 to 9); a prompt with more
comparisons fills several groups."""


def group_pairs(rows, pairs: list[tuple[list[int], list[int]]]) -> list[Group]:
    """The encoded comparisons grouped by prompt (text and turns), each distinct answer
    once per group, in first-seen order; a pair whose answers would take a group past
    `MAX_GROUP` opens the prompt's next group."""
    open_groups: dict[tuple, tuple[Group, dict]] = {}
    out = []
    for row, (c, r) in zip(rows, pairs):
        key = (row.prompt, repr(row.messages))
        g, index = open_groups.get(key, (None, None))
        if g is None or len(g.seqs) + sum(tuple(x) not in index for x in {tuple(c), tuple(r)}) > MAX_GROUP:
            g, index = Group([], []), {}
            open_groups[key] = (g, index)
            out.append(g)
        ends = []
        for x in (c, r):
            if tuple(x) not in index:
                index[tuple(x)] = len(g.seqs)
                g.seqs.append(list(x))
            ends.append(index[tuple(x)])
        g.pairs.append((ends[0], ends[1]))
    return out


def n_pairs(groups: list[Group]) -> int:
    return sum(len(g.pairs) for g in groups)


def groups_per_step(batch_size: int, groups: list[Group], unit: int) -> int:
    """Groups in one optimizer step so that it holds about `batch_size` comparisons on
    average: a multiple of `unit` (processes x micro-batches, so every process takes an
    equal share without repeating a group), at least one `unit`."""
    return max(unit, round(batch_size * len(groups) / max(n_pairs(groups), 1) / unit) * unit)


def separate_scores(model, groups: list[Group], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every distinct answer of the groups as its own padded row of one forward; the
    chosen and the rejected score of every pair, (P,) each."""
    seqs = [q for g in groups for q in g.seqs]
    ids, attn = pad_right(seqs, pad_id)  # (S, T)
    r = sequence_scores(model, ids.to(device), attn.to(device))  # (S,)
    starts = [0]
    for g in groups:
        starts.append(starts[-1] + len(g.seqs))
    at = [(o + i, o + j) for g, o in zip(groups, starts) for i, j in g.pairs]
    return r[[a for a, _ in at]], r[[b for _, b in at]]
