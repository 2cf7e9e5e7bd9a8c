"""Pieces of the training loops: LR schedules, batch order, the step clock, rollout
log-probs from generation, the optimizer step."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf.config import ConfigError, DistributedConfig, load_config
from rlhf.models.batching import pad_right
from rlhf.train.distributed import Dist
from rlhf.train.progress import StepClock
from rlhf.train.schedule import batch_order, lr_lambda
from rlhf.train.trainable import Trainable
from rlhf.models.rollout import generate, response_logprobs


def test_lr_schedules():
    lin = lr_lambda(0, 60, "linear")
    assert [lin(s) for s in (0, 30, 59, 60)] == pytest.approx([1.0, 0.5, 1 / 60, 0.0])  # HF "linear"
    cos = lr_lambda(10, 110, "cosine")
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)  # warm-up
    assert cos(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert cos(110) == pytest.approx(0.1)  # floor
    const = lr_lambda(2, 100, "constant")
    assert [const(s) for s in (0, 1, 2, 99)] == [0.5, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_lambda(0, 10, "step")


def padded_tokens(order, lengths, bs):
    return sum(len(order[i:i + bs]) * max(lengths[j] for j in order[i:i + bs]) for i in range(0, len(order), bs))


def test_batch_order_grouped_is_a_permutation_with_little_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(11, 124, (1000,), generator=g).tolist()  # not a multiple of the batch: a short last batch
    plain = batch_order(lengths, 16, seed=3, epoch=0, group_by_length=False)
    grouped = batch_order(lengths, 16, seed=3, epoch=0, group_by_length=True)
    assert sorted(grouped) == list(range(1000)) == sorted(plain)
    assert grouped == batch_order(lengths, 16, seed=3, epoch=0, group_by_length=True)  # fixed by (seed, epoch)
    assert grouped != batch_order(lengths, 16, seed=3, epoch=1, group_by_length=True)
    real = sum(lengths)
    assert real / padded_tokens(grouped, lengths, 16) > 0.97  # almost no padding...
    assert real / padded_tokens(plain, lengths, 16) < 0.75  # ...where random batches waste a quarter or more
    # batches come in random length order (not longest first)
    maxima = [max(lengths[j] for j in grouped[i:i + 16]) for i in range(0, 992, 16)]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


def test_step_clock_skips_warm_up_steps(monkeypatch):
    now = iter([10.0, 11.0, 13.0, 14.0, 16.0])
    monkeypatch.setattr("rlhf.train.progress.time.perf_counter", lambda: next(now))
    clock = StepClock(untimed=2)
    clock.tick(100, gen=9.0)
    clock.tick(100, gen=9.0)
    assert clock.rate() is None and clock.timed_steps == 0  # only warm-up so far
    for _ in range(3):
        clock.tick(50, gen=0.5)
    assert clock.timed_steps == 3 and clock.seconds == 5.0  # from the end of step 2 (11.0) to 16.0
    assert clock.rate() == pytest.approx(150 / 5.0)
    assert clock.summary("tokens") == {"untimed_steps": 2, "timed_steps": 3, "timed_s": 5.0, "tokens_per_s": 30.0,
                                       "gen_s": 1.5}


class _Tok:
    pad_token_id, eos_token_id = 0, 1


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_generation_logprobs_equal_a_full_forward(policy, temperature):
    """PPO's old log-probs from generation's own logits (left-padded prompts, KV cache)
    match the full forward it replaces; the tensors can enter a training forward."""
    torch.manual_seed(1)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    ro = generate(policy, _Tok, prompts, 6, temperature, "cpu", logprobs=True)
    assert ro.logprobs.shape == ro.response_mask.shape and not ro.logprobs.is_inference()
    full = response_logprobs(policy, ro, temperature)  # with grad, as in a training step
    m = ro.response_mask.bool()
    torch.testing.assert_close(ro.logprobs[m], full.detach()[m], atol=1e-5, rtol=1e-5)
    full[m].sum().backward()  # the rollout's tensors are usable in autograd
    assert policy.model.embed_tokens.weight.grad is not None
    policy.zero_grad()
    assert ro.select(torch.tensor([2, 0])).logprobs.shape[0] == 2
    assert generate(policy, _Tok, prompts, 6, temperature, "cpu").logprobs is None


def _trainable(policy, dcfg=None, **kw):
    model = LlamaForCausalLM(policy.config)
    model.load_state_dict(policy.state_dict())
    return Trainable(model, Dist(0, 1, 0, 0, torch.device("cpu"), False), dcfg or DistributedConfig(), lr=1e-2,
                     batch_size=2, **kw)


def _loss(t):
    ids, _ = pad_right([[5, 6, 7, 8], [9, 10, 11, 12]], 0)
    return t(input_ids=ids, labels=ids).loss


def test_trainable_fused_adamw_and_optional_clipping(policy):
    clipped, free = _trainable(policy, grad_clip=1e-3), _trainable(policy, grad_clip=None)
    assert clipped.opt.defaults["fused"] is True
    gnorm = clipped.step(_loss(clipped))
    assert gnorm > 1e-3  # the norm before clipping is reported
    assert math.isnan(free.step(_loss(free)))  # no clipping: no norm computed
    # fused AdamW makes the same update as the for-loop one
    ref = _trainable(policy, grad_clip=None)
    ref.opt = torch.optim.AdamW(ref.params, lr=1e-2, weight_decay=0.0, eps=1e-8, foreach=False)
    ref.step(_loss(ref))
    for a, b in zip(free.module.parameters(), ref.module.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.slow  # torch.compile on CPU: about a minute on 2 cores
def test_compiled_trainable_takes_the_same_steps(policy):
    """distributed.compile: the forward/backward go through torch.compile, the updates
    match eager ones, and `.module` stays the plain model (saving, generation)."""
    eager = _trainable(policy, grad_clip=1.0)
    compiled = _trainable(policy, DistributedConfig(compile=True), grad_clip=1.0)
    assert compiled.forward is not compiled.module and type(compiled.module) is LlamaForCausalLM
    for _ in range(2):
        le, lc = _loss(eager), _loss(compiled)
        torch.testing.assert_close(lc, le, atol=1e-4, rtol=1e-4)
        eager.step(le), compiled.step(lc)
    assert list(compiled.module.state_dict()) == list(eager.module.state_dict())  # no _orig_mod prefixes
    for a, b in zip(compiled.module.parameters(), eager.module.parameters()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_ppo_clipping_can_be_switched_off(tmp_path):
    cfg = load_config(preset="tiny", overrides=["ppo.grad_clip=", "ppo.lr_schedule=linear", "ppo.weight_decay=0"])
    assert cfg.ppo.grad_clip is None and cfg.ppo.lr_schedule == "linear"
    with pytest.raises(ConfigError, match="lr_schedule"):
        load_config(preset="tiny", overrides=["sft.lr_schedule=step"])


def test_sft_packed_batch_has_the_padded_batch_loss_and_gradient(policy):
    """Packed rows (block-diagonal attention, restarted positions) change the layout, not
    the computation: same loss, same gradient; no label crosses into the next sequence."""
    from rlhf.stages.scoring import batch_loss, collate_packed

    batch = [([5, 6, 7, 8, 9, 10], 2), ([11, 12, 13], 1), ([14, 15, 16, 17], 3), ([18, 19], 1), ([20, 21, 22], 2)]
    inputs, lm, n = collate_packed(batch, 0, "cpu")
    assert inputs["input_ids"].shape == (3, 6) and n == 18  # 6 | 4+2 | 3+3 instead of 5 rows of 6
    assert int(lm.sum()) == sum(len(ids) - p for ids, p in batch)
    grads = {}
    for packed in (True, False):
        policy.zero_grad()
        loss, count = batch_loss(policy, batch, 0, "cpu", packed)
        loss.backward()
        grads[packed] = (loss.detach(), count, [p.grad.clone() for p in policy.parameters()])
    policy.zero_grad()
    torch.testing.assert_close(grads[True][0], grads[False][0], atol=1e-6, rtol=1e-5)
    assert grads[True][1] == grads[False][1] == 18
    for a, b in zip(grads[True][2], grads[False][2]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
