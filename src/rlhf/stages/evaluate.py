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
    promotion gate's verdict (`gate/passed`, `gate/reasons`; see stages/promote.py)

Steps: 1. load  2. generate  3. score  4. compare  5. champion  6. summary + log
"""

from __future__ import annotations


import numpy as np
import torch

from rlhf.config import PipelineConfig
from rlhf.data.tasks import gold_score
from rlhf.models import load_causal_lm, load_reward_model, load_tokenizer
from rlhf.models import sequence_scores
from rlhf.adapters.registry import CHAMPION, model_name
from rlhf.stages.common import PrepData, Timer, pad_right, seed_everything, setup_torch, tokenize_pair, write_result
from rlhf.stages.promote import gate_decision
from rlhf.stages.rollout import decode_responses, generate, response_logprobs, rewards
from rlhf.stages.sft import encode, heldout_loss


def bootstrap_ci(x: np.ndarray, n: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n, len(x)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Policy (a) vs SFT (b): win rate with ties as half, decisive win rate, tie rate."""
    wins, ties = float((a > b).mean()), float((a == b).mean())
    decisive = (a != b).sum()
    return {"win_rate": wins + 0.5 * ties, "tie_rate": ties,
            "decisive_win_rate": float((a > b).sum() / decisive) if decisive else 0.5}


@torch.no_grad()
def score_texts(rm, tok, prompts: list[str], texts: list[str], device, batch_size: int = 128) -> list[float]:
    """Reward-model score of prompt + response text (retokenised with the RM's tokenizer)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        seqs = [tokenize_pair(tok, p, t)[0] for p, t in zip(prompts[i:i + batch_size], texts[i:i + batch_size])]
        ids, attn = pad_right(seqs, tok.pad_token_id)
        out += sequence_scores(rm, ids.to(device), attn.to(device)).tolist()
    return out


@torch.no_grad()
def champion_comparison(cfg: PipelineConfig, champ: dict, prompts: list[str], policy_texts: list[str],
                        rm, tok, device, load=None) -> dict:
    """The new policy against the current champion on the first `gate.champion_prompts`
    held-out prompts, decoded as in eval. The champion keeps its own tokenizer (it may
    come from another run). Compared by gold when the task has a judge. Otherwise by
    reward models: this run's favours the policy trained against it, so the champion's
    own reward model (its lineage tag, loaded with `load`) judges too, and the policy's
    win rate is the lower of the two."""
    ecfg, n = cfg.eval, min(cfg.gate.champion_prompts, len(prompts))
    ctok, cmodel = champ["tokenizer"], champ["model"].to(device).eval()
    if ctok.pad_token is None:
        ctok.pad_token = ctok.eos_token
    texts = []
    for b, start in enumerate(range(0, n, ecfg.batch_size)):  # eval's batches and seeds, so an identical
        ids = [ctok(p)["input_ids"] for p in prompts[start:start + ecfg.batch_size]]  # model gives identical text
        seed_everything(cfg.seed * 7919 + b)
        texts += decode_responses(ctok, generate(cmodel, ctok, ids, ecfg.max_new_tokens, ecfg.temperature, device))
    ps, mine, texts = prompts[:n], policy_texts[:n], texts[:n]
    gold_mine, gold_champ = [gold_score(p, t) for p, t in zip(ps, mine)], [gold_score(p, t) for p, t in zip(ps, texts)]
    judges = []  # (name, policy scores, champion scores)
    if all(g is not None for g in gold_mine + gold_champ):
        judges.append(("gold", np.array(gold_mine), np.array(gold_champ)))
    else:
        judges.append(("reward_model", np.array(score_texts(rm, tok, ps, mine, device)),
                       np.array(score_texts(rm, tok, ps, texts, device))))
        crm_uri = champ.get("tags", {}).get("rlhf.reward_model_uri")
        if crm_uri and load is not None:
            crm = load(crm_uri)
            m, t = crm["model"].to(device).eval(), crm["tokenizer"]
            if t.pad_token is None:
                t.pad_token = t.eos_token
            judges.append(("champion_reward_model", np.array(score_texts(m, t, ps, mine, device)),
                           np.array(score_texts(m, t, ps, texts, device))))
    out = {"champion/version": champ["version"], "champion/prompts": n,
           "champion/compared_by": "+".join(j[0] for j in judges)}
    for name, a, c in judges:
        cmp = compare(a, c)
        out.update({f"champion/{name}_score_champion": float(c.mean()), f"champion/{name}_score_policy": float(a.mean()),
                    f"champion/{name}_win_rate": cmp["win_rate"], f"champion/{name}_tie_rate": cmp["tie_rate"]})
    worst = min(judges, key=lambda j: compare(j[1], j[2])["win_rate"])
    cmp = compare(worst[1], worst[2])
    out.update({"champion/win_rate": cmp["win_rate"], "champion/tie_rate": cmp["tie_rate"],
                "champion/decisive_win_rate": cmp["decisive_win_rate"]})
    return out


def run(cfg: PipelineConfig, store, tracker, quiet: bool = False, prep_store=None) -> dict:
    timer = Timer()
    device = setup_torch(cfg)
    ecfg = cfg.eval
    prep = PrepData(prep_store or store)
    with tracker.stage_run("eval", cfg.model_dump(), store=store):
        # 1. load
        sft_dir, pol_dir = str(store.get_dir("sft/model")), str(store.get_dir("ppo/model"))
        tok = load_tokenizer(sft_dir, cfg.model)
        sft = load_causal_lm(sft_dir, cfg.model).to(device).eval()
        policy = load_causal_lm(pol_dir, cfg.model).to(device).eval()
        rm = load_reward_model(str(store.get_dir("reward/model")), cfg.model, tok.pad_token_id).to(device).eval()
        prompts = [r.prompt for r in prep.rows("prompt_eval")][: ecfg.num_prompts]
        prompts = [p for p in prompts for _ in range(ecfg.samples_per_prompt)]

        # 2. generate, 3. score
        out = {"sft": {"text": [], "rm": [], "len": []}, "policy": {"text": [], "rm": [], "len": [], "kl": []}}
        with torch.no_grad():
            for b, start in enumerate(range(0, len(prompts), ecfg.batch_size)):
                ids = [tok(p)["input_ids"] for p in prompts[start:start + ecfg.batch_size]]
                for name, model in (("sft", sft), ("policy", policy)):
                    seed_everything(cfg.seed * 7919 + b)  # identical randomness for both models
                    ro = generate(model, tok, ids, ecfg.max_new_tokens, ecfg.temperature, device)
                    out[name]["text"] += decode_responses(tok, ro)
                    out[name]["rm"] += rewards(rm, ro).tolist()
                    out[name]["len"] += ro.response_mask.sum(1).tolist()
                    if name == "policy":
                        m = ro.response_mask.float()
                        kl = (response_logprobs(policy, ro) - response_logprobs(sft, ro)) * m
                        out[name]["kl"] += kl.sum(1).tolist()

        # 4. compare: by gold when every prompt has a judge, else by reward-model score
        golds = {k: [gold_score(p, t) for p, t in zip(prompts, out[k]["text"])] for k in out}
        has_gold = all(g is not None for g in golds["sft"] + golds["policy"])
        rm_pol, rm_sft = np.array(out["policy"]["rm"]), np.array(out["sft"]["rm"])
        summary: dict[str, float | list | None] = {
            "eval/prompts": len(prompts), "eval/decoding": f"temperature={ecfg.temperature}" + (
                ", top_k=0, top_p=1, same seed for both" if ecfg.temperature > 0 else " (greedy)"),
            "eval/reward_score_sft": float(rm_sft.mean()), "eval/reward_score_policy": float(rm_pol.mean()),
            "eval/response_length_sft": float(np.mean(out["sft"]["len"])),
            "eval/response_length_policy": float(np.mean(out["policy"]["len"])),
            "eval/kl_vs_sft": float(np.mean(out["policy"]["kl"])),
            **{f"eval/rm_{k}_vs_sft": v for k, v in compare(rm_pol, rm_sft).items()},
        }
        if has_gold:
            g_pol, g_sft = np.array(golds["policy"]), np.array(golds["sft"])
            delta = g_pol - g_sft
            summary.update({
                "eval/gold_score_sft": float(g_sft.mean()), "eval/gold_score_policy": float(g_pol.mean()),
                "eval/exact_sft": float((g_sft == 1.0).mean()), "eval/exact_policy": float((g_pol == 1.0).mean()),
                "eval/gold_delta": float(delta.mean()),
                "eval/gold_delta_ci95": list(bootstrap_ci(delta, ecfg.bootstrap, cfg.seed)),
                **{f"eval/{k}_vs_sft": v for k, v in compare(g_pol, g_sft).items()},
            })
        else:
            summary.update({f"eval/{k}_vs_sft": summary[f"eval/rm_{k}_vs_sft"] for k in ("win_rate", "tie_rate", "decisive_win_rate")})
            summary.update({"eval/gold_score_sft": None, "eval/gold_score_policy": None, "eval/gold_delta": None,
                            "eval/gold_delta_ci95": None})
        held = encode(tok, prep.rows("sft_eval"))
        loss_sft = heldout_loss(sft, held, tok.pad_token_id, device)
        loss_pol = heldout_loss(policy, held, tok.pad_token_id, device)
        summary.update({"eval/heldout_loss_sft": loss_sft, "eval/heldout_loss_policy": loss_pol,
                        "eval/alignment_tax": loss_pol - loss_sft})

        # 5. champion/challenger: the registered champion answers the same prompts
        champ = tracker.load_registered(model_name(cfg.tracking.registered_model, "policy"), CHAMPION)
        if champ is not None:
            summary.update(champion_comparison(cfg, champ, prompts, out["policy"]["text"], rm, tok, device,
                                               load=getattr(tracker, "load_components", None)))
        summary["gate/passed"], summary["gate/reasons"] = gate_decision(summary, cfg.gate)

        # 6. summary + log
        table = [{"prompt": p, "sft": s, "policy": q, "rm_sft": rs, "rm_policy": rq,
                  "gold_sft": gs, "gold_policy": gq}
                 for p, s, q, rs, rq, gs, gq in zip(prompts, out["sft"]["text"], out["policy"]["text"],
                                                    out["sft"]["rm"], out["policy"]["rm"], golds["sft"], golds["policy"])]
        tracker.log_table(table[: ecfg.table_rows], "eval_samples.json")
        tracker.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float))}, step=0)
        summary["eval/wall_s"] = timer()
        eval_tracking_s = getattr(tracker, "seconds", 0.0)
        store.write_json("eval/samples.json", table[: ecfg.table_rows])

    # the run summary: every stage's key results and wall time
    stages = {}
    for name, where in (("prep", prep_store or store), ("sft", store), ("reward", store), ("ppo", store)):
        if where.exists(f"{name}/result.json"):
            stages[name] = where.read_json(f"{name}/result.json")
    result = {**summary, "eval/mlflow_run_id": tracker.run_id}
    write_result(store, "eval", result)
    full = {
        "rm/accuracy": stages.get("reward", {}).get("rm/accuracy"),
        "rm/label_accuracy": stages.get("reward", {}).get("rm/label_accuracy"),
        "sft/best_eval_loss": stages.get("sft", {}).get("best_eval_loss"),
        "sft/eval_curve": stages.get("sft", {}).get("eval_curve"),
        **summary,
        "wall_s": {**{k: round(v["wall_s"], 2) for k, v in stages.items()}, "eval": round(summary["eval/wall_s"], 2)},
        # of which in MLflow calls (pipeline overhead inside the stages; benchmarks/overhead.py)
        "tracking_s": {**{k: round(v.get("tracking_s", 0.0), 2) for k, v in stages.items()},
                       "eval": round(eval_tracking_s, 2)},
        "config": cfg.model_dump(),
    }
    full["wall_s"]["total"] = round(sum(full["wall_s"].values()), 2)
    store.write_json("summary.json", full)
    return result
