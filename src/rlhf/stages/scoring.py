"""Measurements that several stages take the same way: the SFT loss of held-out
demonstrations (SFT's early stopping, eval's alignment tax) and reward-model scores
of token sequences (reward's held-out accuracy) or of prompt + response texts (eval).
"""

from __future__ import annotations

import torch

from rlhf.models.batching import pad_right, tokenize_pair
from rlhf.math import sft_loss
from rlhf.models import sequence_scores


def encode_demonstrations(tok, rows) -> list[tuple[list[int], int]]:
    """(prompt + completion + EOS token ids, prompt length) of each demonstration."""
    return [tokenize_pair(tok, r.prompt, r.completion) for r in rows]


def collate_demonstrations(batch, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and loss mask (1 on completion + EOS), all (B, T)."""
    ids, attn = pad_right([b[0] for b in batch], pad_id)  # (B, T)
    loss_mask = attn.clone()
    for i, (_, plen) in enumerate(batch):
        loss_mask[i, :plen] = 0  # (B, T) 1 on completion + EOS
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
def score_responses(rm, tok, prompts: list[str], texts: list[str], device, batch_size: int = 128) -> list[float]:
    """Reward-model score of prompt + response text (retokenised with the RM's tokenizer)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        seqs = [tokenize_pair(tok, p, t)[0] for p, t in zip(prompts[i:i + batch_size], texts[i:i + batch_size])]
        ids, attn = pad_right(seqs, tok.pad_token_id)
        out += sequence_scores(rm, ids.to(device), attn.to(device)).tolist()
    return out
