"""Measurements that several stages take the same way: the SFT loss of held-out
demonstrations (SFT's early stopping, eval's alignment tax) and reward-model scores
of token sequences (reward's held-out accuracy) or of prompt + response texts (eval).
"""

from __future__ import annotations

import torch

from rlhf.math import sft_loss
from rlhf.models import sequence_scores
from rlhf.models.batching import pad_right
from rlhf.models.chat import ChatFormat, targets_mask


def encode_demonstrations(fmt: ChatFormat, rows) -> list[tuple[list[int], int | list[int]]]:
    """(token ids, answer targets) of each demonstration (`rlhf.models.chat`)."""
    return [fmt.demonstration(r) for r in rows]


def collate_demonstrations(batch, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and loss mask (1 on answer tokens), all (B, T)."""
    ids, attn = pad_right([b[0] for b in batch], pad_id)  # (B, T)
    loss_mask = torch.zeros_like(attn)
    for i, (seq, targets) in enumerate(batch):
        loss_mask[i, :len(seq)] = torch.tensor(targets_mask(seq, targets))  # (B, T)
    return ids.to(device), attn.to(device), loss_mask.to(device)


@torch.no_grad()
def heldout_loss(model, data, pad_id: int, device, batch_size: int = 128) -> float:
    """Mean response-token NLL over a dataset (the SFT loss, aggregated by tokens)."""
    model.eval()
    nll, n = 0.0, 0.0
    for i in range(0, len(data), batch_size):
        ids, attn, lm = collate_demonstrations(data[i:i + batch_size], pad_id, device)
        _, stats = sft_loss(model(input_ids=ids, attention_mask=attn).logits, ids, lm)
        nll += stats["nll_sum"].item()
        n += stats["tokens"].item()
    model.train()
    return nll / max(n, 1.0)


@torch.no_grad()
def score_sequences(model, seqs: list[list[int]], pad_id: int, device, batch_size: int = 256) -> torch.Tensor:
    """Reward of each token sequence, (N,)."""
    out = []
    for i in range(0, len(seqs), batch_size):
        ids, attn = pad_right(seqs[i:i + batch_size], pad_id)
        out.append(sequence_scores(model, ids.to(device), attn.to(device)).cpu())
    return torch.cat(out)


@torch.no_grad()
def score_responses(rm, fmt: ChatFormat, rows, texts: list[str], device, batch_size: int = 128) -> list[float]:
    """Reward-model score of each row's prompt + response text (retokenised in the RM's format)."""
    out = []
    for i in range(0, len(rows), batch_size):
        seqs = [fmt.sequence(r, t)[0] for r, t in zip(rows[i:i + batch_size], texts[i:i + batch_size])]
        ids, attn = pad_right(seqs, fmt.tok.pad_token_id)
        out += sequence_scores(rm, ids.to(device), attn.to(device)).tolist()
    return out
