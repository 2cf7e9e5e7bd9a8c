"""What makes our stages fast, each feature measured before/after in the same run.

    .venv/bin/python benchmarks/features.py [--quick] [--repeats N] [--json FILE]

Two kinds of rows, on the WORKLOAD.md workload (2 threads, fp32, CPU):
- stage rows: our whole stage (`ours_side.py`, a fresh process each) with the feature switched off
  ("before") and on ("after", our default), alternating, N pairs; the speed-up is the median of
  the pairwise ratios of the stage's rate;
- kernel rows: the one operation the feature changes, timed in this process on the workload's
  model and batch shapes, alternating before/after blocks.

The features: packed rows with block-diagonal attention (SFT, RM: no padding waste; length-grouped
batches as an option on top); chosen and rejected in one forward, over their shared prefix (RM); old log-probs from generation instead of a
policy re-forward (PPO scoring); no forced gc.collect() (PPO, TRL calls it twice per update);
KV cache and early stop once every sequence has emitted EOS (generation); inference mode for
decoding; fused AdamW; torch.compile as an option (`distributed.compile`: its rate is the steady
state, after compiling; the row also prints the whole process's time, compile included). Not here:
bf16/TF32, which are GPU features (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "2"
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
RATE = {"sft": "tokens_per_s", "rm": "pairs_per_s", "ppo": "episodes_per_s"}

# (feature, stage, ours_side.py arguments before, after): "after" is our default unless marked optional
STAGE_ROWS = [
    ("packed rows, block attention (no padding waste)", "sft", ["--set", "sft.packing=false"], []),
    ("(optional) length-grouped batches on top", "sft", [], ["--set", "sft.group_by_length=true"]),
    ("packed rows, block attention (no padding waste)", "rm", ["--set", "reward.packing=false"], []),
    ("chosen+rejected over their shared prefix", "rm", ["--set", "reward.share_prefix=false"], []),
    ("old log-probs from generation (no policy re-forward)", "ppo", ["--set", "ppo.logprobs_from_generation=false"], []),
    ("no forced gc.collect() (TRL: 2 per update)", "ppo", ["--force-gc"], []),
    ("(optional) torch.compile (inductor, dynamic shapes)", "sft", [], ["--set", "distributed.compile=true"]),
]
STEPS = {"sft": 30, "rm": 30, "ppo": 8}
QUICK_STEPS = {"sft": 12, "rm": 12, "ppo": 5}


def ours(stage: str, steps: int, extra: list[str]) -> dict:
    cmd = [sys.executable, str(BENCH_DIR / "ours_side.py"), stage, "--steps", str(steps), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"features.py: {' '.join(cmd[1:])} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def stage_row(feature: str, stage: str, off: list[str], on: list[str], steps: int, repeats: int) -> dict:
    before, after, run_s = [], [], {"before": [], "after": []}
    for rep in range(repeats):
        for first in ((True, False) if rep % 2 == 0 else (False, True)):
            res = ours(stage, steps, off if first else on)
            (before if first else after).append(res[RATE[stage]])
            run_s["before" if first else "after"].append(res["run_s"])
    ratios = [a / b for a, b in zip(after, before)]
    return {"feature": feature, "stage": stage, "kind": "stage", "before": before, "after": after,
            "unit": RATE[stage], "speedup": statistics.median(ratios), "ratios": ratios, "run_s": run_s}


def alternate(before, after, repeats: int, inner: int) -> tuple[list[float], list[float]]:
    """Seconds per call of each, in alternating blocks of `inner` calls after one warm-up block each."""
    times = {0: [], 1: []}
    for fn in (before, after):
        for _ in range(max(2, inner // 4)):
            fn()
    for rep in range(repeats):
        for k in ((0, 1) if rep % 2 == 0 else (1, 0)):
            fn = before if k == 0 else after
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            times[k].append((time.perf_counter() - t) / inner)
    return times[0], times[1]


def kernel_rows(repeats: int, inner: int) -> list[dict]:
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from rlhf.models import Group, pair_scores
    from rlhf.models.batching import tokenize_pair
    from rlhf.stages.comparisons import separate_scores
    from rlhf.models.rollout import generate

    import workload as w  # benchmarks/ is this script's folder, so first on sys.path
    torch.set_num_threads(w.THREADS)
    tok = w.tokenizer()
    rows = []

    def row(feature, what, before, after):
        b, a = alternate(before, after, repeats, inner)
        ratios = [x / y for x, y in zip(b, a)]
        rows.append({"feature": feature, "stage": what, "kind": "kernel", "before": b, "after": a, "unit": "s/call",
                     "speedup": statistics.median(ratios), "ratios": ratios})
        print(f"  {feature}: {statistics.median(b) * 1e3:.1f} -> {statistics.median(a) * 1e3:.1f} ms", file=sys.stderr)

    # RM: one forward over chosen + rejected vs a forward for each (a length-grouped batch of 16 pairs)
    torch.manual_seed(w.SEED)
    cfg = w.model_config()
    cfg.num_labels = 1
    rm = LlamaForSequenceClassification(cfg)
    pairs = [(tokenize_pair(tok, r["prompt"], r["chosen"])[0], tokenize_pair(tok, r["prompt"], r["rejected"])[0])
             for r in w.rm_rows()]
    batch = [pairs[i] for i in torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))[:16].tolist()]
    groups = [Group([c, r], [(0, 1)]) for c, r in batch]

    def step(score):
        def f():
            c, r = score()
            (c - r).sum().backward()
        return f

    from rlhf.models import sequence_scores
    from rlhf.models.batching import pad_right

    def forward_each():
        out = []
        for side in (0, 1):
            ids, attn = pad_right([p[side] for p in batch], 0)
            out.append(sequence_scores(rm, ids, attn))
        return out[0], out[1]

    row("chosen+rejected in one forward (vs one forward each)", "rm step", step(forward_each),
        step(lambda: separate_scores(rm, groups, 0, "cpu")))
    row("chosen+rejected over their shared prefix", "rm step", step(lambda: separate_scores(rm, groups, 0, "cpu")),
        step(lambda: pair_scores(rm, batch, 0, "cpu", share_prefix=True, packed=False)))
    row("packed rows, block attention (no padding waste)", "rm step",
        step(lambda: pair_scores(rm, batch, 0, "cpu", share_prefix=True, packed=False)),
        step(lambda: pair_scores(rm, batch, 0, "cpu", share_prefix=True, packed=True)))

    # Generation: 16 workload prompts, 24 new tokens at temperature 0.7
    torch.manual_seed(w.PPO["policy_seed"])
    policy = LlamaForCausalLM(w.model_config())
    prompts = [tok(p)["input_ids"] for p in w.ppo_prompts()[:16]]

    def hf_generate(use_cache, inference, model=policy, eos=tok.eos_token_id):
        ctx = torch.inference_mode if inference else torch.no_grad

        def f():
            q = torch.tensor(prompts)
            with ctx():
                model.generate(input_ids=q, attention_mask=torch.ones_like(q), max_new_tokens=24, do_sample=True,
                               temperature=0.7, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=eos,
                               use_cache=use_cache)
        return f

    row("KV cache in generation", "generate", hf_generate(False, False), hf_generate(True, False))
    row("inference mode for decoding (vs no_grad)", "generate", hf_generate(True, False), hf_generate(True, True))
    # early stop: the same policy with its EOS logit raised to about 7 over the rest (p(EOS) ~ 0.7 a
    # token: answers end after 1-3 tokens); with no EOS id generation runs all 24 steps
    eos_policy = LlamaForCausalLM(w.model_config())
    eos_policy.load_state_dict(policy.state_dict())
    with torch.no_grad():
        ro = generate(policy, tok, prompts, 24, 0.7, "cpu")
        hidden = policy.model(input_ids=ro.input_ids).last_hidden_state.reshape(-1, policy.config.hidden_size)
        eos_policy.lm_head.weight[tok.eos_token_id] = torch.linalg.lstsq(hidden, torch.full((len(hidden), 1), 7.0)).solution[:, 0]
    row("early stop once every sequence has emitted EOS", "generate",
        hf_generate(True, True, eos_policy, None), hf_generate(True, True, eos_policy, tok.eos_token_id))

    # Optimizer step on the 0.98M-parameter policy
    for p in policy.parameters():
        p.grad = torch.randn_like(p)
    loop = torch.optim.AdamW(policy.parameters(), lr=1e-5, foreach=False)
    fused = torch.optim.AdamW(policy.parameters(), lr=1e-5, fused=True)
    row("fused AdamW (vs the for-loop step)", "optimizer step", loop.step, fused.step)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 pairs of shorter stages")
    parser.add_argument("--repeats", type=int, help="before/after pairs per row (default 3; --quick 2)")
    parser.add_argument("--only", choices=("stages", "kernels"), help="run one kind of row")
    parser.add_argument("--match", help="only the rows whose feature contains this text")
    parser.add_argument("--json", type=Path, help="write the rows as JSON")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 3)
    steps = QUICK_STEPS if args.quick else STEPS
    began = time.perf_counter()
    rows = []
    for feature, stage, off, on in STAGE_ROWS if args.only != "kernels" else []:
        if args.match and args.match not in feature:
            continue
        rows.append(stage_row(feature, stage, off, on, steps[stage], repeats))
        r = rows[-1]
        print(f"[{time.perf_counter() - began:4.0f}s] {feature} ({stage}): {r['speedup']:.2f}x", file=sys.stderr)
    if args.only != "stages":
        rows += [r for r in kernel_rows(repeats=repeats * 2, inner=5 if args.quick else 10)
                 if not args.match or args.match in r["feature"]]

    print(f"\nSpeed features, before -> after (median of {repeats} alternating pairs for stages; "
          f"{repeats * 2} alternating blocks for kernels), workload of WORKLOAD.md, 2 threads")
    print(f"{'feature':54s} {'where':15s} {'before':>12s} {'after':>12s} {'speed-up':>9s}")
    for r in rows:
        if r["kind"] == "stage":
            unit = {"tokens_per_s": "tok/s", "pairs_per_s": "pairs/s", "episodes_per_s": "eps/s"}[r["unit"]]
            b, a = f"{statistics.median(r['before']):,.1f}", f"{statistics.median(r['after']):,.1f} {unit}"
            where = f"{r['stage']} stage"
        else:
            b, a = f"{statistics.median(r['before']) * 1e3:.1f} ms", f"{statistics.median(r['after']) * 1e3:.1f} ms"
            where = r["stage"]
        print(f"{r['feature']:54s} {where:15s} {b:>12s} {a:>16s} {r['speedup']:8.2f}x")
        if "compile" in r["feature"]:
            print(f"{'  whole process, compiling included':54s} {'':15s} {statistics.median(r['run_s']['before']):>10.1f} s "
                  f"{statistics.median(r['run_s']['after']):>14.1f} s")
    print(f"({time.perf_counter() - began:.0f} s)")
    out = {"rows": rows, "steps": steps, "repeats": repeats, "threads": 2, "torch": torch.__version__}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
