"""Our side of the CPU throughput benchmark: one of our training stages per process, on the fixed workload.

    .venv/bin/python benchmarks/ours_side.py {sft|rm|ppo} [--steps N] [--set KEY=VALUE ...] [--json FILE]

It runs the workload of ../shared/benchmarks/WORKLOAD.md (`benchmarks/workload`) through our real
stages (`rlhf.stages.sft/reward/ppo.run`, the code a pipeline step runs) and prints one JSON line
with the same keys as `trl_side.py`, so `run.py` can set the two side by side.

How the workload reaches the stages:
- A local store in a temp folder holds what the earlier steps would have committed: `prep/` (the
  workload's rows as our JSONL, its exact tokenizer) and, for rm/ppo, the input models: for rm a
  `LlamaForSequenceClassification` seeded 42 as `sft/model` (the stage keeps its score head, so it
  starts from TRL's very weights); for ppo a causal LM seeded 42 as `sft/model` and a classifier
  seeded 43 as `reward/model` (the value model starts as its copy, as the page says).
- The config is the page's: seed 42 (SFT's model is built seeded 42, as TRL's), 2 threads, fp32,
  batch 16, the page's learning rates, linear decay to 0 with no warm-up, clipping 1.0 (PPO: none,
  weight decay 0, one AdamW step per mini-batch for policy and value at 1e-5), no checkpoints or
  evaluations inside the timed steps (the stage's own evaluation before step 1 and after the last
  step falls outside the window). PPO runs without its judge evaluations (`ppo.judge_every` empty,
  `ppo.select: last`), as TRL's side runs without its sample generations (num_sample_generations=0):
  with them, every 5th update would also sample and score 128 judge prompts.
- The stages run with their defaults, speed features included (packed rows, shared prefixes,
  log-probs from generation; length grouping stays off, as by default); `--set sft.packing=false`
  and the like switch one, which is how `features.py` measures each before/after.
- Timing is the stage's own `StepClock` (the page's rule: the end of step 2 to the end of the last
  step). Losses per step come from the metrics the stage logs (`sft/loss`, `rm/loss`).
- The tracker is the in-memory one (`--no-tracking`); MLflow's cost is measured separately, as
  pipeline overhead, in `benchmarks/overhead.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # before torch starts its OpenMP pool: the page's 2 threads, CPU only
    os.environ["OMP_NUM_THREADS"] = "2"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch  # noqa: E402

STAGES = ("sft", "rm", "ppo")


def write_prep(w, store, tok) -> None:
    """`prep/` as data prep commits it: the workload rows (train) plus a small held-out split."""
    from rlhf.data.processing import write_jsonl
    from rlhf.data.schema import PreferenceRow, PromptRow, SFTRow

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        sft, rm, prompts = w.sft_rows(), w.rm_rows(), w.ppo_prompts()
        splits = {
            "sft_train": [SFTRow(**r) for r in sft], "sft_eval": [SFTRow(**r) for r in sft[:w.EVAL_ROWS]],
            "preference_train": [PreferenceRow(**r) for r in rm],
            "preference_eval": [PreferenceRow(**r) for r in rm[:w.EVAL_ROWS]],
            "prompt_train": [PromptRow(prompt=p) for p in prompts], "prompt_eval": [PromptRow(prompt=p) for p in prompts[:16]],
        }
        for name, rows in splits.items():
            write_jsonl(rows, out / f"{name}.jsonl")
        tok.save_pretrained(out / "tokenizer")
        report = {"sources": {"benchmark": "WORKLOAD.md"}, "builtin_task": False,
                  "sizes": {k: len(v) for k, v in splits.items()}, "tokenizer": {"trained": False, "vocab_size": len(tok)}}
        (out / "report.json").write_text(json.dumps(report))
        store.put_dir(out, "prep")


def put_model(store, key: str, model, tok) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        store.put_dir(Path(tmp), key)


def workload_config(w, stage: str, steps: int, overrides: list[str]):
    """The page's settings as our PipelineConfig (+ `--set` overrides)."""
    from rlhf.config import PipelineConfig, apply_override

    s, r, p = w.SFT, w.RM, w.PPO
    data = {
        "seed": w.SEED, "device": "cpu", "num_threads": w.THREADS,
        # user data (not the built-in task): no policy comparisons, no gold judge
        "data": {"sft_path": "workload:sft", "preference_path": "workload:rm"},
        "model": {"vocab_size": 512, "hidden_size": w.MODEL["hidden_size"], "num_layers": w.MODEL["num_hidden_layers"],
                  "num_heads": w.MODEL["num_attention_heads"], "intermediate_size": w.MODEL["intermediate_size"],
                  "max_position_embeddings": w.MODEL["max_position_embeddings"]},
        "sft": {"max_epochs": 1, "batch_size": s["batch_size"], "lr": s["lr"], "weight_decay": 0.0, "warmup_steps": 0,
                "lr_schedule": "linear", "grad_clip": s["grad_clip"], "eval_every": 10_000, "checkpoint_every": 10_000,
                "max_steps": steps},
        "reward": {"epochs": 1, "batch_size": r["batch_size"], "lr": r["lr"], "weight_decay": 0.0, "warmup_steps": 0,
                   "lr_schedule": "linear", "grad_clip": r["grad_clip"], "margin": None, "policy_comparisons": 0,
                   "checkpoint_every": 10_000, "max_steps": steps},
        "ppo": {"updates": steps, "rollout_batch_size": p["episodes_per_update"],
                "minibatch_size": p["episodes_per_update"] // p["minibatches"], "ppo_epochs": p["ppo_epochs"],
                "lr": p["lr"], "value_lr": p["lr"], "weight_decay": 0.0, "grad_clip": None, "lr_schedule": "linear",
                "clip_eps": p["clip"], "value_clip_eps": p["value_clip"], "gamma": p["gamma"], "lam": p["lam"],
                "whiten_advantages": True, "normalize_reward": False, "missing_eos_penalty": 0.0,
                "kl": {"init_coef": p["kl_coef"], "adaptive": False, "estimator": "k1"},
                "max_new_tokens": p["new_tokens"], "temperature": p["temperature"], "value_init": "reward",
                "gold_log_every": 10_000, "checkpoint_every": 10_000,
                # no judge evaluations inside the timed updates: TRL's side runs num_sample_generations=0
                "judge_every": None, "select": "last"},
        "tracking": {"log_models": False},
    }
    for item in overrides:
        data = apply_override(data, item)
    return PipelineConfig.model_validate(data)


def run_stage(w, stage: str, steps: int, overrides: list[str], root: Path) -> dict:
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from rlhf.adapters.settings import Settings
    from rlhf.adapters.store import LocalStore
    from rlhf.dispatch import StageRequest, build_context
    from rlhf.stages import ppo, reward, sft
    from rlhf.stages.table import STAGES as TABLE

    cfg = workload_config(w, stage, steps, overrides)
    store, tok = LocalStore(root), w.tokenizer()
    write_prep(w, store, tok)
    if stage == "rm":
        torch.manual_seed(w.SEED)
        rm_cfg = w.model_config()
        rm_cfg.num_labels = 1
        put_model(store, "sft/model", LlamaForSequenceClassification(rm_cfg), tok)
    if stage == "ppo":
        torch.manual_seed(w.PPO["policy_seed"])
        put_model(store, "sft/model", LlamaForCausalLM(w.model_config()), tok)
        torch.manual_seed(w.PPO["reward_seed"])
        rm_cfg = w.model_config()
        rm_cfg.num_labels = 1
        put_model(store, "reward/model", LlamaForSequenceClassification(rm_cfg), tok)
    name, module = {"sft": ("sft", sft), "rm": ("reward", reward), "ppo": ("ppo", ppo)}[stage]
    # the context the dispatcher gives a stage, with tracking in memory (the losses are read back from it)
    ctx = build_context(TABLE[name], StageRequest(name, str(root), str(root), tracking=False), cfg, store,
                        Settings.from_env())
    tracker = ctx.tracker
    result = module.run(ctx).values
    thr = result["throughput"]
    out = {"timed_steps": thr["timed_steps"], "wall_s": thr["timed_s"]}
    if stage in ("sft", "rm"):
        key = {"sft": "sft/loss", "rm": "rm/loss"}[stage]
        out["steps"] = result["steps"]
        out["losses"] = [m[key] for _, m in tracker.metrics if key in m]
    if stage == "sft":
        out.update(tokens_per_s=thr["tokens_per_s"], steps_per_s=thr["timed_steps"] / thr["timed_s"])
    elif stage == "rm":
        out.update(pairs_per_s=thr["pairs_per_s"], steps_per_s=thr["timed_steps"] / thr["timed_s"])
    else:
        gen, score, train = thr["gen_s"], thr["score_s"], thr["train_s"]
        out.update(updates=result["updates"], timed_updates=thr["timed_steps"], episodes_per_s=thr["episodes_per_s"],
                   gen_s=gen, rollout_score_s=score, train_s=train, other_s=thr["timed_s"] - gen - score - train)
        out.pop("timed_steps")
    return out


def force_gc() -> None:
    """TRL's PPO loop calls gc.collect() twice per update; do the same around our rollout
    (stage code untouched: the stage looks `generate` up in its module at call time)."""
    import gc

    from rlhf.stages import ppo

    inner = ppo.generate

    def generate(*args, **kwargs):
        gc.collect()
        out = inner(*args, **kwargs)
        gc.collect()
        return out

    ppo.generate = generate


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--steps", type=int, help="optimizer steps (sft/rm) or PPO updates (ppo), the 2 untimed "
                                                  "included; default: the page's 60 / 12")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as `rlhf run --set` (e.g. sft.packing=false)")
    parser.add_argument("--force-gc", action="store_true",
                        help="ppo: call gc.collect() twice per update, as TRL does (the \"before\" of no forced gc)")
    parser.add_argument("--workload", default="1m", choices=("1m", "25m"),
                        help="1m: WORKLOAD.md (overhead-bound); 25m: WORKLOAD-25M.md (compute-bound)")
    parser.add_argument("--json", type=Path, help="also write the result to this file")
    args = parser.parse_args(argv)
    if args.force_gc:
        force_gc()
    began = time.perf_counter()
    torch.set_num_threads(2)
    import workload  # benchmarks/ is this script's folder, so first on sys.path

    w = workload.get(args.workload)
    steps = args.steps or {"sft": w.SFT["steps"], "rm": w.RM["steps"], "ppo": w.PPO["updates"]}[args.stage]
    if steps <= 2:
        parser.error(f"--steps {steps}: the first 2 are untimed warm-up, so at least 3 are needed")
    import transformers

    import rlhf

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix=f"ours_side_{args.stage}_") as root:
        result = run_stage(w, args.stage, steps, args.overrides, Path(root))
    result.update(workload=w.NAME, overrides=args.overrides, force_gc=args.force_gc)
    return w.emit(args.stage, result, began, {"rlhf": getattr(rlhf, "__version__", "?"),
                                                "transformers": transformers.__version__}, args.json)


if __name__ == "__main__":
    main()
