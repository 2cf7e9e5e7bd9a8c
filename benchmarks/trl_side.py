"""The TRL side of the CPU throughput benchmark: one TRL stage per process, on the fixed workload.

    .venv/bin/python benchmarks/trl_side.py {sft|rm|ppo} [--trl-dir DIR] [--steps N] [--json FILE]

It runs the workload of ../shared/benchmarks/WORKLOAD.md (tokenizer, model, data and settings from
`benchmarks/workload`) through Hugging Face TRL and prints one JSON line with the measurement, so our
stages can be compared with TRL on equal terms.

What is measured, and how (the page's "Timing" rules):
- The end of every optimizer step (SFT, RM) or PPO update is stamped by a `TrainerCallback.on_step_end`.
  The first 2 are warm-up: `wall_s` runs from the end of step/update 2 to the end of the last one.
- SFT: the batches are counted inside `compute_loss` as TRL receives them, so `tokens_per_s` is
  non-pad (attention-mask) tokens of the timed steps / `wall_s`, and `loss_tokens_per_s` counts the
  supervised labels (completion + EOS). RM: `pairs_per_s` = 16 x timed steps / `wall_s`, and
  `tokens_per_s` counts the non-pad tokens of chosen and rejected. Both report the loss of every step
  (`losses`), so our stages' losses can be set beside TRL's at equal steps.
- PPO (trl 1.12 `trl.experimental.ppo.PPOTrainer`): `episodes_per_s` = 16 x timed updates / `wall_s`.
  TRL logs only `eps`, so the time is split by wrapping TRL's own module-level functions, counting the
  calls that lie inside the timed window: `gen_s` (`batch_generation`), `rollout_score_s` (no-grad
  `forward` of the reference policy + `get_reward` of value and reward models), `gc_s` (the two
  `gc.collect()` calls TRL makes per update) and `train_s`, the remainder (log-probs, GAE and the
  4 mini-batch optimizer steps). `episodes_per_s_without_gc` = episodes / (`wall_s` - `gc_s`).
- `peak_rss_mb` is `getrusage(RUSAGE_SELF).ru_maxrss` of the whole process (imports and data included).

TRL is a benchmark-only dependency, never a runtime one: it lies in side folders made with
`pip install --no-deps --target DIR trl==VERSION`, which this script puts at the front of `sys.path`.
trl 1.16.0 for SFT and RM; trl 1.12.0 (+ pandas, tzdata) for PPO, since 1.13 and later ship no PPO trainer.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import os
import sys
import tempfile
import time
import types
from collections import defaultdict
from contextlib import redirect_stdout
from pathlib import Path

# Set before torch is imported, so its OpenMP pool starts with the page's 2 threads. CPU only, as measured.
os.environ["OMP_NUM_THREADS"] = "2"
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # PPO lives in trl.experimental; we know

import torch  # noqa: E402

TRL_SIDE = {  # stage -> (default side folder, trl version the page measured, extra pip packages)
    "sft": ("/tmp/trl116", "1.16.0", ""),
    "rm": ("/tmp/trl116", "1.16.0", ""),
    "ppo": ("/tmp/trl112", "1.12.0", " pandas tzdata"),
}


def import_trl(stage: str, trl_dir: str | None):
    """Import trl from its side folder; a clear error, with the pip command, when it is not there."""
    default_dir, version, extra = TRL_SIDE[stage]
    trl_dir = str(Path(trl_dir or default_dir).resolve())
    fix = f"{sys.executable} -m pip install --no-deps --target {trl_dir} trl=={version}{extra}"
    if not (Path(trl_dir) / "trl" / "__init__.py").is_file():
        sys.exit(f"trl_side.py {stage}: no trl package in {trl_dir} (--trl-dir). Install it with:\n  {fix}")
    sys.path.insert(0, trl_dir)
    import trl

    if not str(Path(trl.__file__).resolve()).startswith(trl_dir):
        sys.exit(f"trl_side.py {stage}: imported trl from {trl.__file__}, not from {trl_dir}; remove that trl")
    if trl.__version__ != version:
        print(f"trl_side.py {stage}: warning: trl {trl.__version__} in {trl_dir}, the page measured {version} "
              f"({fix})", file=sys.stderr)
    return trl


class StepClock:
    """`perf_counter` at the end of every optimizer step / PPO update, via `on_step_end`."""

    def __init__(self):
        from transformers import TrainerCallback

        ends = self.ends = []

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                ends.append(time.perf_counter())

        self.callback = _Callback()

    def window(self, untimed: int) -> tuple[float, float]:
        """(start, end) of the timed steps: end of step `untimed` to end of the last step."""
        if len(self.ends) <= untimed:
            raise ValueError(f"{len(self.ends)} steps ran; more than {untimed} (untimed warm-up) are needed")
        return self.ends[untimed - 1], self.ends[-1]


class Spans:
    """Time spent inside wrapped functions, so a TRL loop can be split without editing TRL."""

    def __init__(self):
        self.calls = defaultdict(list)  # name -> [(start, end, count)]

    def wrap(self, name, fn, when=None, count=None):
        """`fn` timed under `name` (only while `when()` holds); `count(output)` is kept with each call."""

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if when is not None and not when():
                return fn(*args, **kwargs)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.calls[name].append((start, time.perf_counter(), count(out) if count else 0))
            return out

        return timed

    def seconds(self, name: str, start: float, end: float) -> float:
        return sum(e - s for s, e, _ in self.calls[name] if s >= start and e <= end)

    def count(self, name: str, start: float, end: float) -> int:
        return sum(c for s, e, c in self.calls[name] if s >= start and e <= end)


def recording(trainer_cls, batches: list, losses: list):
    """`trainer_cls` whose `compute_loss` keeps each batch's token counts and loss (as tensors, no sync)."""

    class Recording(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mask = inputs["attention_mask"]  # (B, T) 1 on non-pad tokens
            labels = inputs.get("labels")  # (B, T) -100 off the loss; SFT only
            batches.append((mask.sum(), (labels != -100).sum() if labels is not None else None))
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            losses.append((out[0] if return_outputs else out).detach())
            return out

    return Recording


def check_runtime(stage: str, *models) -> None:
    """Fail unless the models ran as the page says: fp32, SDPA, no activation checkpointing.

    TRL's configs default to bf16 and to activation checkpointing, so a missed argument would time
    another workload.
    """
    for model in models:
        problems = []
        if model.dtype != torch.float32:
            problems.append(f"dtype {model.dtype}")
        if model.config._attn_implementation != "sdpa":
            problems.append(f"attention {model.config._attn_implementation}")
        flag = "is_activation_checkpointing"  # transformers 5 name; `is_gradient_checkpointing` before
        if getattr(model, flag if hasattr(type(model), flag) else "is_gradient_checkpointing", False):
            problems.append("activation checkpointing on")
        if problems:
            raise RuntimeError(f"trl_side.py {stage}: {type(model).__name__} ran with {', '.join(problems)}; "
                               "the page wants fp32, sdpa, no checkpointing: check the config arguments")


def common_args(w, settings: dict, steps: int, out_dir: str) -> dict:
    """TrainingArguments shared by SFT and RM: the page's optimizer, fp32, no eval/saving/logging."""
    return dict(
        output_dir=out_dir, use_cpu=True, seed=w.SEED,
        per_device_train_batch_size=settings["batch_size"], gradient_accumulation_steps=1, max_steps=steps,
        optim="adamw_torch", learning_rate=settings["lr"], adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        weight_decay=0.0, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=settings["grad_clip"],
        bf16=False, fp16=False, activation_checkpointing=False, gradient_checkpointing=False, torch_compile=False,
        max_length=w.MAX_LENGTH, dataloader_num_workers=0,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
    )


def run_sft(w, trl, steps: int, out_dir: str) -> dict:
    from datasets import Dataset
    from transformers import LlamaForCausalLM

    # 1. model and data
    torch.manual_seed(w.SEED)
    model = LlamaForCausalLM(w.model_config())
    config = trl.SFTConfig(**common_args(w, w.SFT, steps, out_dir), packing=False, padding_free=False,
                           completion_only_loss=True, loss_type="nll")
    # 2. train, stamping every step and counting every batch
    clock, batches, losses = StepClock(), [], []
    trainer = recording(trl.SFTTrainer, batches, losses)(
        model=model, args=config, train_dataset=Dataset.from_list(w.sft_rows()), processing_class=w.tokenizer(),
        callbacks=[clock.callback])
    trainer.train()
    check_runtime("sft", model)
    # 3. rates over the timed steps
    untimed = w.SFT["untimed_steps"]
    start, end = clock.window(untimed)
    wall = end - start
    timed = batches[untimed:]
    return {
        "steps": len(clock.ends), "timed_steps": len(clock.ends) - untimed, "wall_s": wall,
        "tokens_per_s": sum(int(t) for t, _ in timed) / wall,
        "loss_tokens_per_s": sum(int(n) for _, n in timed) / wall,
        "steps_per_s": (len(clock.ends) - untimed) / wall,
        "tokens_total": sum(int(t) for t, _ in batches), "loss_tokens_total": sum(int(n) for _, n in batches),
        "losses": [float(x) for x in losses],
    }


def run_rm(w, trl, steps: int, out_dir: str) -> dict:
    from datasets import Dataset
    from transformers import LlamaForSequenceClassification

    # 1. model (score head at the last non-pad token) and data
    torch.manual_seed(w.SEED)
    cfg = w.model_config()
    cfg.num_labels = 1
    model = LlamaForSequenceClassification(cfg)
    config = trl.RewardConfig(**common_args(w, w.RM, steps, out_dir), center_rewards_coefficient=None,
                              disable_dropout=True)
    # 2. train: one forward over 16 chosen + 16 rejected per step
    clock, batches, losses = StepClock(), [], []
    trainer = recording(trl.RewardTrainer, batches, losses)(
        model=model, args=config, train_dataset=Dataset.from_list(w.rm_rows()), processing_class=w.tokenizer(),
        callbacks=[clock.callback])
    trainer.train()
    check_runtime("rm", model)
    # 3. rates over the timed steps
    untimed = w.RM["untimed_steps"]
    start, end = clock.window(untimed)
    wall = end - start
    timed_steps = len(clock.ends) - untimed
    return {
        "steps": len(clock.ends), "timed_steps": timed_steps, "wall_s": wall,
        "pairs_per_s": w.RM["batch_size"] * timed_steps / wall,
        "tokens_per_s": sum(int(t) for t, _ in batches[untimed:]) / wall,
        "steps_per_s": timed_steps / wall,
        "tokens_total": sum(int(t) for t, _ in batches),
        "losses": [float(x) for x in losses],
    }


def run_ppo(w, trl, updates: int, out_dir: str) -> dict:
    from datasets import Dataset
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification, set_seed
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    p = w.PPO
    # 1. models: policy (seed 42) and its frozen copy as reference; reward (seed 43) and its copy as value
    set_seed(w.SEED)  # python/numpy/torch: TRL shuffles the mini-batches with numpy
    torch.manual_seed(p["policy_seed"])
    policy = LlamaForCausalLM(w.model_config())
    ref_policy = copy.deepcopy(policy)
    torch.manual_seed(p["reward_seed"])
    cfg = w.model_config()
    cfg.num_labels = 1
    reward_model = LlamaForSequenceClassification(cfg)
    value_model = copy.deepcopy(reward_model)
    # 2. data: 192 fixed 18-token prompts, no padding
    tok = w.tokenizer()
    prompts = Dataset.from_dict({"input_ids": [tok(q)["input_ids"] for q in w.ppo_prompts()]})
    # 3. config: one update = 16 episodes, 1 epoch of 4 mini-batches of 4. TRL's PPO loop never clips
    # gradients (it calls optimizer.step() directly), so max_grad_norm plays no part.
    config = PPOConfig(
        output_dir=out_dir, use_cpu=True, seed=w.SEED,
        per_device_train_batch_size=p["episodes_per_update"], gradient_accumulation_steps=1,
        num_mini_batches=p["minibatches"], num_ppo_epochs=p["ppo_epochs"],
        total_episodes=p["episodes_per_update"] * updates, local_rollout_forward_batch_size=p["episodes_per_update"],
        response_length=p["new_tokens"], stop_token=None, stop_token_id=None, temperature=p["temperature"],
        missing_eos_penalty=None, kl_coef=p["kl_coef"], kl_estimator="k1", gamma=p["gamma"], lam=p["lam"],
        whiten_rewards=False, cliprange=p["clip"], cliprange_value=p["value_clip"], vf_coef=p["vf_coef"],
        optim="adamw_torch", learning_rate=p["lr"], adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        weight_decay=0.0, lr_scheduler_type="linear", warmup_steps=0,
        bf16=False, fp16=False, activation_checkpointing=False, gradient_checkpointing=False, torch_compile=False,
        num_sample_generations=0, dataloader_num_workers=0,
        eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
    )
    # 4. wrap TRL's module-level functions to split the time (the loop looks them up at call time)
    spans = Spans()
    ppo_module.batch_generation = spans.wrap("gen", ppo_module.batch_generation,
                                             count=lambda out: out[1].shape[0] * out[1].shape[1])  # (B, new, V)
    ppo_module.forward = spans.wrap("score", ppo_module.forward, when=lambda: not torch.is_grad_enabled())
    ppo_module.get_reward = spans.wrap("score", ppo_module.get_reward)
    ppo_module.gc = types.SimpleNamespace(collect=spans.wrap("gc", gc.collect))
    # 5. train
    clock = StepClock()
    trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=ref_policy,
                         reward_model=reward_model, train_dataset=prompts, value_model=value_model,
                         callbacks=[clock.callback])
    trainer.train()
    check_runtime("ppo", policy, value_model, ref_policy, reward_model)
    # 6. rates and time split over the timed updates
    untimed = p["untimed_updates"]
    start, end = clock.window(untimed)
    wall = end - start
    timed = len(clock.ends) - untimed
    episodes = p["episodes_per_update"] * timed
    gen_s, score_s, gc_s = (spans.seconds(name, start, end) for name in ("gen", "score", "gc"))
    gen_tokens = spans.count("gen", start, end)
    return {
        "updates": len(clock.ends), "timed_updates": timed, "wall_s": wall,
        "episodes_per_s": episodes / wall, "episodes_per_s_without_gc": episodes / (wall - gc_s),
        "gen_tokens_per_s": gen_tokens / wall, "gen_only_tokens_per_s": gen_tokens / gen_s,
        "gen_s": gen_s, "rollout_score_s": score_s, "gc_s": gc_s, "train_s": wall - gen_s - score_s - gc_s,
        "gen_tokens": gen_tokens, "gc_calls": sum(1 for s, e, _ in spans.calls["gc"] if s >= start and e <= end),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=sorted(TRL_SIDE))
    parser.add_argument("--trl-dir", help="side folder holding trl (default: /tmp/trl116 for sft/rm, /tmp/trl112 "
                                          "for ppo)")
    parser.add_argument("--steps", type=int, help="optimizer steps (sft/rm) or PPO updates (ppo), the 2 untimed "
                                                  "included; default: the page's 60 / 12")
    parser.add_argument("--workload", default="1m", choices=("1m", "25m"),
                        help="1m: WORKLOAD.md (overhead-bound); 25m: WORKLOAD-25M.md (compute-bound)")
    parser.add_argument("--json", type=Path, help="also write the result to this file")
    args = parser.parse_args(argv)
    began = time.perf_counter()

    torch.set_num_threads(2)
    import workload  # benchmarks/ is this script's folder, so first on sys.path

    w = workload.get(args.workload)
    default_steps = {"sft": w.SFT["steps"], "rm": w.RM["steps"], "ppo": w.PPO["updates"]}[args.stage]
    steps = default_steps if args.steps is None else args.steps
    if steps <= 2:
        parser.error(f"--steps {steps}: the first 2 are untimed warm-up, so at least 3 are needed")
    trl = import_trl(args.stage, args.trl_dir)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    run = {"sft": run_sft, "rm": run_rm, "ppo": run_ppo}[args.stage]
    with tempfile.TemporaryDirectory(prefix=f"trl_side_{args.stage}_") as out_dir, redirect_stdout(sys.stderr):
        result = run(w, trl, steps, out_dir)  # TRL prints its logs; stdout keeps only the JSON line
    result["workload"] = w.NAME
    return w.emit(args.stage, result, began, {"trl": trl.__version__, "transformers": transformers.__version__},
                  args.json)

if __name__ == "__main__":
    main()
