"""Gradient accumulation and mixed precision in the training layer (`rlhf.train.loop.accumulate`,
`rlhf.train.trainable.Trainable`): `grad_accum_steps=4` at micro-batch 8 gives the gradient
of one batch of 32, for SFT, the reward model and PPO (policy and value), packed and
unpacked; bf16 and fp16 compute under autocast with fp32 master weights."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from rlhf.config import DistributedConfig, PPOConfig, RewardConfig, SFTConfig
from rlhf.train.distributed import Dist
from rlhf.train.loop import StepLoss, accumulate, micro_batches
from rlhf.train.trainable import Trainable

CPU = Dist(0, 1, 0, 0, torch.device("cpu"), False)


def _config(**kw) -> LlamaConfig:
    cfg = LlamaConfig(**kw, vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
                      bos_token_id=None)
    cfg._attn_implementation = "sdpa"
    return cfg


def _twins(cls, **cfg_kw):
    """Two Trainables over identical weights: one step of 32, and 4 micro-batches of 8."""
    torch.manual_seed(0)
    base = cls(_config(**cfg_kw))
    out = []
    for accum in (1, 4):
        model = cls(_config(**cfg_kw))
        model.load_state_dict(base.state_dict())
        out.append(Trainable(model, CPU, DistributedConfig(), lr=1e-3, grad_clip=None, batch_size=32,
                             grad_accum=accum))
    return out


def _grads_of_next_step(model: Trainable) -> list[torch.Tensor]:
    """The gradients the optimizer sees at the next step (recorded, then stepped as usual)."""
    seen: list[torch.Tensor] = []
    step = model.opt.step

    def record(*a, **kw):
        seen.extend(p.grad.clone() for p in model.params)
        return step(*a, **kw)

    model.opt.step = record
    return seen


def _assert_same_gradients(one: Trainable, four: Trainable, run) -> None:
    g1, g4 = _grads_of_next_step(one), _grads_of_next_step(four)
    l1, l4 = run(one), run(four)
    assert len(g1) == len(g4) > 0
    torch.testing.assert_close(l4, l1, atol=1e-6, rtol=1e-5)  # the logged loss is the batch's too
    for a, b in zip(g4, g1):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert max(float(g.abs().max()) for g in g1) > 1e-4  # gradients that say something


def _demos(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):  # very different lengths: token weighting matters
        ids = [rng.randrange(2, 64) for _ in range(rng.randrange(4, 40))] + [1]
        out.append((ids, rng.randrange(1, len(ids) - 1)))
    return out


def test_micro_batches_split_evenly_and_never_empty():
    assert micro_batches(list(range(10)), 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert micro_batches([1, 2], 4) == [[1], [2]]
    assert micro_batches(list(range(8)), 1) == [list(range(8))]


@pytest.mark.parametrize("packed", [True, False])
def test_sft_accumulated_gradient_equals_the_large_batch(packed):
    from rlhf.stages.scoring import loss_tokens
    from rlhf.stages.sft import SFTSteps

    one, four = _twins(LlamaForCausalLM)
    batch = _demos(32)
    assert four.grad_accum == 4 and micro_batches(batch, 4)[0].__len__() == 8

    def run(model):
        steps = SFTSteps(model, [], 0, "cpu", CPU, SFTConfig(packing=packed), {"best_loss": 1.0}, {})
        steps.packed = packed
        return accumulate(model, batch, steps.loss, loss_tokens)[1].loss

    _assert_same_gradients(one, four, run)


@pytest.mark.parametrize("packed", [True, False])
def test_reward_accumulated_gradient_equals_the_large_batch(packed):
    """32 groups of 2 to 4 answers to one prompt (1 to 6 comparisons each): each micro-batch's
    mean pairwise loss is weighted by its comparisons, so 4 parts give the batch's gradient."""
    from itertools import combinations

    from rlhf.models.heads import Group
    from rlhf.stages.comparisons import n_pairs
    from rlhf.stages.reward import RewardSteps

    one, four = _twins(LlamaForSequenceClassification, num_labels=1)
    rng = random.Random(1)
    groups = []
    for ids, plen in _demos(32):
        k = rng.randrange(2, 5)
        seqs = [ids] + [ids[:plen] + [rng.randrange(2, 64) for _ in range(rng.randrange(2, 30))] + [1]
                        for _ in range(k - 1)]
        groups.append(Group(seqs, list(combinations(range(k), 2))))
    assert len({n_pairs([g]) for g in groups}) > 1  # unequal weights: the weighting is tested

    def run(model):
        steps = RewardSteps(model, 0, "cpu", CPU, RewardConfig(share_prefix=packed, packing=packed))
        steps.packed = packed
        return accumulate(model, groups, steps.loss, n_pairs)[1].loss

    _assert_same_gradients(one, four, run)


def test_ppo_accumulated_gradients_equal_the_large_minibatch():
    """Policy and value: one minibatch of 32 episodes, as one forward or 4 of 8."""
    from rlhf.models.rollout import generate, response_logprobs
    from rlhf.stages.ppo import Experience, ppo_update
    from rlhf.stages.ppo_models import PPOModels

    class Tok:
        pad_token_id, eos_token_id = 0, 1

    policies, values = _twins(LlamaForCausalLM), _twins(LlamaForSequenceClassification, num_labels=1)
    torch.manual_seed(2)
    prompts = [[random.Random(i).randrange(2, 64) for _ in range(1 + i % 7)] for i in range(32)]
    ro = generate(policies[0].module, Tok, prompts, 12, 1.0, "cpu")
    mask = ro.response_mask.float()
    with torch.no_grad():
        old = response_logprobs(policies[0].module, ro)
    g = torch.Generator().manual_seed(3)
    B, R = mask.shape
    exp = Experience(ro, mask, old, old, torch.randn(B, R, generator=g), torch.zeros(B), torch.zeros(B),
                     torch.zeros(B, R), torch.randn(B, R, generator=g), torch.randn(B, R, generator=g), 0.0, 0.0)
    pcfg = PPOConfig(rollout_batch_size=32, minibatch_size=32, ppo_epochs=1, grad_accum_steps=4)
    grads, stats = {}, {}
    for policy, value in zip(policies, values):
        gp, gv = _grads_of_next_step(policy), _grads_of_next_step(value)
        torch.manual_seed(4)  # the same shuffle
        stats[policy.grad_accum] = ppo_update(exp, PPOModels(policy, value, None, None, Tok, False, None), pcfg, CPU)
        grads[policy.grad_accum] = (gp, gv)
    assert mask.sum(1).min() < mask.sum(1).max()  # responses of different lengths: token weighting matters
    for k in stats[1]:
        assert stats[4][k] == pytest.approx(stats[1][k], rel=1e-4, abs=1e-6), k
    for a, b in zip(grads[4][0] + grads[4][1], grads[1][0] + grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_master_weights(precision):
    """bf16 / fp16 on the plain-torch path: the forward computes in half precision under
    autocast, the weights and the optimizer state stay fp32; fp16 has a loss scaler
    whose state goes into checkpoints."""
    torch.manual_seed(0)
    model = Trainable(LlamaForCausalLM(_config()), CPU, DistributedConfig(), lr=1e-3, grad_clip=1.0, batch_size=4,
                      precision=precision)
    ids = torch.randint(2, 64, (4, 16))
    with model.autocast():
        logits = model(input_ids=ids).logits
    assert logits.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    before = [p.detach().clone() for p in model.params]
    with model.autocast():
        loss = model(input_ids=ids, labels=ids).loss
    gnorm = model.step(loss)
    assert gnorm > 0 and all(p.dtype == torch.float32 for p in model.params)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.params))
    assert ("scaler" in model.objects()) == (precision == "fp16")


def test_deepspeed_config_follows_precision_and_accumulation():
    from rlhf.train.trainable import deepspeed_config

    cfg = deepspeed_config(DistributedConfig(), batch_size=64, world=2, grad_clip=1.0, lr=1e-3, precision="fp16",
                           grad_accum=4)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (
        64, 8, 4)
    assert cfg["fp16"]["enabled"] and not cfg["bf16"]["enabled"]


@pytest.mark.parametrize("accum", [1, 4])
def test_ptx_objective_joins_the_same_optimizer_step(accum):
    """PPO-ptx's step: loss(main batch) + coef x loss(ptx batch), each its batch's token
    mean, one optimizer step, in one micro-batch or four; the ptx loss is reported."""
    from rlhf.stages.scoring import batch_loss, loss_tokens
    from rlhf.train.loop import Auxiliary

    torch.manual_seed(0)
    base = LlamaForCausalLM(_config())
    main, ptx = _demos(16, seed=5), _demos(24, seed=6)

    plain = LlamaForCausalLM(_config())
    plain.load_state_dict(base.state_dict())
    ptx_loss = batch_loss(plain, ptx, 0, "cpu", False)[0]
    (batch_loss(plain, main, 0, "cpu", False)[0] + 0.5 * ptx_loss).backward()
    expected = [p.grad.clone() for p in plain.parameters()]

    model = LlamaForCausalLM(_config())
    model.load_state_dict(base.state_dict())
    model = Trainable(model, CPU, DistributedConfig(), lr=1e-3, grad_clip=None, batch_size=16, grad_accum=accum)
    seen = _grads_of_next_step(model)

    def loss(batch):
        return StepLoss(batch_loss(model, batch, 0, "cpu", False)[0], 0.0)

    _, out = accumulate(model, main, loss, loss_tokens, Auxiliary(ptx, loss, loss_tokens, 0.5, "ptx_loss"))
    assert out.metrics["ptx_loss"] == pytest.approx(float(ptx_loss.detach()), rel=1e-5)
    for a, b in zip(seen, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_ptx_text_rows_train_on_every_token():
    """data.ptx_path rows {text}: no chat template, the loss on every token but the first;
    demonstrations keep their format (the answer only)."""
    from rlhf.config import ModelConfig
    from rlhf.data.readers import normalize_record
    from rlhf.models import train_tokenizer
    from rlhf.models.chat import ChatFormat, targets_mask
    from rlhf.stages.ptx import PtxData

    tok = train_tokenizer(["some plain text to learn from", "question: what", " answer"] * 30, vocab_size=300)
    fmt = ChatFormat(tok, ModelConfig())
    text = normalize_record({"text": "some plain text to learn from"}, "ptx")
    demo = normalize_record({"prompt": "question: what", "completion": " answer"}, "ptx")
    data = PtxData([text, demo], fmt, PPOConfig(ptx_batch_size=2), 0, 10**6, CPU).batches.data
    (ids, targets), (dids, dtargets) = data
    assert sum(targets_mask(ids, targets)) == len(ids) - 1
    assert (dids, dtargets) == fmt.demonstration(demo) and sum(targets_mask(dids, dtargets)) < len(dids) - 1
    with pytest.raises(Exception, match="a ptx row needs field 'text'"):
        normalize_record({"body": "x"}, "ptx")
    cut = PtxData([text], fmt, PPOConfig(), 0, 3, CPU).batches.data[0][0]
    assert len(cut) == 3
