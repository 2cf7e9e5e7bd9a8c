"""PPO against the reward model with a KL penalty to the SFT policy (InstructGPT step 3).

Per-token reward: -beta * KL_t(policy || SFT) at every response token, plus the
reward-model score at the last one (Ziegler et al. 2019; InstructGPT eq. 2 without the
pretraining mix). Advantages by GAE(gamma, lambda), whitened per rollout batch. The
value model starts from the reward model (InstructGPT) and has its own optimiser.
Beta is fixed or adapted toward a target KL.

The judge (when the run has one) scores rollouts every `gold_log_every` updates for
monitoring only: it never enters the loss, so a user sees proxy reward rising while
gold falls (over-optimisation).

Each update, in named phases:
  1. `make_experience`: sample responses (KV cache), score them (old log-probs,
     reference log-probs, values, reward-model scores), shape rewards, GAE, whiten
  2. `ppo_update`: `ppo_epochs` passes over shuffled minibatches, policy and value
  3. `kl_ctl.update`, then `ppo_metrics`, gold monitoring
  4. log / checkpoint (`rlhf.train.loop.Loop`)

On several GPUs each process rolls out and trains on its slice of every batch; policy
and value are DeepSpeed engines, reference and reward model are replicas; under
ZeRO-3 rollouts gather the policy (or generate with synced_gpus).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from rlhf.data.prepared import PrepData
from rlhf.math import (
    AdaptiveKLController, FixedKLController, gae, masked_mean, masked_sum, masked_whiten, normalize_scores,
    ppo_policy_loss, ppo_value_loss, score_stats, shaped_rewards,
)
from rlhf.models import load_causal_lm, load_reward_model, load_tokenizer
from rlhf.models.loading import apply_lora
from rlhf.models.rollout import Rollout, decode_responses, generate, response_logprobs, response_values, rewards
from rlhf.stages.contract import StageContext, StageResult
from rlhf.train.distributed import Dist, check_divisible, setup
from rlhf.train.loop import Loop
from rlhf.train.progress import Timer
from rlhf.train.schedule import epoch_order
from rlhf.train.seed import seed_everything
from rlhf.train.trainable import Trainable, frozen, make_trainable, save_trained


class PromptSampler:
    """Prompts in a fixed shuffled order per epoch; the position is the episode count."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._orders = n, seed, {}

    def indices(self, start: int, count: int) -> list[int]:
        out = []
        for q in range(start, start + count):
            epoch, i = divmod(q, self.n)
            if epoch not in self._orders:
                self._orders = {epoch: epoch_order(self.n, self.seed, epoch)}
            out.append(self._orders[epoch][i])
        return out


@dataclass
class PPOModels:
    """The four models of PPO and how the policy samples."""

    policy: Trainable
    value: Trainable
    ref: torch.nn.Module
    reward: torch.nn.Module
    tok: object
    synced: bool
    """ZeRO-3 "synced" generation: layers gathered in lockstep instead of the whole policy."""

    def rollout(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                logprobs: bool = False) -> Rollout:
        with (contextlib.nullcontext() if self.synced else self.policy.gathered()):  # whole policy on each GPU
            return generate(self.policy.module, self.tok, prompts, max_new_tokens, temperature,
                            self.policy.dist.device, self.synced, logprobs=logprobs)


@dataclass
class Experience:
    """One scored rollout batch (this rank's slice): what PPO optimises on."""

    rollout: Rollout
    mask: torch.Tensor  # (B, R) 1.0 on response tokens up to and including EOS
    old_logprobs: torch.Tensor  # (B, R) log pi_old(a_t | s_t), the sampling policy
    ref_logprobs: torch.Tensor  # (B, R) log pi_ref(a_t | s_t), SFT
    values: torch.Tensor  # (B, R) V_old(s_t)
    raw_scores: torch.Tensor  # (B,) reward-model score
    scores: torch.Tensor  # (B,) normalised, clipped, minus the missing-EOS penalty
    kl: torch.Tensor  # (B, R) per-token KL estimate
    advantages: torch.Tensor  # (B, R) GAE, whitened over the global batch
    returns: torch.Tensor  # (B, R) advantages + values, before whitening
    gen_s: float
    score_s: float


def load_models(ctx: StageContext, dist: Dist, opt_steps: int) -> PPOModels:
    """Policy and reference from SFT, reward model frozen, value from the reward model."""
    pcfg, dcfg, mcfg = ctx.config, ctx.runtime.distributed, ctx.model
    sft_dir, rm_dir = str(ctx.store.get_dir("sft/model")), str(ctx.store.get_dir("reward/model"))
    tok = load_tokenizer(sft_dir, mcfg)
    mb = pcfg.minibatch_size
    policy = make_trainable(apply_lora(load_causal_lm(sft_dir, mcfg), mcfg), dist, dcfg, pcfg, total_steps=opt_steps,
                            batch_size=mb, eps=1e-5)
    ref = frozen(load_causal_lm(sft_dir, mcfg), dist, dcfg)
    reward_model = frozen(load_reward_model(rm_dir, mcfg, tok.pad_token_id), dist, dcfg)
    value_src = rm_dir if pcfg.value_init == "reward" else sft_dir
    value = make_trainable(load_reward_model(value_src, mcfg, tok.pad_token_id), dist, dcfg, pcfg,
                           total_steps=opt_steps, batch_size=mb, lr=pcfg.value_lr, eps=1e-5)
    return PPOModels(policy, value, ref, reward_model, tok, policy.zero3 and dcfg.zero3_generation == "synced")


def make_experience(models: PPOModels, prompts: list[list[int]], pcfg, norm: tuple[float, float], beta: float,
                    dist: Dist) -> Experience:
    """Sample, score, shape rewards, GAE; whiten advantages over every rank's slice."""
    t0 = Timer()
    rollout = models.rollout(prompts, pcfg.max_new_tokens, pcfg.temperature, logprobs=pcfg.logprobs_from_generation)
    gen_s = t0()
    mask = rollout.response_mask.float()  # (B, R)
    with torch.no_grad():
        old_logprobs = rollout.logprobs  # (B, R) kept by generation, or one more policy forward:
        if old_logprobs is None:
            old_logprobs = response_logprobs(models.policy, rollout, pcfg.temperature)
        ref_logprobs = response_logprobs(models.ref, rollout, pcfg.temperature)  # (B, R)
        old_values = response_values(models.value.module, rollout)  # (B, R)
        raw = rewards(models.reward, rollout)  # (B,)
    score = normalize_scores(raw, *norm, rollout.has_eos, clip=pcfg.reward_clip,
                             missing_eos_penalty=pcfg.missing_eos_penalty)  # (B,)
    score_s = t0() - gen_s
    per_token, kl = shaped_rewards(score, old_logprobs, ref_logprobs, mask, beta, pcfg.kl.estimator)  # (B, R)
    adv, ret = gae(per_token, old_values, mask, pcfg.gamma, pcfg.lam)
    if pcfg.whiten_advantages:
        adv = masked_whiten(adv, mask, reduce=dist.sum_dict if dist.world > 1 else None)
    return Experience(rollout, mask, old_logprobs, ref_logprobs, old_values, raw, score, kl, adv, ret, gen_s, score_s)


def ppo_update(exp: Experience, models: PPOModels, pcfg, dist: Dist) -> dict[str, float]:
    """`ppo_epochs` passes over shuffled minibatches: one policy and one value step each
    (clipped surrogate, clipped value loss); returns each statistic's mean."""
    stats: dict[str, list[float]] = {k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "entropy",
                                                     "vf_clipfrac")}
    batch, minibatch = pcfg.rollout_batch_size // dist.world, pcfg.minibatch_size // dist.world  # this rank's share
    for _ in range(pcfg.ppo_epochs):
        perm = torch.randperm(batch)
        for start in range(0, batch, minibatch):
            j = perm[start:start + minibatch]
            sub, mask = exp.rollout.select(j), exp.mask[j]
            logprobs, entropy = response_logprobs(models.policy, sub, pcfg.temperature, with_entropy=True)
            pg_loss, pg_stats = ppo_policy_loss(logprobs, exp.old_logprobs[j], exp.advantages[j], mask, pcfg.clip_eps)
            models.policy.step(pg_loss)
            values = response_values(models.value.module, sub)
            vf_loss, vf_stats = ppo_value_loss(values, exp.values[j], exp.returns[j], mask, pcfg.value_clip_eps)
            models.value.step(vf_loss)
            for k, val in (("pg_loss", pg_loss), ("vf_loss", vf_loss), ("clipfrac", pg_stats["clipfrac"]),
                           ("approx_kl", pg_stats["approx_kl"]), ("entropy", masked_mean(entropy.detach(), mask)),
                           ("vf_clipfrac", vf_stats["vf_clipfrac"])):
                stats[k].append(float(val.detach()) if torch.is_tensor(val) else float(val))
    return {k: sum(v) / len(v) for k, v in stats.items()}


def ppo_metrics(exp: Experience, stats: dict, seq_kl: float, beta: float, wall: dict[str, float], dist: Dist) -> dict:
    """The update's metrics, averaged over ranks."""
    mask, B = exp.mask, exp.mask.shape[0] * dist.world
    return dist.mean_dict({
        "ppo/reward": float(exp.raw_scores.mean()), "ppo/score": float(exp.scores.mean()), "ppo/kl": seq_kl,
        "ppo/beta": beta, "ppo/response_length": float(mask.sum(1).mean()),
        "ppo/no_eos_rate": float((~exp.rollout.has_eos).float().mean()),
        "ppo/return": float(masked_mean(exp.returns, mask)), **{f"ppo/{k}": v for k, v in stats.items()},
        "perf/episodes_per_s": B / wall["total"], "perf/gen_tokens_per_s": float(mask.sum()) * dist.world / max(
            exp.gen_s, 1e-9), "perf/gen_s": exp.gen_s, "perf/score_s": exp.score_s, "perf/train_s": wall["train"],
    })


@torch.no_grad()
def reward_norm(models: PPOModels, prompts: list[list[int]], pcfg, dist: Dist) -> tuple[float, float]:
    """Mean and std of the reward model's score on samples of the initial policy (SFT),
    which normalise every later score (Ziegler et al. 2019)."""
    scores = rewards(models.reward, models.rollout(prompts, pcfg.max_new_tokens, pcfg.temperature)).float()  # (N,)
    return score_stats(scores, mean_reduce=dist.mean_dict if dist.world > 1 else None)


def run(ctx: StageContext) -> StageResult:
    timer, pcfg = Timer(), ctx.config
    dist = setup(ctx.runtime, ctx.settings)
    prep = PrepData(ctx.prep_store)
    with ctx.tracker.stage_run(ctx.name, ctx.params, store=ctx.store):
        # models, prompts, KL controller; resume (or measure the RM score on SFT samples)
        seed_everything(ctx.seed + 2)
        B, mb = pcfg.rollout_batch_size, pcfg.minibatch_size
        check_divisible({"ppo.rollout_batch_size": B, "ppo.minibatch_size": mb}, dist.world)
        models = load_models(ctx, dist, opt_steps=pcfg.updates * pcfg.ppo_epochs * (B // mb))
        rows = prep.rows("prompt_train")
        prompt_ids = [models.tok(r.prompt)["input_ids"] for r in rows]
        sampler = PromptSampler(len(rows), ctx.seed + 2)
        kl_ctl = (AdaptiveKLController(pcfg.kl.init_coef, pcfg.kl.target, pcfg.kl.horizon) if pcfg.kl.adaptive
                  else FixedKLController(pcfg.kl.init_coef))
        loop = Loop(ctx.name, total=pcfg.updates, checkpoint_every=pcfg.checkpoint_every,
                    models={"policy": models.policy, "value": models.value},
                    state={"reward_mean": 0.0, "reward_std": 1.0},
                    store=ctx.store, tracker=ctx.tracker, dist=dist, faults=ctx.faults, fingerprint=ctx.fingerprint,
                    quiet=ctx.quiet)
        if loop.resume():
            kl_ctl.load_state_dict(loop.state["kl_ctl"])
        elif pcfg.normalize_reward:  # statistics of the RM score on SFT samples (policy == SFT now)
            first = [prompt_ids[i] for i in dist.shard(sampler.indices(0, min(4 * B, len(rows))))]
            loop.state["reward_mean"], loop.state["reward_std"] = reward_norm(models, first, pcfg, dist)

        metrics: dict[str, float] = {}
        for update in loop:
            t0 = Timer()
            # 1. rollout and score this rank's prompts; advantages
            idx = dist.shard(sampler.indices(update * B, B))
            exp = make_experience(models, [prompt_ids[i] for i in idx], pcfg,
                                  (loop.state["reward_mean"], loop.state["reward_std"]), kl_ctl.value, dist)
            # 2. optimise
            stats = ppo_update(exp, models, pcfg, dist)
            train_s = t0() - exp.gen_s - exp.score_s
            # 3. KL controller, metrics, gold monitoring (rank 0's rollouts)
            seq_kl = dist.mean(float(masked_sum(exp.kl, exp.mask, dim=1).mean()))  # the same beta on every rank
            beta = kl_ctl.value
            kl_ctl.update(seq_kl, B)
            loop.state["kl_ctl"] = kl_ctl.state_dict()
            step = loop.advance(B, gen=exp.gen_s, score=exp.score_s, train=train_s)
            metrics = ppo_metrics(exp, stats, seq_kl, beta, {"total": t0(), "train": train_s}, dist)
            if dist.main and (update % pcfg.gold_log_every == 0 or step == pcfg.updates):
                texts = decode_responses(models.tok, exp.rollout)
                golds = [ctx.judge.score(rows[i].prompt, text) for i, text in zip(idx, texts)]
                if all(g is not None for g in golds):
                    metrics["ppo/gold_score"] = sum(golds) / len(golds)
            # 4. log / checkpoint
            loop.end_step(metrics, rm=f"{metrics['ppo/reward']:.2f}", kl=f"{seq_kl:.2f}", beta=f"{beta:.3f}",
                          gold=f"{metrics.get('ppo/gold_score', float('nan')):.2f}")

        model_uri = save_trained(models.policy, models.tok, ctx.store, "ppo/model", ctx.tracker, "policy")
    return StageResult({"wall_s": timer(), "tracking_s": ctx.tracker.seconds, **loop.result("episodes"),
                        "updates": loop.step, "final_beta": kl_ctl.value, "last_metrics": metrics,
                        "model_uri": model_uri, "mlflow_run_id": ctx.tracker.run_id})
