"""PPO against the reward model with a KL penalty to the SFT policy (InstructGPT step 3).

Per-token reward: -beta * KL_t(policy || SFT) at every response token, plus the
reward-model score at the last one (Ziegler et al. 2019). Advantages by GAE(gamma,
lambda), whitened per rollout batch. The value model starts from the reward model
(InstructGPT) and has its own optimiser. Beta is fixed or adapted toward a target KL.

PPO-ptx (InstructGPT eq. 2, `stages/ptx.py`): each policy step also takes `ptx_coef`
times the mean token NLL of a batch of demonstrations (or the text of `data.ptx_path`),
in the same optimizer step, logged as ppo/ptx_loss.

Over-optimisation control (`stages/selection.py`): every `judge_every` updates the
run's independent judge (never this reward model) scores the policy on a fixed prompt
set; the best-judged weights are saved (`select: judge`) and the stage stops early when
the judge falls while the proxy rises. The judge never enters the loss.

Each update, in named phases:
  1. `make_experience`: sample responses (KV cache), score them (old log-probs,
     reference log-probs, values, reward-model scores), shape rewards, GAE, whiten
  2. `ppo_update`: `ppo_epochs` passes over shuffled minibatches, policy (+ ptx) and value
  3. `kl_ctl.update`, then `ppo_metrics`, gold monitoring, the judge and selection when due
  4. log / checkpoint (`rlhf.train.loop.Loop`; the per-update curve in `ppo/history.json`)

On several GPUs each process rolls out and trains on its slice of every batch; policy
and value are DeepSpeed engines, reference and reward model are replicas; under
ZeRO-3 rollouts gather the policy (or generate with synced_gpus).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.data.prepared import PrepData
from rlhf.math import (
    gae, masked_mean, masked_sum, masked_whiten, normalize_scores, ppo_policy_loss, ppo_value_loss, shaped_rewards,
)
from rlhf.models.rollout import Rollout, response_logprobs, response_values
from rlhf.stages.contract import StageContext, StageResult
from rlhf.stages.ppo_models import (
    PPOModels, forward_batch_size, kl_controller, load_models, reward_norm, score_rollout,
)
from rlhf.stages.ptx import PtxData, ptx_data
from rlhf.stages.report import PPO_HISTORY
from rlhf.stages.selection import Selection, gold_of_rollouts
from rlhf.train.distributed import Dist, check_divisible, setup
from rlhf.train.loop import Loop, StepLoss, accumulate
from rlhf.train.progress import Timer
from rlhf.train.schedule import epoch_order
from rlhf.train.seed import seed_everything
from rlhf.train.trainable import save_trained


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


def make_experience(models: PPOModels, prompts: list[list[int]], pcfg, norm: tuple[float, float], beta: float,
                    dist: Dist) -> Experience:
    """Sample, score, shape rewards, GAE; whiten advantages over every rank's slice."""
    t0 = Timer()
    with models.policy.autocast():
        rollout = models.rollout(prompts, pcfg.max_new_tokens, pcfg.temperature,
                                 logprobs=pcfg.logprobs_from_generation, batch_size=pcfg.generation_batch_size)
        gen_s = t0()
        old_logprobs, ref_logprobs, old_values, raw = score_rollout(models, rollout, pcfg)  # (B, R) x3, (B,)
    mask = rollout.response_mask.float()  # (B, R)
    score = normalize_scores(raw, *norm, rollout.has_eos, clip=pcfg.reward_clip,
                             missing_eos_penalty=pcfg.missing_eos_penalty)  # (B,)
    score_s = t0() - gen_s
    per_token, kl = shaped_rewards(score, old_logprobs, ref_logprobs, mask, beta, pcfg.kl.estimator)  # (B, R)
    adv, ret = gae(per_token, old_values, mask, pcfg.gamma, pcfg.lam)
    if pcfg.whiten_advantages:
        adv = masked_whiten(adv, mask, reduce=dist.sum_dict if dist.world > 1 else None)
    return Experience(rollout, mask, old_logprobs, ref_logprobs, old_values, raw, score, kl, adv, ret, gen_s, score_s)


def ppo_update(exp: Experience, models: PPOModels, pcfg, dist: Dist, ptx: PtxData | None = None,
               update: int = 0) -> dict[str, float]:
    """`ppo_epochs` passes over shuffled minibatches: one policy and one value step each
    (clipped surrogate, clipped value loss; `accumulate` splits a minibatch into
    `grad_accum_steps` micro-batches, losses weighted by their response tokens). With
    `ptx`, each policy step also takes `ptx_coef` x the SFT loss of the next ptx batch
    (its position is the global policy-step count, so a resumed run sees the same
    batches). Returns each statistic's mean."""
    stats: dict[str, list[float]] = {k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "entropy",
                                                     "vf_clipfrac")}
    if ptx is not None:
        stats["ptx_loss"] = []
    batch, minibatch = pcfg.rollout_batch_size // dist.world, pcfg.minibatch_size // dist.world  # this rank's share

    def tokens(idx: list[int]) -> float:
        return float(exp.mask[idx].sum())

    def policy_loss(idx: list[int]) -> StepLoss:
        sub, mask = exp.rollout.select(idx), exp.mask[idx]
        logprobs, entropy = response_logprobs(models.policy, sub, pcfg.temperature, with_entropy=True)
        loss, st = ppo_policy_loss(logprobs, exp.old_logprobs[idx], exp.advantages[idx], mask, pcfg.clip_eps)
        return StepLoss(loss, len(idx), {"clipfrac": float(st["clipfrac"]), "approx_kl": float(st["approx_kl"]),
                                         "entropy": float(masked_mean(entropy.detach(), mask))})

    def value_loss(idx: list[int]) -> StepLoss:
        values = response_values(models.value.module, exp.rollout.select(idx))
        loss, st = ppo_value_loss(values, exp.values[idx], exp.returns[idx], exp.mask[idx], pcfg.value_clip_eps)
        return StepLoss(loss, len(idx), {"vf_clipfrac": float(st["vf_clipfrac"])})

    steps_per_update = pcfg.ppo_epochs * (batch // minibatch)
    for epoch in range(pcfg.ppo_epochs):
        perm = torch.randperm(batch)
        for start in range(0, batch, minibatch):
            j = perm[start:start + minibatch].tolist()
            aux = None if ptx is None else ptx.objective(update * steps_per_update + epoch * (batch // minibatch)
                                                         + start // minibatch)
            _, pg = accumulate(models.policy, j, policy_loss, tokens, aux)
            _, vf = accumulate(models.value, j, value_loss, tokens)
            for k, val in {"pg_loss": float(pg.loss), "vf_loss": float(vf.loss), **pg.metrics, **vf.metrics}.items():
                stats[k].append(val)
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


def postfix(metrics: dict, seq_kl: float, beta: float, state: dict) -> dict[str, str]:
    """The progress bar's numbers: proxy reward, KL, beta and the judge's latest score (if it has judged)."""
    curve = state["judge"]["curve"]
    return {"rm": f"{metrics['ppo/reward']:.2f}", "kl": f"{seq_kl:.2f}", "beta": f"{beta:.3f}",
            **({"judge": f"{curve[-1][1]:.2f}"} if curve else {})}


def first_start(ctx: StageContext, loop: Loop, models: PPOModels, first: list[list[int]], select: Selection,
                dist: Dist) -> None:
    """Before the first update (not on resume): the RM score's statistics on SFT samples
    of the `first` prompts (policy == SFT now), and the judge's view of SFT."""
    if ctx.config.normalize_reward:
        loop.state["reward_mean"], loop.state["reward_std"] = reward_norm(models, dist.shard(first), ctx.config, dist)
    if ctx.config.judge_every:
        loop.log(select(loop.state, 0), step=0)


def run(ctx: StageContext) -> StageResult:
    timer, pcfg = Timer(), ctx.config
    dist = setup(ctx.runtime, ctx.settings)
    prep = PrepData(ctx.prep_store)
    with ctx.tracker.stage_run(ctx.name, ctx.params, store=ctx.store):
        # models, prompts, ptx data, the judge, KL controller; resume (or measure the RM score on SFT samples)
        seed_everything(ctx.seed + 2)
        B, mb = pcfg.rollout_batch_size, pcfg.minibatch_size
        check_divisible({"ppo.rollout_batch_size": B, "ppo.minibatch_size": mb}, dist.world, pcfg.grad_accum_steps)
        models = load_models(ctx, dist, opt_steps=pcfg.updates * pcfg.ppo_epochs * (B // mb))
        rows = prep.rows("prompt_train")
        prompt_ids = [models.fmt.prompt_ids(r) for r in rows]
        sampler = PromptSampler(len(rows), ctx.seed + 2)
        ptx = ptx_data(ctx, prep, models, dist)
        select = Selection(ctx, models, rows, prompt_ids, dist)
        kl_ctl = kl_controller(pcfg.kl)
        best = {"best": select.best} if select.best else {}
        loop = Loop(ctx.name, total=pcfg.updates, checkpoint_every=pcfg.checkpoint_every, quiet=ctx.quiet,
                    checkpoint_every_s=pcfg.checkpoint_every_s, models={"policy": models.policy, "value": models.value, **best},
                    state={"reward_mean": 0.0, "reward_std": 1.0, "stopped": False, "judge": Selection.initial_state()},
                    store=ctx.store, tracker=ctx.tracker, dist=dist, faults=ctx.faults, fingerprint=ctx.fingerprint,
                    history=PPO_HISTORY)
        if loop.resume():
            kl_ctl.load_state_dict(loop.state["kl_ctl"])
        else:
            first_start(ctx, loop, models, [prompt_ids[i] for i in sampler.indices(0, min(4 * B, len(rows)))],
                        select, dist)

        metrics: dict[str, float] = {}
        for update in loop:
            t0 = Timer()
            # 1. rollout and score this rank's prompts; advantages
            idx = dist.shard(sampler.indices(update * B, B))
            exp = make_experience(models, [prompt_ids[i] for i in idx], pcfg,
                                  (loop.state["reward_mean"], loop.state["reward_std"]), kl_ctl.value, dist)
            # 2. optimise (policy with its ptx batch, value)
            stats = ppo_update(exp, models, pcfg, dist, ptx, update)
            train_s = t0() - exp.gen_s - exp.score_s
            # 3. KL controller, metrics, gold monitoring (rank 0's rollouts), the judge and selection when due
            seq_kl = dist.mean(float(masked_sum(exp.kl, exp.mask, dim=1).mean()))  # the same beta on every rank
            beta = kl_ctl.value
            kl_ctl.update(seq_kl, B)
            loop.state["kl_ctl"] = kl_ctl.state_dict()
            step = loop.advance(B, gen=exp.gen_s, score=exp.score_s, train=train_s)
            metrics = ppo_metrics(exp, stats, seq_kl, beta, {"total": t0(), "train": train_s}, dist)
            if dist.main and (update % pcfg.gold_log_every == 0 or step == pcfg.updates):
                metrics.update(gold_of_rollouts(ctx, models, exp.rollout, rows, idx))
            if pcfg.judge_every and (step % pcfg.judge_every == 0 or step == pcfg.updates):
                metrics.update(select(loop.state, step))
            loop.end_step(metrics, **postfix(metrics, seq_kl, beta, loop.state))  # 4. log / checkpoint

        # 5. save the selected policy: the best-judged weights, or the last
        selected = select.finish(loop.state, loop.step, ctx.tracker)
        model_uri = save_trained(models.policy, models.tok, ctx.store, "ppo/model", ctx.tracker, "policy")
    return StageResult({"wall_s": timer(), "tracking_s": ctx.tracker.seconds, **loop.result("episodes"),
                        "updates": loop.step, "final_beta": kl_ctl.value, "last_metrics": metrics,
                        **select.result(loop.state, selected), "model_uri": model_uri,
                        "mlflow_run_id": ctx.tracker.run_id})
