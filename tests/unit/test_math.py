"""Unit tests for rlhf.math: hand-worked numbers and naive reference loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf.math import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    kl_estimate,
    kl_k1,
    kl_k3,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    pairwise_reward_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sft_loss,
    shaped_rewards,
    token_logprobs,
)

DTYPES = [torch.float32, torch.float64]


def close(actual, expected, atol=1e-6, rtol=1e-5):
    """assert_close that accepts Python numbers/lists as the expected value."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


# --------------------------------------------------------------------------- masked


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bool])
def test_masked_mean_sum_var_by_hand(dtype, mask_dtype):
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=dtype)
    mask = torch.tensor([0, 1, 1, 0]).to(mask_dtype)
    assert masked_sum(x, mask).dtype == dtype
    assert masked_mean(x, mask).dtype == dtype
    close(masked_sum(x, mask), 5.0)
    close(masked_mean(x, mask), 2.5)
    # deviations -0.5, +0.5 -> squared sum 0.5; n - 1 = 1 -> 0.5; n = 2 -> 0.25
    close(masked_var(x, mask), 0.5)
    close(masked_var(x, mask, unbiased=False), 0.25)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_sum_and_mean_along_dim(dtype):
    x = torch.tensor([[1.0, 2.0, 5.0], [3.0, 4.0, 6.0]], dtype=dtype)  # (B, T)
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    close(masked_sum(x, mask, dim=1), [1.0, 7.0])
    close(masked_mean(x, mask, dim=1), [1.0, 3.5])
    close(masked_sum(x, mask, dim=0), [4.0, 4.0, 0.0])
    # column 2 has no counted entries: count clamped to 1 -> 0, not NaN
    close(masked_mean(x, mask, dim=0), [2.0, 4.0, 0.0])


def test_masked_reductions_ignore_nan_and_inf_in_masked_positions():
    x = torch.tensor([float("nan"), 2.0, 3.0, float("inf")])
    mask = torch.tensor([0.0, 1.0, 1.0, 0.0])
    close(masked_mean(x, mask), 2.5)
    close(masked_var(x, mask), 0.5)
    out = masked_whiten(x, mask)
    assert torch.isfinite(out).all()


def test_masked_edge_counts():
    x = torch.tensor([7.0, 3.0])
    empty = torch.zeros(2)
    close(masked_mean(x, empty), 0.0)
    close(masked_var(x, empty), 0.0)
    single = torch.tensor([1.0, 0.0])
    # one entry: no Bessel correction possible -> 0, not NaN/inf
    close(masked_var(x, single), 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_whiten_by_hand(dtype):
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=dtype)
    mask = torch.tensor([0.0, 1.0, 1.0, 0.0])
    # mean 2.5, unbiased var 0.5 -> (2 - 2.5) / sqrt(0.5) = -sqrt(0.5)
    s = math.sqrt(0.5)
    out = masked_whiten(x, mask, eps=0.0)
    assert out.dtype == dtype
    close(out, [0.0, -s, s, 0.0])
    out_no_shift = masked_whiten(x, mask, shift_mean=False, eps=0.0)
    close(out_no_shift, [0.0, 2.5 - s, 2.5 + s, 0.0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_whiten_random_has_zero_mean_unit_var(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, generator=g, dtype=dtype) * 3 + 5  # (B, T)
    mask = (torch.rand(4, 9, generator=g) > 0.3).float()
    out = masked_whiten(x, mask)
    close(masked_mean(out, mask), 0.0, atol=1e-5)
    close(masked_var(out, mask), 1.0, atol=1e-5)
    assert (out[mask == 0] == 0).all()
    # matches torch's own statistics on the selected entries
    sel = x[mask.bool()]
    close(out[mask.bool()], (sel - sel.mean()) / torch.sqrt(sel.var() + 1e-8))


# --------------------------------------------------------------------------- token log-probs / SFT


def test_token_logprobs_matches_log_softmax_gather_and_is_float32():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=g)  # (B, T, V)
    labels = torch.randint(0, 7, (2, 5), generator=g)  # (B, T)
    out = token_logprobs(logits, labels)
    assert out.shape == (2, 4)
    ref = torch.log_softmax(logits, dim=-1)
    for b in range(2):
        for t in range(4):
            close(out[b, t], ref[b, t, labels[b, t + 1]])
    out_bf16 = token_logprobs(logits.to(torch.bfloat16), labels)
    assert out_bf16.dtype == torch.float32


def test_entropy_from_logits():
    uniform = torch.zeros(1, 2, 5)  # (B, T, V)
    close(entropy_from_logits(uniform), [[math.log(5)] * 2])
    peaked = torch.tensor([[[100.0, 0.0, 0.0]]])
    close(entropy_from_logits(peaked), [[0.0]], atol=1e-6)
    # two-way split p = (3/4, 1/4)
    two = torch.tensor([[[math.log(3.0), 0.0]]])
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    close(entropy_from_logits(two), [[expected]])


def _hand_logits():
    # position 0 -> p = (1/4, 3/4); position 1 -> p = (4/5, 1/5); position 2 unused (no next token)
    return torch.tensor(
        [[[0.0, math.log(3.0)], [math.log(4.0), 0.0], [9.0, -9.0]]], requires_grad=True
    )  # (1, 3, 2)


def test_sft_loss_by_hand():
    logits = _hand_logits()
    labels = torch.tensor([[0, 1, 0]])
    # both label tokens 1 and 2 are response tokens:
    # -log p0(1) = log(4/3), -log p1(0) = log(5/4) -> mean = log(5/3) / 2
    loss, stats = sft_loss(logits, labels, torch.tensor([[0.0, 1.0, 1.0]]))
    close(loss, math.log(5.0 / 3.0) / 2)
    close(stats["nll_sum"], math.log(5.0 / 3.0))
    close(stats["tokens"], 2.0)
    assert stats["tokens"].is_floating_point()
    assert not stats["nll_sum"].requires_grad and stats["nll_sum"].dim() == 0
    # only the last label is a response token
    loss, stats = sft_loss(logits, labels, torch.tensor([[0.0, 0.0, 1.0]]))
    close(loss, math.log(5.0 / 4.0))
    close(stats["tokens"], 1.0)


def test_sft_loss_ignores_prompt_positions():
    logits = _hand_logits().detach()
    labels = torch.tensor([[0, 1, 0]])
    mask = torch.tensor([[0.0, 0.0, 1.0]])  # prompt = tokens 0, 1; response = token 2
    base, _ = sft_loss(logits, labels, mask)

    changed_prompt = logits.clone()
    changed_prompt[0, 0] = torch.tensor([5.0, -5.0])  # predicts label 1, a prompt token
    same, _ = sft_loss(changed_prompt, labels, mask)
    close(same, base)

    changed_response = logits.clone()
    changed_response[0, 1] = torch.tensor([-5.0, 5.0])  # predicts label 2, a response token
    different, _ = sft_loss(changed_response, labels, mask)
    assert not torch.isclose(different, base)

    # gradient reaches only the position that scores a response token
    logits_grad = logits.clone().requires_grad_(True)
    loss, _ = sft_loss(logits_grad, labels, mask)
    loss.backward()
    assert logits_grad.grad[0, 0].abs().sum() == 0
    assert logits_grad.grad[0, 1].abs().sum() > 0


def test_sft_loss_matches_cross_entropy_random():
    g = torch.Generator().manual_seed(2)
    B, T, V = 3, 6, 11
    logits = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    loss_mask = torch.tensor(
        [[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 0]], dtype=torch.float32
    )
    targets = labels[:, 1:].clone()
    targets[loss_mask[:, 1:] == 0] = -100
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, V), targets.reshape(-1), ignore_index=-100)
    loss, stats = sft_loss(logits, labels, loss_mask)
    close(loss, expected)
    close(stats["tokens"], 9.0)


# --------------------------------------------------------------------------- reward model


def test_pairwise_reward_loss_by_hand():
    r = torch.tensor([0.3, -1.2])
    loss, _ = pairwise_reward_loss(r, r.clone())
    close(loss, math.log(2.0))

    loss, _ = pairwise_reward_loss(torch.tensor([1.0]), torch.tensor([0.0]))
    close(loss, math.log1p(math.exp(-1.0)))  # -log sigmoid(1)

    # margin cancels the difference -> back to log 2; float and tensor margins agree
    loss_f, _ = pairwise_reward_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=1.0)
    loss_t, _ = pairwise_reward_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=torch.tensor([1.0]))
    close(loss_f, math.log(2.0))
    close(loss_t, math.log(2.0))


def test_pairwise_reward_loss_stats_and_gradient():
    r_c = torch.tensor([1.0, 0.0, 2.0], requires_grad=True)
    r_r = torch.tensor([0.0, 1.0, 2.0], requires_grad=True)
    loss, stats = pairwise_reward_loss(r_c, r_r)
    close(stats["accuracy"], 1.0 / 3.0)  # the tie does not count as correct
    close(stats["margin_mean"], 0.0)
    close(stats["reward_chosen"], 1.0)
    close(stats["reward_rejected"], 1.0)
    for value in stats.values():
        assert value.dim() == 0 and not value.requires_grad
    loss.backward()
    # d/dr_c [-log sigmoid(d)] / B = -(1 - sigmoid(d)) / B
    expected = -(1 - torch.sigmoid(torch.tensor([1.0, -1.0, 0.0]))) / 3
    close(r_c.grad, expected)
    close(r_r.grad, -expected)


# --------------------------------------------------------------------------- PPO policy loss


def _policy_inputs(ratios, advantages):
    old = torch.zeros(1, len(ratios))
    new = torch.log(torch.tensor([ratios]))
    return new.requires_grad_(True), old, torch.tensor([advantages])


@pytest.mark.parametrize(
    "ratio, advantage, expected_loss, clipped",
    [
        (1.5, 1.0, -1.2, True),  # ratio above 1+eps, A > 0: capped at 1.2
        (0.5, 1.0, -0.5, False),  # ratio below 1-eps, A > 0: pessimistic unclipped term kept
        (0.5, -1.0, 0.8, True),  # ratio below 1-eps, A < 0: floored at 0.8
        (1.5, -1.0, 1.5, False),  # ratio above 1+eps, A < 0: unclipped term kept
        (1.1, 2.0, -2.2, False),  # inside the trust region: plain -A * ratio
    ],
)
def test_ppo_policy_loss_single_token_cases(ratio, advantage, expected_loss, clipped):
    logprobs, old, adv = _policy_inputs([ratio], [advantage])
    loss, stats = ppo_policy_loss(logprobs, old, adv, torch.ones(1, 1), clip_eps=0.2)
    close(loss, expected_loss)
    close(stats["clipfrac"], 1.0 if clipped else 0.0)
    close(stats["ratio_mean"], ratio)
    loss.backward()
    # clipped tokens carry no gradient; otherwise d(-A * exp(lp))/dlp = -A * ratio
    expected_grad = 0.0 if clipped else -advantage * ratio
    close(logprobs.grad, [[expected_grad]])


def test_ppo_policy_loss_batch_mask_and_stats():
    ratios = [1.5, 0.5, 0.5, 1.5, 7.0]
    advs = [1.0, 1.0, -1.0, -1.0, 100.0]  # last token is padding and must be ignored
    logprobs, old, adv = _policy_inputs(ratios, advs)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    close(loss, (-1.2 - 0.5 + 0.8 + 1.5) / 4)
    close(stats["clipfrac"], 0.5)
    close(stats["ratio_mean"], 1.0)
    expected_kl = 0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4
    close(stats["approx_kl"], expected_kl)
    for value in stats.values():
        assert value.dim() == 0 and not value.requires_grad


def test_ppo_policy_loss_on_policy_is_minus_mean_advantage():
    g = torch.Generator().manual_seed(3)
    lp = torch.randn(2, 4, generator=g)
    adv = torch.randn(2, 4, generator=g)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    loss, stats = ppo_policy_loss(lp, lp.clone(), adv, mask)
    close(loss, -adv[mask.bool()].mean())
    close(stats["clipfrac"], 0.0)
    close(stats["approx_kl"], 0.0)
    close(stats["ratio_mean"], 1.0)


# --------------------------------------------------------------------------- PPO value loss


def test_ppo_value_loss_by_hand():
    values = torch.tensor([[0.5, 1.5, 0.1, 42.0]], requires_grad=True)
    old = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 0.0, 1.0, -42.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # token 0: v_clip = 0.2; (0.5-1)^2 = 0.25 < (0.2-1)^2 = 0.64 -> clipped term 0.64
    # token 1: v_clip = 1.2; (1.5-0)^2 = 2.25 > (1.2-0)^2 = 1.44 -> unclipped 2.25
    # token 2: inside the clip range, both 0.81 -> not counted as clipped
    # token 3: padding
    loss, stats = ppo_value_loss(values, old, returns, mask, clip_eps=0.2)
    close(loss, 0.5 * (0.64 + 2.25 + 0.81) / 3)
    close(stats["vf_clipfrac"], 1.0 / 3.0)
    close(stats["value_mean"], (0.5 + 1.5 + 0.1) / 3)
    loss.backward()
    # token 0 is clipped -> no gradient; token 1: (v - R) / 3; token 2: (v - R) / 3
    close(values.grad, [[0.0, 1.5 / 3, -0.9 / 3, 0.0]])


# --------------------------------------------------------------------------- GAE


def test_gae_hand_worked_three_steps():
    # 4th column is padding with junk that must not leak in
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # gamma = 1, lam = 0.5:
    # t=2: delta = 1 + 0 - 0.7 = 0.3                  A = 0.3
    # t=1: delta = 0 + 0.7 - 0.6 = 0.1                A = 0.1 + 0.5 * 0.3  = 0.25
    # t=0: delta = 0 + 0.6 - 0.5 = 0.1                A = 0.1 + 0.5 * 0.25 = 0.225
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    close(adv, [[0.225, 0.25, 0.3, 0.0]])
    close(ret, [[0.725, 0.85, 1.0, 0.0]])
    # gamma = 0.5, lam = 1: A_t = discounted return - V_t; returns (1/4, 1/2, 1)
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=1.0)
    close(adv, [[0.25 - 0.5, 0.5 - 0.6, 1.0 - 0.7, 0.0]])
    close(ret, [[0.25, 0.5, 1.0, 0.0]])


def _naive_gae(rewards, values, mask, gamma, lam):
    """Per-row scalar loop over the masked span; value past the span end is 0."""
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t] > 0]
        running = 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            v_next = float(values[b, idx[k + 1]]) if k + 1 < len(idx) else 0.0
            delta = float(rewards[b, t]) + gamma * v_next - float(values[b, t])
            running = delta + gamma * lam * running
            adv[b][t] = running
            ret[b][t] = running + float(values[b, t])
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


def _ragged_mask(B, T, g):
    mask = torch.zeros(B, T)
    for b in range(B):
        start = int(torch.randint(0, 3, (1,), generator=g))  # response may start after a prompt
        end = int(torch.randint(start, T + 1, (1,), generator=g))  # and end early (possibly empty)
        mask[b, start:end] = 1.0
    mask[0] = 1.0  # one full row
    mask[1] = 0.0  # one empty row
    return mask


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.95), (1.0, 1.0), (0.9, 0.0), (0.5, 0.7)])
def test_gae_matches_naive_reference(gamma, lam):
    g = torch.Generator().manual_seed(int(gamma * 100 + lam * 10))
    B, T = 6, 9
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = _ragged_mask(B, T, g)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = _naive_gae(rewards, values, mask, gamma, lam)
    close(adv, ref_adv, atol=1e-10, rtol=1e-10)
    close(ret, ref_ret, atol=1e-10, rtol=1e-10)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_is_gradient_free():
    values = torch.randn(2, 3, requires_grad=True)
    adv, ret = gae(torch.randn(2, 3), values, torch.ones(2, 3))
    assert not adv.requires_grad and not ret.requires_grad


# --------------------------------------------------------------------------- KL


def test_kl_k1_k3_by_hand():
    lp = torch.tensor([-1.0, -2.0, -0.7])
    ref = torch.tensor([-2.0, -1.0, -0.7])
    close(kl_k1(lp, ref), [1.0, -1.0, 0.0])
    # r = ref - lp = (-1, 1, 0): e^r - 1 - r = (e^-1, e - 2, 0)
    close(kl_k3(lp, ref), [math.exp(-1.0), math.e - 2.0, 0.0])
    close(kl_estimate(lp, ref, "k1"), kl_k1(lp, ref))
    close(kl_estimate(lp, ref, "k3"), kl_k3(lp, ref))


def test_kl_k3_nonnegative_and_quadratic_for_small_differences():
    g = torch.Generator().manual_seed(4)
    lp = torch.randn(1000, generator=g, dtype=torch.float64) * 3
    ref = torch.randn(1000, generator=g, dtype=torch.float64) * 3
    assert (kl_k3(lp, ref) >= 0).all()
    assert (kl_k1(lp, ref) < 0).any()  # k1 per sample can be negative
    small = torch.linspace(-1e-2, 1e-2, 21, dtype=torch.float64)
    small = small[small != 0]
    base = torch.full_like(small, -3.0)
    k3 = kl_k3(base + small, base)
    k1 = kl_k1(base + small, base)
    torch.testing.assert_close(k3, k1**2 / 2, rtol=1e-2, atol=0.0)


def test_kl_estimators_are_unbiased_for_true_kl():
    # samples from pi; E_pi[k1] = E_pi[k3] = KL(pi || ref)
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    ref = torch.tensor([0.2, 0.4, 0.4], dtype=torch.float64)
    true_kl = float((pi * (pi / ref).log()).sum())
    g = torch.Generator().manual_seed(5)
    samples = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    lp, ref_lp = pi.log()[samples], ref.log()[samples]
    assert abs(float(kl_k1(lp, ref_lp).mean()) - true_kl) < 5e-3
    assert abs(float(kl_k3(lp, ref_lp).mean()) - true_kl) < 5e-3


def test_kl_estimate_rejects_unknown_estimator():
    with pytest.raises(ValueError, match="k1.*k3"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k2")


# --------------------------------------------------------------------------- shaped rewards


def test_shaped_rewards_ragged_k1():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.float32)
    logprobs = torch.full((4, 4), -1.0)
    ref_logprobs = torch.full((4, 4), -1.5)  # k1 = 0.5 per token
    score = torch.tensor([1.0, 2.0, 3.0, 4.0])
    rewards, kl = shaped_rewards(score, logprobs, ref_logprobs, mask, kl_coef=0.1)
    p = -0.05  # -kl_coef * 0.5
    close(
        rewards,
        [
            [p, p, p + 1.0, 0.0],
            [p, p + 2.0, 0.0, 0.0],
            [0.0, p, p, p + 3.0],
            [0.0, 0.0, 0.0, 0.0],  # empty row gets no score
        ],
    )
    close(kl, 0.5 * mask)


def test_shaped_rewards_k3_and_bool_mask():
    mask = torch.tensor([[True, True, False]])
    logprobs = torch.tensor([[-1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -0.5, 0.0]])
    rewards, kl = shaped_rewards(torch.tensor([2.0]), logprobs, ref_logprobs, mask, 0.5, kl_estimator="k3")
    k3_a = math.exp(-0.5) - 1 + 0.5  # r = -0.5
    k3_b = math.exp(0.5) - 1 - 0.5  # r = +0.5
    close(kl, [[k3_a, k3_b, 0.0]])
    close(rewards, [[-0.5 * k3_a, -0.5 * k3_b + 2.0, 0.0]])


# --------------------------------------------------------------------------- KL controllers


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=512)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_kl_controller_direction_and_magnitude():
    up = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    up.update(current_kl=6.6, n_steps=256)  # error +0.1 (inside the clip)
    assert up.value == pytest.approx(0.1 * (1 + 0.1 * 256 / 10_000))
    assert up.value > 0.1

    down = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    down.update(current_kl=5.4, n_steps=256)  # error -0.1
    assert down.value == pytest.approx(0.1 * (1 - 0.1 * 256 / 10_000))
    assert down.value < 0.1

    on_target = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    on_target.update(current_kl=6.0, n_steps=256)
    assert on_target.value == pytest.approx(0.1)


def test_adaptive_kl_controller_clamps_error_at_20_percent():
    far_above = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    far_above.update(current_kl=1000.0, n_steps=100)
    assert far_above.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))

    far_below = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    far_below.update(current_kl=0.0, n_steps=100)
    assert far_below.value == pytest.approx(0.1 * (1 - 0.2 * 100 / 1000))


def test_adaptive_kl_controller_state_dict_round_trip():
    ctl = AdaptiveKLController(0.2, target=4.0, horizon=5000)
    for kl in [8.0, 3.0, 4.5]:
        ctl.update(current_kl=kl, n_steps=64)
    state = ctl.state_dict()
    assert all(type(v) is float for v in state.values())

    restored = AdaptiveKLController(1.0, target=1.0, horizon=1)
    restored.load_state_dict(state)
    assert restored.value == ctl.value
    for kl in [10.0, 1.0]:
        ctl.update(current_kl=kl, n_steps=32)
        restored.update(current_kl=kl, n_steps=32)
        assert restored.value == ctl.value
