"""End to end: every stage through the CLI, on the built-in task and on user data in
each supported format, with a tiny model built from a config."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from rlhf.cli import main

STAGES = ["prep", "sft", "reward", "ppo", "eval"]
TINY = ["--preset", "tiny", "--set", "num_threads=1"]
SUMMARY_KEYS = [
    "rm/accuracy", "eval/win_rate_vs_sft", "eval/decisive_win_rate_vs_sft", "eval/tie_rate_vs_sft",
    "eval/gold_score_sft", "eval/gold_score_policy", "eval/gold_delta", "eval/gold_delta_ci95",
    "eval/kl_vs_sft", "eval/alignment_tax", "eval/alignment_tax_rel", "eval/judge", "eval/judge_delta",
    "eval/decisive_win_rate_lower_vs_sft", "eval/rm_decisive_win_rate_vs_sft", "ppo/selected_update", "wall_s",
]


def run_all(out: Path, extra: list[str] = ()) -> dict:
    for stage in STAGES:
        assert main(["stage", stage, *TINY, *extra, "--output", str(out), "--quiet"]) == 0, stage
    return json.loads((out / "summary.json").read_text())


def test_builtin_task_end_to_end(tmp_path):
    summary = run_all(tmp_path)
    for key in SUMMARY_KEYS:
        assert key in summary, key
    assert set(summary["wall_s"]) == {*STAGES, "total"}
    lo, hi = summary["eval/gold_delta_ci95"]
    assert lo <= summary["eval/gold_delta"] <= hi
    assert 0.0 <= summary["eval/tie_rate_vs_sft"] <= 1.0
    # artifacts are committed, and each training stage changed the weights it started from
    for key in ("prep", "sft/model", "reward/model", "ppo/model"):
        assert (tmp_path / key / "_COMMITTED").is_file(), key
    sft = load_file(str(tmp_path / "sft/model/model.safetensors"))
    pol = load_file(str(tmp_path / "ppo/model/model.safetensors"))
    assert any(not torch.equal(sft[k], pol[k]) for k in sft)
    assert (tmp_path / "prep/tokenizer/tokenizer.json").is_file()
    # one MLflow run per stage, with params and step metrics
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["rlhf"], output_format="list")
    assert sorted(r.data.tags["rlhf.stage"] for r in runs) == sorted(STAGES)
    ppo = next(r for r in runs if r.data.tags["rlhf.stage"] == "ppo")
    for m in ("ppo/reward", "ppo/kl", "ppo/beta", "ppo/entropy", "ppo/clipfrac", "ppo/approx_kl",
              "ppo/vf_loss", "ppo/response_length", "ppo/gold_score", "ppo/ptx_loss", "ppo/judge_score",
              "ppo/judge_proxy", "ppo/judge_sqrt_kl", "ppo/selected_update", "perf/episodes_per_s",
              "perf/gen_tokens_per_s", "perf/gen_s", "perf/train_s"):
        assert m in ppo.data.metrics, m
    assert ppo.data.params["ppo.kl.init_coef"] == "0.1"
    assert len(mlflow.MlflowClient().get_metric_history(ppo.info.run_id, "ppo/kl")) == 3
    # a user loads the logged models with plain MLflow: the policy generates, the reward model scores
    policy_uri = json.loads((tmp_path / "ppo/result.json").read_text())["model_uri"]
    reward_uri = json.loads((tmp_path / "reward/result.json").read_text())["model_uri"]
    gen = mlflow.transformers.load_model(policy_uri)
    text = gen("sort: 3 1 2", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("sort: 3 1 2") and len(text) > len("sort: 3 1 2")
    scorer = mlflow.transformers.load_model(reward_uri)
    scores = scorer(["sort: 3 1 2 1 2 3", "reverse: a b b a"], function_to_apply="none")
    assert len(scores) == 2 and all(isinstance(s["score"], float) for s in scores)


def _write(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


QA = [("What is the capital of France?", "Paris."), ("Name a primary colour.", "Red."),
      ("What is 2 + 2?", "4."), ("Say hello.", "Hello!"), ("Which planet is red?", "Mars."),
      ("Opposite of hot?", "Cold."), ("How many legs has a cat?", "Four."), ("Spell cat.", "C-A-T.")]
BAD = ["I do not know.", "Bananas are yellow and also here is a long unrelated ramble."]


def user_datasets(folder: Path, style: str) -> list[str]:
    sft, pref, prompts = [], [], []
    for i in range(40):
        q, a = QA[i % len(QA)]
        q = f"{q} (case {i})"
        bad = BAD[i % 2]
        if style == "plain":
            sft.append({"prompt": q, "completion": " " + a})
            pref.append({"prompt": q, "chosen": " " + a, "rejected": " " + bad})
            prompts.append({"prompt": q})
        elif style == "conversational":
            msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]
            sft.append({"messages": msgs + [{"role": "assistant", "content": a}]})
            pref.append({"chosen": msgs + [{"role": "assistant", "content": a}],
                         "rejected": msgs + [{"role": "assistant", "content": bad}]})
            prompts.append({"messages": msgs})
        else:  # Anthropic HH: implicit prompt
            sft.append({"prompt": f"\n\nHuman: {q}\n\nAssistant:", "completion": " " + a})
            pref.append({"chosen": f"\n\nHuman: {q}\n\nAssistant: {a}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {bad}"})
            prompts.append({"prompt": f"\n\nHuman: {q}\n\nAssistant:"})
    return [f"data.sft_path={_write(folder / 'sft.jsonl', sft)}",
            f"data.preference_path={_write(folder / 'pref.jsonl', pref)}",
            f"data.prompt_path={_write(folder / 'prompts.jsonl', prompts)}"]


@pytest.mark.parametrize("style", ["plain", "conversational", "hh"])
def test_user_data_end_to_end(tmp_path, style):
    sets = user_datasets(tmp_path, style)
    extra = [x for s in sets for x in ("--set", s)] + ["--set", "data.eval_fraction=0.25",
                                                       "--set", "data.max_total_tokens=400",
                                                       "--set", "data.max_prompt_tokens=300"]
    summary = run_all(tmp_path / "out", extra)
    report = json.loads((tmp_path / "out/prep/report.json").read_text())
    assert report["tokenizer"]["trained"] and not report["builtin_task"]
    assert report["reports"]["sft"]["accepted"] == 40
    # no gold judge for user data: gold metrics are absent; win rates come from the held-out reward model,
    # trained on a share of the comparisons the PPO reward model never saw
    assert summary["eval/gold_delta"] is None
    assert summary["eval/judge"] == "heldout_reward_model" and summary["ppo/judge"] == "heldout_reward_model"
    assert 0.0 <= summary["rm/judge_accuracy"] <= 1.0
    result = json.loads((tmp_path / "out/reward/result.json").read_text())
    assert result["judge_pairs"] > 0 and result["proxy_pairs"] > result["judge_pairs"]
    assert (tmp_path / "out/reward/judge_model/_COMMITTED").is_file()
    assert 0.0 <= summary["eval/win_rate_vs_sft"] <= 1.0
    assert (tmp_path / "out/ppo/model/_COMMITTED").is_file()


def test_lora_in_every_stage_registers_merged_models_plain_mlflow_loads(tmp_path):
    """`model.lora.enabled`: SFT, the reward model, the PPO policy and its value model
    train adapters; every saved and registered model has them merged, so plain
    transformers and plain MLflow load it."""
    import os
    import subprocess
    import sys

    name = "lora-e2e"
    env = {**os.environ, "RLHF_HOME": str(tmp_path), "RLHF_QUIET": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run([sys.executable, "-m", "rlhf.cli", "run", *TINY, "--set", "model.lora.enabled=true",
                        "--set", "model.lora.r=4", "--set", "gate.min_decisive_win_rate=0.0", "--set",
                        f"tracking.registered_model={name}", "--output", str(tmp_path / "run")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for key in ("sft/model", "reward/model", "ppo/model"):
        weights = load_file(str(tmp_path / "run" / key / "model.safetensors"))
        assert not any("lora" in k for k in weights), f"{key}: adapters must be merged before saving"
        assert any(k.endswith("q_proj.weight") for k in weights)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    aliases = mlflow.MlflowClient().get_registered_model(f"{name}-policy").aliases
    assert str(aliases.get("champion")) == "1", aliases
    gen = mlflow.transformers.load_model(f"models:/{name}-policy@champion")
    assert gen("sort: 3 1 2", max_new_tokens=4, do_sample=False)[0]["generated_text"].startswith("sort: 3 1 2")
    scorer = mlflow.transformers.load_model(f"models:/{name}-reward/1")
    assert isinstance(scorer(["sort: 3 1 2 1 2 3"], function_to_apply="none")[0]["score"], float)
    sft = mlflow.transformers.load_model(f"models:/{name}-sft/1")
    assert not any("lora" in k for k in sft.model.state_dict())


def test_stages_take_swapped_adapters(tmp_path):
    """A stage is run(ctx): swap the context's tracker for the in-memory one and it
    records what the stage gave it."""
    from dataclasses import replace

    from rlhf.adapters.settings import Settings
    from rlhf.adapters.store import LocalStore
    from rlhf.adapters.tracking import NullTracker
    from rlhf.config import load_config
    from rlhf.dispatch import StageRequest, build_context
    from rlhf.stages import prep, sft
    from rlhf.stages.table import STAGES

    cfg = load_config("tiny", overrides=["num_threads=1"])
    settings = Settings.from_env({"RLHF_HOME": str(tmp_path)})
    store, tracker = LocalStore(tmp_path, settings), NullTracker()

    def ctx(name):
        c = build_context(STAGES[name], StageRequest(name, str(tmp_path), str(tmp_path), tracking=False), cfg,
                          store, settings)
        return replace(c, tracker=tracker)

    prep.run(ctx("prep"))
    result = sft.run(ctx("sft")).values
    assert tracker.params["sft"]["batch_size"] == cfg.sft.batch_size
    losses = [m["sft/loss"] for _, m in tracker.metrics if "sft/loss" in m]
    assert len(losses) == result["steps"]
    logged = Path(tracker.models["policy"])  # the committed sft/model, as a reader's view of it
    assert logged.parent == tmp_path / "sft" and logged.name.startswith(".model.view-")
    assert (logged / "model.safetensors").read_bytes() == (tmp_path / "sft/model/model.safetensors").read_bytes()
