"""PPO against the reward model with a KL penalty to the SFT policy (InstructGPT step 3).

Per-token reward: -beta * KL_t(policy || SFT) at every response token, plus the
reward-model score at the last one (Ziegler et al. 2019; InstructGPT eq. 2 without the
pretraining mix). Advantages by GAE(gamma, lambda), whitened per rollout batch. The
value model starts from the reward model (InstructGPT) and has its own optimiser.
Beta is fixed or adapted toward a target KL.

The gold judge (when the task has one) scores rollouts every `gold_log_every` updates
for monitoring only: it never enters the loss, so a user sees proxy reward rising
while gold falls (over-optimisation).

Each update:
  1. rollout: sample responses with the KV cache
  2. score: old log-probs, reference log-probs, values, reward-model scores
  3. advantages: shaped rewards, GAE, whitening
  4. optimise: `ppo_epochs` passes over shuffled minibatches
  5. log / checkpoint

On several GPUs (distributed.py) each process rolls out and trains on its slice of
every batch; policy and value are DeepSpeed engines, reference and reward model are
replicas; under ZeRO-3 rollouts gather the policy (or generate with synced_gpus).
"""

from __future__ import annotations

import contextlib

import torch

from rlhf.config import PipelineConfig
from rlhf.train.distributed import Trainable, check_divisible, frozen, save_trained, setup
from rlhf.adapters.settings import maybe_inject_fault
from rlhf.data.tasks import gold_score
from rlhf.math import (
    AdaptiveKLController, FixedKLController, gae, masked_mean, masked_whiten, ppo_policy_loss, ppo_value_loss,
    shaped_rewards,
)
from rlhf.models import load_causal_lm, load_reward_model, load_tokenizer
from rlhf.models.loading import apply_lora
from rlhf.stages.common import (
    PrepData, StepClock, Timer, epoch_order, lr_lambda, progress, resume_checkpoint, save_checkpoint, seed_everything, write_result,
)
from rlhf.stages.rollout import decode_responses, generate, response_logprobs, response_values, rewards


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


def whiten_global(adv: torch.Tensor, mask: torch.Tensor, dist) -> torch.Tensor:
    """`masked_whiten` over the whole rollout batch: with several processes, the mean and
    (unbiased) variance come from every rank's slice, as if one process held them all."""
    if dist.world == 1:
        return masked_whiten(adv, mask)
    t = dist.sum_dict({"sum": (adv * mask).sum(), "sq": (adv * adv * mask).sum(), "n": mask.sum()})
    mean = t["sum"] / max(t["n"], 1.0)
    var = (t["sq"] - t["n"] * mean * mean) / max(t["n"] - 1, 1.0)
    return (adv - mean) / (max(var, 0.0) + 1e-8) ** 0.5 * mask


def run(cfg: PipelineConfig, store, tracker, quiet: bool = False, prep_store=None) -> dict:
    timer = Timer()
    dist = setup(cfg)
    device, dcfg = dist.device, cfg.distributed
    pcfg = cfg.ppo
    prep = PrepData(prep_store or store)
    with tracker.stage_run("ppo", cfg.model_dump(), store=store):
        # models: policy and reference from SFT, reward frozen, value from the reward model
        seed_everything(cfg.seed + 2)
        sft_dir, rm_dir = str(store.get_dir("sft/model")), str(store.get_dir("reward/model"))
        tok = load_tokenizer(sft_dir, cfg.model)
        # Across GPUs each rank rolls out and trains on its slice of every batch; the
        # trained models (policy, value) are DeepSpeed engines, the scored ones replicas.
        B, mb = pcfg.rollout_batch_size, pcfg.minibatch_size
        check_divisible({"ppo.rollout_batch_size": B, "ppo.minibatch_size": mb}, dist.world)
        opt_steps = pcfg.updates * pcfg.ppo_epochs * (B // mb)  # the schedule runs over every optimizer step
        policy = Trainable(apply_lora(load_causal_lm(sft_dir, cfg.model), cfg.model), dist, dcfg, lr=pcfg.lr, eps=1e-5,
                           weight_decay=pcfg.weight_decay, grad_clip=pcfg.grad_clip, batch_size=mb,
                           schedule=lr_lambda(0, opt_steps, pcfg.lr_schedule)).train()
        ref = frozen(load_causal_lm(sft_dir, cfg.model), dist, dcfg)
        reward_model = frozen(load_reward_model(rm_dir, cfg.model, tok.pad_token_id), dist, dcfg)
        value_src = rm_dir if pcfg.value_init == "reward" else sft_dir
        value = Trainable(load_reward_model(value_src, cfg.model, tok.pad_token_id), dist, dcfg, lr=pcfg.value_lr,
                          eps=1e-5, weight_decay=pcfg.weight_decay, grad_clip=pcfg.grad_clip, batch_size=mb,
                          schedule=lr_lambda(0, opt_steps, pcfg.lr_schedule)).train()
        synced = policy.zero3 and dcfg.zero3_generation == "synced"

        def rollout(prompts, logprobs=False):  # under ZeRO-3 "gather", the whole policy is on each GPU while it samples
            with (contextlib.nullcontext() if synced else policy.gathered()):
                return generate(policy.module, tok, prompts, pcfg.max_new_tokens, pcfg.temperature, device, synced,
                                logprobs=logprobs)

        rows = prep.rows("prompt_train")
        prompt_ids = [tok(r.prompt)["input_ids"] for r in rows]
        sampler = PromptSampler(len(rows), cfg.seed + 2)
        kl_ctl = (AdaptiveKLController(pcfg.kl.init_coef, pcfg.kl.target, pcfg.kl.horizon) if pcfg.kl.adaptive
                  else FixedKLController(pcfg.kl.init_coef))

        state = resume_checkpoint(store, "ppo", {"policy": policy, "value": value}, cfg, dist)
        if state:
            kl_ctl.load_state_dict(state["kl_ctl"])
        else:
            state = {"step": 0, "reward_mean": 0.0, "reward_std": 1.0}
            if pcfg.normalize_reward:  # statistics of the RM score on SFT samples (policy == SFT now)
                ro = rollout([prompt_ids[i] for i in dist.shard(sampler.indices(0, min(4 * B, len(rows))))])
                with torch.no_grad():
                    s = rewards(reward_model, ro).float()
                if dist.world == 1:
                    state["reward_mean"], state["reward_std"] = float(s.mean()), float(s.std().clamp(min=1e-6))
                else:
                    m = dist.mean_dict({"m": s.mean(), "sq": (s * s).mean()})
                    state["reward_mean"], state["reward_std"] = m["m"], max(m["sq"] - m["m"] ** 2, 1e-12) ** 0.5

        bar = progress(pcfg.updates, "ppo", quiet or not dist.main)
        bar.update(state["step"])
        metrics: dict[str, float] = {}
        clock = StepClock()  # steady-state episodes/s and its split, for the result (first 2 updates: warm-up)
        while state["step"] < pcfg.updates:
            update = state["step"]
            t0 = Timer()
            # 1. rollout
            idx = dist.shard(sampler.indices(update * B, B))  # this rank's prompts
            ro = rollout([prompt_ids[i] for i in idx], logprobs=pcfg.logprobs_from_generation)
            t_gen = t0()
            mask = ro.response_mask.float()  # (B, R)

            # 2. score (no grad): old log pi, log pi_ref, V, RM score
            with torch.no_grad():
                old_lp = ro.logprobs if ro.logprobs is not None else response_logprobs(policy, ro, pcfg.temperature)  # (B, R)
                ref_lp = response_logprobs(ref, ro, pcfg.temperature)  # (B, R)
                old_v = response_values(value.module, ro)  # (B, R)
                raw = rewards(reward_model, ro)  # (B,)
            score = (raw - state["reward_mean"]) / state["reward_std"]
            if pcfg.reward_clip:
                score = score.clamp(-pcfg.reward_clip, pcfg.reward_clip)
            score = score - pcfg.missing_eos_penalty * (~ro.has_eos).float()
            t_score = t0() - t_gen

            # 3. advantages
            rew, kl = shaped_rewards(score, old_lp, ref_lp, mask, kl_ctl.value, pcfg.kl.estimator)  # (B, R)
            adv, ret = gae(rew, old_v, mask, pcfg.gamma, pcfg.lam)
            if pcfg.whiten_advantages:
                adv = whiten_global(adv, mask, dist)

            # 4. optimise
            stats: dict[str, list[float]] = {k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "entropy", "vf_clipfrac")}
            b, b_mb = B // dist.world, mb // dist.world  # this rank's share of the batch and minibatch
            for _ in range(pcfg.ppo_epochs):
                perm = torch.randperm(b)
                for s in range(0, b, b_mb):
                    j = perm[s:s + b_mb]
                    sub, m = ro.select(j), mask[j]
                    lp, ent = response_logprobs(policy, sub, pcfg.temperature, with_entropy=True)
                    pg_loss, pst = ppo_policy_loss(lp, old_lp[j], adv[j], m, pcfg.clip_eps)
                    policy.step(pg_loss)
                    v = response_values(value.module, sub)
                    vf_loss, vst = ppo_value_loss(v, old_v[j], ret[j], m, pcfg.value_clip_eps)
                    value.step(vf_loss)
                    for k, val in (("pg_loss", pg_loss), ("vf_loss", vf_loss), ("clipfrac", pst["clipfrac"]),
                                   ("approx_kl", pst["approx_kl"]), ("entropy", masked_mean(ent.detach(), m)),
                                   ("vf_clipfrac", vst["vf_clipfrac"])):
                        stats[k].append(float(val.detach()) if torch.is_tensor(val) else float(val))
            t_train = t0() - t_gen - t_score

            # 5. log / checkpoint
            seq_kl = dist.mean(float((kl * mask).sum(1).mean()))  # the same beta on every rank
            beta = kl_ctl.value
            kl_ctl.update(seq_kl, B)
            state["step"] += 1
            n_tok = float(mask.sum())
            metrics = dist.mean_dict({
                "ppo/reward": float(raw.mean()), "ppo/score": float(score.mean()), "ppo/kl": seq_kl, "ppo/beta": beta,
                "ppo/response_length": float(mask.sum(1).mean()), "ppo/no_eos_rate": float((~ro.has_eos).float().mean()),
                "ppo/return": float(masked_mean(ret, mask)), **{f"ppo/{k}": sum(v) / len(v) for k, v in stats.items()},
                "perf/episodes_per_s": B / t0(), "perf/gen_tokens_per_s": n_tok * dist.world / max(t_gen, 1e-9),
                "perf/gen_s": t_gen, "perf/score_s": t_score, "perf/train_s": t_train,
            })
            if dist.main and (update % pcfg.gold_log_every == 0 or state["step"] == pcfg.updates):  # rank 0's rollouts
                golds = [gold_score(rows[i].prompt, t) for i, t in zip(idx, decode_responses(tok, ro))]
                if all(g is not None for g in golds):
                    metrics["ppo/gold_score"] = sum(golds) / len(golds)
            tracker.log_metrics(metrics, step=state["step"])
            bar.update(1)
            bar.set_postfix(rm=f"{metrics['ppo/reward']:.2f}", kl=f"{seq_kl:.2f}", beta=f"{beta:.3f}",
                            gold=f"{metrics.get('ppo/gold_score', float('nan')):.2f}")
            if state["step"] % pcfg.checkpoint_every == 0:
                state["kl_ctl"] = kl_ctl.state_dict()
                save_checkpoint(store, "ppo", state["step"], {"policy": policy, "value": value}, state, cfg, dist)
                tracker.flush()  # metrics up to a checkpoint survive a crash, like the weights
            clock.tick(B, gen=t_gen, score=t_score, train=t_train)
            maybe_inject_fault(state["step"], "ppo")
        bar.close()

        model_uri = save_trained(policy, tok, store, "ppo/model", tracker, "policy")
        result = {"wall_s": timer(), "tracking_s": tracker.seconds, "updates": state["step"], "resumed_from": state.get("resumed_from"), "final_beta": kl_ctl.value, "processes": dist.world,
                  "episodes_per_s": clock.rate(), "throughput": clock.summary("episodes"),
                  "last_metrics": metrics, "model_uri": model_uri,
                  "mlflow_run_id": tracker.run_id}
    if dist.main:
        write_result(store, "ppo", result)
    return result
