"""Measurements that several stages take the same way: the SFT loss of a batch of
demonstrations (SFT's step, PPO-ptx) and of held-out ones (SFT's early stopping,
eval's alignment tax), and reward-model scores of token sequences (reward's held-out
accuracy) or of prompt + response texts (eval, the held-out reward model as judge).
"""

from __future__ import annotations

import torch

from rlhf.math import sft_loss
from rlhf.models import Segment, pack, sequence_scores
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


def collate_packed(batch, pad_id: int, device) -> tuple[dict, torch.Tensor, int]:
    """The batch packed into fewer rows (`models.heads.pack`): model inputs (ids, block
    attention mask, restarted positions), the loss mask, and the real token count. The
    first token of each sequence is never a label (as in the padded layout), so no loss
    crosses from one packed sequence into the next."""
    b = pack([Segment(ids) for ids, _ in batch], pad_id)
    loss_mask = torch.zeros_like(b["input_ids"])
    for (ids, targets), (r, o) in zip(batch, b["where"]):
        loss_mask[r, o:o + len(ids)] = torch.tensor(targets_mask(ids, targets))
    inputs = {k: b[k].to(device) for k in ("input_ids", "attention_mask", "position_ids")}
    return inputs, loss_mask.to(device), sum(len(ids) for ids, _ in batch)


def loss_tokens(batch) -> int:
    """Tokens the SFT loss of `batch` averages over (the answers'; never a first token)."""
    return sum(sum(targets_mask(ids, targets)) for ids, targets in batch)


def batch_loss(model, batch, pad_id: int, device, packed: bool) -> tuple[torch.Tensor, int]:
    """SFT loss of a batch (packed or padded) and its real token count."""
    if packed:
        inputs, lm, n = collate_packed(batch, pad_id, device)
        return sft_loss(model(**inputs).logits, inputs["input_ids"], lm)[0], n
    ids, attn, lm = collate_demonstrations(batch, pad_id, device)
    return sft_loss(model(input_ids=ids, attention_mask=attn).logits, ids, lm)[0], int(attn.sum())


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
