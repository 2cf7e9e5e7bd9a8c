"""Over-optimisation control in PPO: every `ppo.judge_every` updates (and before the
first) the policy samples a fixed prompt set, which the run's independent judge scores
(`rlhf.stages.judging`: gold, or the reward model trained on comparisons the PPO reward
model never saw), beside the proxy score and sqrt(KL) of the same samples. The
best-judged weights are kept (`ppo.select: judge`), and PPO stops early when the judge
has stayed below its best for `ppo.patience` evaluations while the proxy rose above its
value there (Gao et al. 2022: proxy up, gold down)."""

from __future__ import annotations

import torch

from rlhf.math import sequence_kl
from rlhf.models.rollout import decode_responses, response_logprobs, rewards
from rlhf.stages.contract import StageContext
from rlhf.stages.judging import IndependentJudge, independent_judge
from rlhf.stages.ppo_models import PPOModels, forward_batch_size
from rlhf.train.distributed import Dist
from rlhf.train.schedule import epoch_order


@torch.no_grad()
def judge_policy(models: PPOModels, judge: IndependentJudge, rows: list, prompt_ids: list[list[int]], pcfg,
                 dist: Dist, seed: int) -> dict[str, float]:
    """The policy's samples on the fixed judge prompt set (the same sampling seed every
    time, the training RNG untouched): mean judge score, proxy (PPO reward model) score
    and sqrt of the mean sequence KL to SFT, over every rank's share."""
    mine = dist.shard(list(range(len(rows))))
    devices = [dist.device] if dist.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with models.policy.autocast():
            ro = models.rollout([prompt_ids[i] for i in mine], pcfg.max_new_tokens, pcfg.temperature, logprobs=True,
                                batch_size=pcfg.generation_batch_size)
            proxy, kl = [], []
            for part in ro.parts(forward_batch_size(pcfg, dist)):
                old = part.logprobs if part.logprobs is not None else response_logprobs(
                    models.policy, part, pcfg.temperature)
                kl.append(sequence_kl(old, models.reference_logprobs(part, pcfg.temperature),
                                      part.response_mask.float()))
                proxy.append(rewards(models.reward, part))
    scores = judge.scores([rows[i] for i in mine], decode_responses(models.tok, ro))
    tot = dist.sum_dict({"judge": float(scores.sum()), "judge_sq": float((scores ** 2).sum()),
                         "proxy": float(torch.cat(proxy).float().sum()), "kl": float(torch.cat(kl).float().sum()),
                         "n": float(len(mine))})
    n, mean = tot["n"], tot["judge"] / tot["n"]
    var = max(tot["judge_sq"] / n - mean * mean, 0.0) * n / max(n - 1, 1)
    return {"ppo/judge_score": mean, "ppo/judge_se": (var / n) ** 0.5, "ppo/judge_proxy": tot["proxy"] / n,
            "ppo/judge_sqrt_kl": max(tot["kl"] / n, 0.0) ** 0.5}


class Selection:
    """Over-optimisation control: the independent judge's evaluations of the policy on a
    fixed prompt set, the best-judged weights (`select: judge`), and the early stop."""

    def __init__(self, ctx: StageContext, models: PPOModels, rows: list, prompt_ids: list[list[int]], dist: Dist):
        self.pcfg, self.models, self.dist, self.seed = ctx.config, models, dist, ctx.seed + 6
        idx = epoch_order(len(rows), ctx.seed + 5, 0)[:self.pcfg.judge_prompts]
        self.rows, self.ids = [rows[i] for i in idx], [prompt_ids[i] for i in idx]
        self.judge = independent_judge(ctx, models.fmt, self.rows, dist.device, proxy=models.reward)
        self.best = models.policy.state_dict() if self.pcfg.select == "judge" else {}  # the best-judged weights

    @staticmethod
    def initial_state() -> dict:
        return {"best": float("-inf"), "best_update": 0, "best_proxy": None, "bad": 0, "curve": []}

    def __call__(self, state: dict, step: int) -> dict[str, float]:
        """Judge the policy now (at update 0: SFT, the baseline); keep its weights when they
        are the best of the updates so far. Sets `stopped` when the judge has stayed below
        its best by more than a standard error of its mean for `patience` evaluations in a
        row while the proxy scored above its value at the best (reward hacking; a plateau
        within the judge's noise does not count)."""
        m = judge_policy(self.models, self.judge, self.rows, self.ids, self.pcfg, self.dist, self.seed)
        j = state["judge"]
        score, proxy = m["ppo/judge_score"], m["ppo/judge_proxy"]
        j["curve"].append([step, score, proxy, m["ppo/judge_sqrt_kl"]])
        if step == 0:  # SFT, before any update: the baseline, not a candidate
            return m
        if score > j["best"]:
            j.update(best=score, best_update=step, best_proxy=proxy, bad=0)
            if self.best:
                self.best.clear()
                self.best.update(self.models.policy.state_dict())
        else:  # fallen: below the best by more than this evaluation's standard error (not a noisy plateau)
            fallen = score < j["best"] - m.get("ppo/judge_se", 0.0)
            j["bad"] = j["bad"] + 1 if fallen and proxy > j["best_proxy"] else 0
            if self.pcfg.patience and j["bad"] >= self.pcfg.patience:
                state["stopped"] = True
        return {**m, "ppo/judge_best_update": float(j["best_update"])}

    def result(self, state: dict, selected: int) -> dict:
        j = state["judge"]
        return {"select": self.pcfg.select, "selected_update": selected, "judge": self.judge.name,
                "judge_best_score": j["best"], "judge_curve": j["curve"], "early_stopped": bool(state["stopped"])}

    def finish(self, state: dict, step: int, tracker) -> int:
        """Put the selected weights in the policy; logs and returns their update."""
        selected = state["judge"]["best_update"] if self.best else step
        if selected != step:
            self.models.policy.load_state_dict(self.best)
        tracker.log_metrics({"ppo/selected_update": float(selected)}, step=step)
        return selected


def gold_of_rollouts(ctx: StageContext, models: PPOModels, rollout, rows: list, idx: list[int]) -> dict:
    """Monitoring: the task judge's mean score of this rank's rollouts (when it scores all)."""
    texts = decode_responses(models.tok, rollout)
    golds = [ctx.judge.score(rows[i].prompt, text) for i, text in zip(idx, texts)]
    return {"ppo/gold_score": sum(golds) / len(golds)} if all(g is not None for g in golds) else {}
