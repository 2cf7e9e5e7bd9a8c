"""Evaluation: the PPO policy against SFT on held-out prompts.

Both models are decoded the same way: the same prompts, the same decoding
(`eval.temperature`; sampling with top_k=0, top_p=1, or greedy at 0), and the same
random seed before each batch, so the two samples of a prompt differ only because
the models differ.

Reported (summary.json and MLflow):
  - reward-model score of each model; gold score of each (when the task has a judge)
  - win rate of policy vs SFT by gold (ties count half), decisive win rate (share of
    non-tied comparisons the policy wins), tie rate; by RM score when there is no judge
  - gold delta (policy - SFT) with a 95% paired bootstrap interval
  - KL(policy || SFT): mean over policy samples of sum_t log pi(y_t) - log pi_SFT(y_t)
  - alignment tax: policy minus SFT loss (response-token NLL) on held-out demonstrations
  - response lengths, and a samples table (prompt, SFT answer, policy answer, scores)

  - champion/challenger: the registered `@champion` policy on the same prompts, and the
    promotion gate's verdict (`gate/passed`, `gate/reasons`; see stages/gate.py)
  - all of it as one Markdown page, `eval/report.md` (`rlhf.stages.report`): the eval
    step's `dsl.Markdown` in the Kubeflow UI, and `report.md` in the MLflow eval run

Gold scores come from the run's judge; without one, comparisons use reward-model
scores. The dispatcher writes the run's summary.json from this stage's result.

Steps: 1. load  2. generate + score  3. compare  4. alignment tax  5. champion  6. log, report
"""

from __future__ import annotations

import numpy as np
import torch

from rlhf.adapters.registry import CHAMPION, model_name
from rlhf.data.prepared import PrepData
from rlhf.math import sequence_kl
from rlhf.models import load_causal_lm, load_reward_model, load_tokenizer
from rlhf.models.chat import ChatFormat, chat_format
from rlhf.models.rollout import decode_responses, response_logprobs, rewards
from rlhf.stages.challenge import champion_comparison, compare, decode_same_way, eval_rows
from rlhf.stages.contract import StageContext, StageResult
from rlhf.stages.gate import gate_decision
from rlhf.stages.judging import IndependentJudge, independent_judge
from rlhf.stages.report import write_report
from rlhf.stages.scoring import encode_demonstrations, heldout_loss
from rlhf.train.distributed import setup_one_process
from rlhf.train.trainable import DTYPES, resolve_precision
from rlhf.train.progress import Timer


def bootstrap_ci(x: np.ndarray, n: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n, len(x)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


@torch.no_grad()
def sample_both(sft, policy, rm, fmt: ChatFormat, rows: list, ecfg, seed: int, device) -> dict:
    """Both models' answers (same prompts, decoding and seeds), RM scores, lengths, and
    the policy samples' KL to SFT."""
    out = {"sft": {"text": [], "rm": [], "len": []}, "policy": {"text": [], "rm": [], "len": [], "kl": []}}
    runs = {"sft": decode_same_way(sft, fmt, rows, ecfg, seed, device),
            "policy": decode_same_way(policy, fmt, rows, ecfg, seed, device)}
    for _ in range(0, len(rows), ecfg.batch_size):
        for name in ("sft", "policy"):  # sft first, then the policy, batch by batch
            ro = next(runs[name])
            out[name]["text"] += decode_responses(fmt.tok, ro)
            out[name]["rm"] += rewards(rm, ro).tolist()
            out[name]["len"] += ro.response_mask.sum(1).tolist()
            if name == "policy":
                kl = sequence_kl(response_logprobs(policy, ro), response_logprobs(sft, ro), ro.response_mask.float())
                out[name]["kl"] += kl.tolist()
    return out


def comparison_summary(rows: list, out: dict, judge: IndependentJudge, ecfg, seed: int,
                       confidence: float = 0.95) -> tuple[dict, dict]:
    """Win rates by the independent judge (`eval/...`), and by the proxy reward model side
    by side (`eval/rm_...`); gold keys when the judge is gold. Returns the summary and
    the judge's scores."""
    scores = {k: judge.scores(rows, out[k]["text"]) for k in out}
    j_pol, j_sft = scores["policy"], scores["sft"]
    rm_pol, rm_sft = np.array(out["policy"]["rm"]), np.array(out["sft"]["rm"])
    delta = j_pol - j_sft
    summary: dict = {
        "eval/prompts": len(rows), "eval/decoding": f"temperature={ecfg.temperature}" + (
            ", top_k=0, top_p=1, same seed for both" if ecfg.temperature > 0 else " (greedy)"),
        "eval/judge": judge.name,
        "eval/reward_score_sft": float(rm_sft.mean()), "eval/reward_score_policy": float(rm_pol.mean()),
        "eval/response_length_sft": float(np.mean(out["sft"]["len"])),
        "eval/response_length_policy": float(np.mean(out["policy"]["len"])),
        "eval/kl_vs_sft": float(np.mean(out["policy"]["kl"])),
        **{f"eval/rm_{k}_vs_sft": v for k, v in compare(rm_pol, rm_sft, confidence).items()},
        "eval/judge_score_sft": float(j_sft.mean()), "eval/judge_score_policy": float(j_pol.mean()),
        "eval/judge_delta": float(delta.mean()),
        "eval/judge_delta_ci95": list(bootstrap_ci(delta, ecfg.bootstrap, seed, confidence)),
        **{f"eval/{k}_vs_sft": v for k, v in compare(j_pol, j_sft, confidence).items()},
    }
    if judge.name == "gold":
        summary.update({
            "eval/gold_score_sft": float(j_sft.mean()), "eval/gold_score_policy": float(j_pol.mean()),
            "eval/exact_sft": float((j_sft == 1.0).mean()), "eval/exact_policy": float((j_pol == 1.0).mean()),
            "eval/gold_delta": summary["eval/judge_delta"], "eval/gold_delta_ci95": summary["eval/judge_delta_ci95"],
        })
    else:
        summary.update({"eval/gold_score_sft": None, "eval/gold_score_policy": None, "eval/gold_delta": None,
                        "eval/gold_delta_ci95": None})
    return summary, {k: v.tolist() for k, v in scores.items()}


def nonfinite_weights(model) -> list[str]:
    """Names of the model's weight tensors that hold NaN or infinite values."""
    return [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]


def refuse_diverged(ctx: StageContext, what: list[str], gate, timer) -> StageResult:
    """A diverged policy is not sampled (it cannot be): its KL and win rates are NaN, and
    the gate refuses it with the reason (gate_decision reads `eval/policy_nonfinite`)."""
    summary = {"eval/policy_nonfinite": float(len(what)), "eval/policy_nonfinite_first": what[0],
               "eval/kl_vs_sft": float("nan"), "eval/decisive_win_rate_vs_sft": float("nan"),
               "eval/decisive_win_rate_lower_vs_sft": float("nan")}
    summary["gate/passed"], summary["gate/reasons"] = gate_decision(summary, gate)
    ctx.tracker.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float))}, step=0)
    summary["eval/wall_s"] = timer()
    write_report(ctx, summary, [])
    return StageResult({**summary, "eval/mlflow_run_id": ctx.tracker.run_id, "tracking_s": ctx.tracker.seconds})


def run(ctx: StageContext) -> StageResult:
    timer, ecfg, gate = Timer(), ctx.config, ctx.section("gate")
    device = setup_one_process(ctx.runtime)
    prep = PrepData(ctx.prep_store)
    with ctx.tracker.stage_run(ctx.name, ctx.params, store=ctx.store):
        # 1. load
        sft_dir, pol_dir = str(ctx.store.get_dir("sft/model")), str(ctx.store.get_dir("ppo/model"))
        tok = load_tokenizer(sft_dir, ctx.model)
        dtype = DTYPES[resolve_precision(ctx.runtime.precision, ctx.runtime.distributed, device)]  # three models
        sft = load_causal_lm(sft_dir, ctx.model, dtype=dtype).to(device).eval()
        policy = load_causal_lm(pol_dir, ctx.model, dtype=dtype).to(device).eval()
        rm = load_reward_model(str(ctx.store.get_dir("reward/model")), ctx.model, tok.pad_token_id,
                               dtype=dtype).to(device).eval()
        fmt = chat_format(tok, ctx.model, sft_dir)
        rows = eval_rows(prep, ecfg)
        prompts = [r.prompt for r in rows]

        # 2. generate + score, 3. compare by the independent judge (and by the proxy RM beside it)
        diverged = nonfinite_weights(policy)
        try:
            out = None if diverged else sample_both(sft, policy, rm, fmt, rows, ecfg, ctx.seed, device)
        except RuntimeError as e:  # finite weights whose activations overflow: sampling meets NaN/inf
            if "probability tensor contains" not in str(e):  # torch.multinomial on NaN/inf; nothing else
                raise
            diverged = [f"next-token probabilities ({e})"]
        if diverged:
            return refuse_diverged(ctx, diverged, gate, timer)
        judge = independent_judge(ctx, fmt, rows, device, dtype, proxy=rm)
        summary, golds = comparison_summary(rows, out, judge, ecfg, ctx.seed, gate.confidence)

        # 4. alignment tax: held-out demonstration loss, policy minus SFT
        held = encode_demonstrations(fmt, prep.rows("sft_eval"))
        loss_sft = heldout_loss(sft, held, tok.pad_token_id, device)
        loss_pol = heldout_loss(policy, held, tok.pad_token_id, device)
        summary.update({"eval/heldout_loss_sft": loss_sft, "eval/heldout_loss_policy": loss_pol,
                        "eval/alignment_tax": loss_pol - loss_sft,
                        "eval/alignment_tax_rel": (loss_pol - loss_sft) / loss_sft if loss_sft > 0 else None})

        # 5. champion/challenger: the registered champion answers the same prompts; the gate
        champ = ctx.tracker.load_registered(model_name(ctx.registered_model, "policy"), CHAMPION)
        if champ is not None:
            summary.update(champion_comparison(ecfg, gate.champion_prompts, ctx.seed, champ, rows,
                                               out["policy"]["text"], rm, fmt, device, judge,
                                               load=ctx.tracker.load_components, confidence=gate.confidence))
        summary["gate/passed"], summary["gate/reasons"] = gate_decision(summary, gate)

        # 6. log: the samples table and every number; the report
        columns = (prompts, out["sft"]["text"], out["policy"]["text"], out["sft"]["rm"], out["policy"]["rm"],
                   golds["sft"], golds["policy"])
        table = [dict(zip(("prompt", "sft", "policy", "rm_sft", "rm_policy", "judge_sft", "judge_policy"), row))
                 for row in zip(*columns)]
        ctx.tracker.log_table(table[: ecfg.table_rows], "eval_samples.json")
        ctx.tracker.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float))}, step=0)
        summary["eval/wall_s"] = timer()
        ctx.store.write_json("eval/samples.json", table[: ecfg.table_rows])
        write_report(ctx, summary, table[: ecfg.table_rows])
    return StageResult({**summary, "eval/mlflow_run_id": ctx.tracker.run_id, "tracking_s": ctx.tracker.seconds})
