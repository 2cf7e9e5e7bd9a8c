"""Unit tests for the rlhf.math functions that replaced inline stage code:
whitening with a reduce callback, reward-score statistics and normalisation,
sequence KL, and temperature log-probs.

Each function is checked against numbers worked by hand, for exact equality
(torch.equal) with the inline code it replaces (copied below as ``_inline_*``),
and, where it takes a reduce callback, for agreement between two simulated
processes and one process holding the whole batch.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.math import (
    gather_logprobs,
    masked_mean,
    masked_var,
    masked_whiten,
    normalize_scores,
    score_stats,
    sequence_kl,
    token_logprobs,
)

from test_math import DTYPES, close  # noqa: E402  (the same helpers as the rest of rlhf.math's tests)


def one_process(d):
    """A reduce over a single process: each value as a float (``sum_dict`` at world 1)."""
    return {k: float(v) for k, v in d.items()}


def two_processes(fn, halves, combine):
    """Run ``fn(half, reduce)`` as two processes whose ``reduce`` combines both halves' dicts.

    Pass 1 records what each process sends; pass 2 answers every process with
    ``combine(sent_0, sent_1)`` (e.g. the sum), as an all-reduce would.
    """
    sent = [None, None]
    for i, half in enumerate(halves):
        def record(d, i=i):
            sent[i] = one_process(d)
            return sent[i]
        fn(half, record)
    total = {k: combine(sent[0][k], sent[1][k]) for k in sent[0]}
    return [fn(half, lambda d: total) for half in halves]


def add(a, b):
    return a + b


def average(a, b):
    return (a + b) / 2


# --------------------------------------------------------------------------- inline code replaced


def _inline_whiten_global(adv, mask, sum_dict):
    """stages/ppo.py whiten_global, world > 1 branch."""
    t = sum_dict({"sum": (adv * mask).sum(), "sq": (adv * adv * mask).sum(), "n": mask.sum()})
    mean = t["sum"] / max(t["n"], 1.0)
    var = (t["sq"] - t["n"] * mean * mean) / max(t["n"] - 1, 1.0)
    return (adv - mean) / (max(var, 0.0) + 1e-8) ** 0.5 * mask


def _old_masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    """masked_whiten before the reduce keyword was added."""
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.to(torch.bool).expand_as(x), whitened, torch.zeros_like(whitened))


def _inline_score_stats(s, mean_dict=None):
    """stages/ppo.py reward-normalisation statistics."""
    if mean_dict is None:
        return float(s.mean()), float(s.std().clamp(min=1e-6))
    m = mean_dict({"m": s.mean(), "sq": (s * s).mean()})
    return m["m"], max(m["sq"] - m["m"] ** 2, 1e-12) ** 0.5


def _inline_normalize(raw, reward_mean, reward_std, has_eos, reward_clip, missing_eos_penalty):
    """stages/ppo.py per-update score."""
    score = (raw - reward_mean) / reward_std
    if reward_clip:
        score = score.clamp(-reward_clip, reward_clip)
    score = score - missing_eos_penalty * (~has_eos).float()
    return score


def _inline_sequence_kl(lp, ref_lp, response_mask):
    """stages/evaluate.py per-prompt KL."""
    m = response_mask.float()
    kl = (lp - ref_lp) * m
    return kl.sum(1)


def _inline_response_logprobs(logits, responses, temperature):
    """stages/rollout.py response_logprobs, on logits already sliced to (B, R, V)."""
    if temperature != 1.0:
        logits = logits / temperature
    return torch.gather(torch.log_softmax(logits.float(), -1), 2, responses[..., None]).squeeze(-1)


def _inline_generation_logprobs(logits, responses, temperature, sample=True):
    """stages/rollout.py generate(logprobs=True): cast first, then divide."""
    logits = logits.float()
    if sample and temperature != 1.0:
        logits = logits / temperature
    return torch.gather(torch.log_softmax(logits, -1), 2, responses[..., None]).squeeze(-1)


def _old_token_logprobs(logits, labels):
    """token_logprobs before it was written with gather_logprobs."""
    logprobs_all = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    next_tokens = labels[:, 1:].unsqueeze(-1)
    return torch.gather(logprobs_all, dim=-1, index=next_tokens).squeeze(-1)


# --------------------------------------------------------------------------- masked_whiten(reduce=...)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_whiten_reduce_by_hand(dtype):
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=dtype)
    mask = torch.tensor([0.0, 1.0, 1.0, 0.0])
    # sum 5, sq 4 + 9 = 13, n 2 -> mean 2.5, var (13 - 2 * 6.25) / 1 = 0.5
    s = math.sqrt(0.5)
    out = masked_whiten(x, mask, eps=0.0, reduce=one_process)
    assert out.dtype == dtype
    close(out, [0.0, -s, s, 0.0])
    out_no_shift = masked_whiten(x, mask, shift_mean=False, eps=0.0, reduce=one_process)
    close(out_no_shift, [0.0, 2.5 - s, 2.5 + s, 0.0])


def test_masked_whiten_reduce_two_processes_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # (B, T)
    mask = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # process 0 sends (sum 2, sq 4, n 1), process 1 (3, 9, 1): totals (5, 13, 2) as above
    s = math.sqrt(0.5)
    halves = [(x[:1], mask[:1]), (x[1:], mask[1:])]
    out0, out1 = two_processes(lambda h, r: masked_whiten(*h, eps=0.0, reduce=r), halves, add)
    close(out0, [[0.0, -s]])
    close(out1, [[s, 0.0]])


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_whiten_reduce_equals_inline_whiten_global(dtype):
    g = torch.Generator().manual_seed(10)
    adv = torch.randn(6, 9, generator=g, dtype=dtype) * 3 + 1  # (B, T)
    mask = (torch.rand(6, 9, generator=g) > 0.3).float()  # (B, T)
    ours = masked_whiten(adv, mask, reduce=one_process)
    assert torch.equal(ours, _inline_whiten_global(adv, mask, one_process))
    halves = [(adv[:3], mask[:3]), (adv[3:], mask[3:])]
    ours_split = two_processes(lambda h, r: masked_whiten(*h, reduce=r), halves, add)
    inline = two_processes(lambda h, r: _inline_whiten_global(*h, r), halves, add)
    for a, b in zip(ours_split, inline):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_without_reduce_is_unchanged(dtype, shift_mean):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 7, generator=g, dtype=dtype) * 2 - 1  # (B, T)
    mask = (torch.rand(4, 7, generator=g) > 0.4).float()
    old = _old_masked_whiten(x, mask, shift_mean)
    assert torch.equal(masked_whiten(x, mask, shift_mean), old)
    assert torch.equal(masked_whiten(x, mask, shift_mean, reduce=None), old)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_reduce_two_processes_match_one_process(dtype, shift_mean):
    g = torch.Generator().manual_seed(12)
    adv = torch.randn(8, 5, generator=g, dtype=dtype) * 2 + 3  # (B, T)
    mask = (torch.rand(8, 5, generator=g) > 0.3).float()
    whole = masked_whiten(adv, mask, shift_mean, reduce=one_process)
    halves = [(adv[:4], mask[:4]), (adv[4:], mask[4:])]
    split = torch.cat(two_processes(lambda h, r: masked_whiten(*h, shift_mean, reduce=r), halves, add))
    torch.testing.assert_close(split, whole)
    # and close to the two-pass statistics of the one-process path
    torch.testing.assert_close(split, masked_whiten(adv, mask, shift_mean), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- score_stats / normalize_scores


@pytest.mark.parametrize("dtype", DTYPES)
def test_score_stats_by_hand(dtype):
    s = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=dtype)
    # one process: mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    mean, std = score_stats(s)
    assert isinstance(mean, float) and isinstance(std, float)
    assert mean == pytest.approx(2.5) and std == pytest.approx(math.sqrt(5 / 3))
    # reduce path: E[s^2] = 30/4 = 7.5, population var 7.5 - 6.25 = 1.25
    mean, std = score_stats(s, mean_reduce=one_process)
    assert mean == pytest.approx(2.5) and std == pytest.approx(math.sqrt(1.25))
    # constant scores: both paths floor std at 1e-6
    flat = torch.full((3,), 2.0, dtype=dtype)
    assert score_stats(flat)[1] == pytest.approx(1e-6)
    assert score_stats(flat, mean_reduce=one_process)[1] == pytest.approx(1e-6)


def test_score_stats_two_processes_by_hand():
    halves = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]
    # means (1.5, 3.5) -> 2.5; mean squares (2.5, 12.5) -> 7.5; var 1.25
    for mean, std in two_processes(lambda h, r: score_stats(h, mean_reduce=r), halves, average):
        assert mean == pytest.approx(2.5) and std == pytest.approx(math.sqrt(1.25))


@pytest.mark.parametrize("dtype", DTYPES)
def test_score_stats_equals_inline(dtype):
    g = torch.Generator().manual_seed(20)
    s = torch.randn(16, generator=g, dtype=dtype) * 1.7 + 0.3  # (N,)
    assert score_stats(s) == _inline_score_stats(s)
    assert score_stats(s, mean_reduce=one_process) == _inline_score_stats(s, one_process)
    halves = [s[:8], s[8:]]
    ours = two_processes(lambda h, r: score_stats(h, mean_reduce=r), halves, average)
    inline = two_processes(lambda h, r: _inline_score_stats(h, r), halves, average)
    assert ours == inline


@pytest.mark.parametrize("dtype", DTYPES)
def test_score_stats_two_processes_match_one_process(dtype):
    g = torch.Generator().manual_seed(21)
    s = torch.randn(20, generator=g, dtype=dtype) * 2 - 1  # (N,)
    n = s.numel()
    whole = score_stats(s, mean_reduce=one_process)
    split = two_processes(lambda h, r: score_stats(h, mean_reduce=r), [s[:10], s[10:]], average)
    for mean, std in split:
        assert mean == pytest.approx(whole[0], rel=1e-5, abs=1e-6)
        assert std == pytest.approx(whole[1], rel=1e-5)
    # the one-process path is the unbiased std: larger by sqrt(n / (n - 1))
    mean1, std1 = score_stats(s)
    assert mean1 == pytest.approx(whole[0], rel=1e-5, abs=1e-6)
    assert std1 == pytest.approx(whole[1] * math.sqrt(n / (n - 1)), rel=1e-5)


def test_score_stats_mean_reduce_weights_processes_equally():
    # documented behaviour: per-process means are averaged, so unequal shards are not weighted by size
    (mean, _), _ = two_processes(lambda h, r: score_stats(h, mean_reduce=r),
                                 [torch.tensor([0.0]), torch.tensor([3.0, 3.0, 3.0])], average)
    assert mean == pytest.approx(1.5)  # the mean over all four scores would be 2.25


@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_scores_by_hand(dtype):
    raw = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=dtype)  # (B,)
    has_eos = torch.tensor([True, False, True, False])
    # (raw - 2.5) / 0.5 = [-3, -1, 1, 3]
    close(normalize_scores(raw, 2.5, 0.5, has_eos), [-3.0, -1.0, 1.0, 3.0])
    close(normalize_scores(raw, 2.5, 0.5, has_eos, clip=0), [-3.0, -1.0, 1.0, 3.0])  # 0 = no clip
    close(normalize_scores(raw, 2.5, 0.5, has_eos, clip=2.0), [-2.0, -1.0, 1.0, 2.0])
    # penalty 1 on the two responses without EOS, applied after clipping
    out = normalize_scores(raw, 2.5, 0.5, has_eos, clip=2.0, missing_eos_penalty=1.0)
    close(out, [-2.0, -2.0, 1.0, 1.0])
    assert normalize_scores(raw, 2.5, 0.5, has_eos).dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip", [None, 0.0, 1.5])
@pytest.mark.parametrize("penalty", [0.0, 1.0, 0.37])
def test_normalize_scores_equals_inline(dtype, clip, penalty):
    g = torch.Generator().manual_seed(22)
    raw = torch.randn(12, generator=g, dtype=dtype) * 2 + 1  # (B,)
    has_eos = torch.rand(12, generator=g) > 0.3  # (B,) bool
    mean, std = score_stats(raw)
    ours = normalize_scores(raw, mean, std, has_eos, clip=clip, missing_eos_penalty=penalty)
    assert torch.equal(ours, _inline_normalize(raw, mean, std, has_eos, clip, penalty))


# --------------------------------------------------------------------------- sequence_kl


@pytest.mark.parametrize("dtype", DTYPES)
def test_sequence_kl_by_hand(dtype):
    lp = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.5, -0.5, -0.5]], dtype=dtype)  # (B, R)
    ref = torch.tensor([[-1.5, -1.0, -3.0, -2.0], [-1.0, -2.0, -0.5, -9.0]], dtype=dtype)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 0]])  # long, like Rollout.response_mask
    # row 0: k1 = (0.5, -1, 0, -2), counted -1 + 0 = -1; row 1: 0.5 + 1.5 + 0 = 2
    out = sequence_kl(lp, ref, mask)
    assert out.shape == (2,) and out.dtype == dtype
    close(out, [-1.0, 2.0])
    close(sequence_kl(lp, ref, mask.bool()), [-1.0, 2.0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_dtype", [torch.long, torch.bool, torch.float32])
def test_sequence_kl_equals_inline(dtype, mask_dtype):
    g = torch.Generator().manual_seed(30)
    lp = -torch.rand(5, 8, generator=g, dtype=dtype) * 4  # (B, R)
    ref = -torch.rand(5, 8, generator=g, dtype=dtype) * 4
    mask = (torch.rand(5, 8, generator=g) > 0.3).to(mask_dtype)
    assert torch.equal(sequence_kl(lp, ref, mask), _inline_sequence_kl(lp, ref, mask))


# --------------------------------------------------------------------------- gather_logprobs


def test_gather_logprobs_by_hand():
    # p = (1/4, 3/4) at position 0, (4/5, 1/5) at position 1
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(4.0), 0.0]]])  # (1, 2, 2)
    tokens = torch.tensor([[1, 1]])  # (1, 2)
    close(gather_logprobs(logits, tokens), [[math.log(0.75), math.log(0.2)]])
    # temperature 2: softmax(l / 2) = (1, sqrt 3) / (1 + sqrt 3) and (2, 1) / 3
    r3 = math.sqrt(3.0)
    close(gather_logprobs(logits, tokens, temperature=2.0), [[math.log(r3 / (1 + r3)), math.log(1 / 3)]])
    out = gather_logprobs(logits.to(torch.bfloat16), tokens, temperature=0.5)
    assert out.shape == (1, 2) and out.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_gather_logprobs_equals_inline_response_logprobs(dtype, temperature):
    g = torch.Generator().manual_seed(40)
    logits = (torch.randn(3, 6, 11, generator=g) * 3).to(dtype)  # (B, R, V) aligned
    tokens = torch.randint(0, 11, (3, 6), generator=g)  # (B, R)
    assert torch.equal(gather_logprobs(logits, tokens, temperature),
                       _inline_response_logprobs(logits, tokens, temperature))


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_gather_logprobs_float32_division_order_does_not_matter(temperature):
    g = torch.Generator().manual_seed(41)
    logits = torch.randn(3, 6, 11, generator=g) * 3  # (B, R, V) float32
    tokens = torch.randint(0, 11, (3, 6), generator=g)
    # divide-then-cast (ours, response_logprobs) == cast-then-divide (generation)
    assert torch.equal(gather_logprobs(logits, tokens, temperature),
                       _inline_generation_logprobs(logits, tokens, temperature))


def test_gather_logprobs_rejects_non_positive_temperature():
    logits, tokens = torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long)
    for t in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            gather_logprobs(logits, tokens, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_unchanged(dtype):
    g = torch.Generator().manual_seed(42)
    logits = torch.randn(2, 7, 9, generator=g).to(dtype)  # (B, T, V)
    labels = torch.randint(0, 9, (2, 7), generator=g)  # (B, T)
    assert torch.equal(token_logprobs(logits, labels), _old_token_logprobs(logits, labels))
