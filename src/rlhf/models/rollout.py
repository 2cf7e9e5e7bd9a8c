"""Generation and scoring shared by PPO, evaluation and simulated labelling.

Layout of a rollout: `[query (left-padded, P) | response (R, right-padded after EOS)]`.
The response mask covers tokens up to and including the first stop token (the
tokenizer's EOS, or any of `generation_config.eos_token_id`: an instruct model's
end-of-turn). A response that never emits one is truncated at `max_new_tokens` and
flagged (`has_eos` False).

Sampling uses only what is asked here (temperature, top_k=0, top_p=1): a checkpoint's
own generation defaults (top_p, top_k, repetition_penalty, ...) would make the
samples come from another distribution than the policy's log-probs.
Logits at position t predict token t+1, so response token j (at P+j) is scored by
logits at P+j-1: log-probs and values for the response are the slice [P-1 : P+R-1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from rlhf.math import entropy_from_logits, gather_logprobs
from rlhf.models import position_ids_from_mask, sequence_scores, token_values
from rlhf.models.batching import pad_left
from rlhf.models.chat import stop_ids


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (B, P+R) query + response
    attention_mask: torch.Tensor  # (B, P+R)
    response_mask: torch.Tensor  # (B, R) 1 up to and including EOS
    has_eos: torch.Tensor  # (B,) bool
    prompt_len: int  # P
    logprobs: torch.Tensor | None = None  # (B, R) log pi(token) of the sampling policy, when asked for

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len:]  # (B, R)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: torch.Tensor | slice) -> "Rollout":
        return Rollout(self.input_ids[idx], self.attention_mask[idx], self.response_mask[idx],
                       self.has_eos[idx], self.prompt_len, None if self.logprobs is None else self.logprobs[idx])

    def parts(self, size: int | None) -> list["Rollout"]:
        """Consecutive slices of at most `size` episodes (one slice for None)."""
        size = size or len(self)
        return [self.select(slice(i, i + size)) for i in range(0, len(self), size)]

    @staticmethod
    def concat(parts: list["Rollout"], pad_id: int) -> "Rollout":
        """Rollouts generated in separate batches as one: queries left-padded to the
        longest, responses right-padded to the longest (masks 0 on the padding)."""
        if len(parts) == 1:
            return parts[0]
        P, R = max(p.prompt_len for p in parts), max(p.responses.shape[1] for p in parts)

        def widen(x: torch.Tensor, left: int, right: int, value) -> torch.Tensor:
            return torch.nn.functional.pad(x, (left, right), value=value)

        ids, attn, resp_mask, lps = [], [], [], []
        for p in parts:
            left, right = P - p.prompt_len, R - p.responses.shape[1]
            ids.append(widen(p.input_ids, left, right, pad_id))
            attn.append(widen(p.attention_mask, left, right, 0))
            resp_mask.append(widen(p.response_mask, 0, right, 0))
            if p.logprobs is not None:
                lps.append(widen(p.logprobs, 0, right, 0.0))
        return Rollout(torch.cat(ids), torch.cat(attn), torch.cat(resp_mask), torch.cat([p.has_eos for p in parts]),
                       P, torch.cat(lps) if len(lps) == len(parts) else None)


@torch.no_grad()
def generate(model, tok, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float,
             device, synced_gpus: bool = False, logprobs: bool = False) -> Rollout:
    """Sample (temperature > 0) or greedy-decode (temperature == 0) with the KV cache;
    generation stops early once every sequence has emitted EOS.

    `logprobs`: also keep log pi(token) from the logits generation computed anyway (at
    the sampling temperature), which PPO takes as its "old" log-probs instead of a
    second policy forward. Incremental (KV-cache) logits equal a full forward's to
    float rounding (~1e-6 in fp32; tests/unit/test_rollout.py checks it).

    `synced_gpus`: ZeRO-3 with partitioned weights; every rank keeps stepping until all
    ranks are done, since each forward gathers layers collectively."""
    q_ids, q_mask = pad_left(prompt_ids, tok.pad_token_id)
    q_ids, q_mask = q_ids.to(device), q_mask.to(device)
    was_training = model.training
    model.eval()
    sample = temperature > 0
    P = q_ids.shape[1]
    lp = None
    stops = stop_ids(tok, model)
    # only our settings: none of the checkpoint's own defaults (see the module doc)
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample,
                               temperature=temperature if sample else None, top_k=0 if sample else None,
                               top_p=1.0 if sample else None, pad_token_id=tok.pad_token_id,
                               eos_token_id=stops if len(stops) > 1 else stops[0], use_cache=True,
                               output_logits=logprobs, return_dict_in_generate=logprobs)
    owner = model.get_base_model() if hasattr(model, "peft_config") else model  # whose defaults generate() reads
    saved, owner.generation_config = owner.generation_config, gen_cfg
    # inference mode: ~10% less per-op overhead than no_grad in token-by-token decoding (not
    # with synced_gpus, whose ZeRO-3 hooks gather parameters during the forward)
    try:
        with torch.inference_mode(not synced_gpus):
            out = model.generate(input_ids=q_ids, attention_mask=q_mask, generation_config=gen_cfg,
                                 **({"synced_gpus": True} if synced_gpus else {}))
    finally:
        owner.generation_config = saved
    with torch.inference_mode(not synced_gpus):
        if logprobs:
            logits = torch.stack(out.logits, 1).float()  # (B, R, V) raw, before temperature
            out = out.sequences
            lp = gather_logprobs(logits, out[:, P:], temperature if sample else 1.0)  # (B, R)
    model.train(was_training)
    # clones are normal tensors again (inference tensors cannot enter a training forward)
    if lp is not None:
        lp = lp.clone()
    resp = out[:, P:].clone()  # (B, R)
    is_eos = torch.isin(resp, torch.tensor(stops, device=resp.device))
    has_eos = is_eos.any(1)
    first_eos = torch.where(has_eos, is_eos.float().argmax(1), torch.full_like(has_eos, resp.shape[1], dtype=torch.long))
    pos = torch.arange(resp.shape[1], device=device)[None]
    resp_mask = (pos <= first_eos[:, None]).long()  # (B, R)
    resp = torch.where(resp_mask.bool(), resp, torch.full_like(resp, tok.pad_token_id))
    ids = torch.cat([q_ids, resp], 1)
    attn = torch.cat([q_mask, resp_mask], 1)
    return Rollout(ids, attn, resp_mask, has_eos, P, lp)


def response_logprobs(model, ro: Rollout, temperature: float = 1.0, with_entropy: bool = False):
    """log pi(response token | prefix), (B, R); optionally entropy per response position."""
    logits = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                   position_ids=position_ids_from_mask(ro.attention_mask)).logits  # (B, L, V)
    logits = logits[:, ro.prompt_len - 1:-1]  # (B, R, V) predicts response tokens
    lp = gather_logprobs(logits, ro.responses, temperature)  # (B, R)
    if with_entropy:
        return lp, entropy_from_logits(logits / temperature if temperature != 1.0 else logits)
    return lp


def response_values(value_model, ro: Rollout) -> torch.Tensor:
    """V(state before each response token), (B, R)."""
    v = token_values(value_model, ro.input_ids, ro.attention_mask)  # (B, L)
    return v[:, ro.prompt_len - 1:-1]


def rewards(reward_model, ro: Rollout) -> torch.Tensor:
    """Reward-model score at the last response token, (B,)."""
    return sequence_scores(reward_model, ro.input_ids, ro.attention_mask)


def decode_responses(tok, ro: Rollout) -> list[str]:
    """Response texts, without the stop token and special tokens."""
    out = []
    for row, m in zip(ro.responses.tolist(), ro.response_mask.tolist()):
        toks = [t for t, keep in zip(row, m) if keep and t != tok.eos_token_id]
        out.append(tok.decode(toks, skip_special_tokens=True))
    return out


__all__ = ["Rollout", "generate", "response_logprobs", "response_values", "rewards", "decode_responses"]
