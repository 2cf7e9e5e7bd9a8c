"""PPO's peak memory against the rollout batch: one PPO update (generate, score, optimise)
at rollout_batch_size 64 and 256, with `ppo.forward_batch_size` and
`ppo.generation_batch_size` fixed; with the defaults (scoring in training micro-batches,
one generation over each process's whole share); and as before they existed (one
forward and one generation over the whole share).

Each row runs in a fresh process on a hub-shaped stand-in (`rlhf.models.stand_in`,
Qwen2 architecture) that is policy, reference, value and reward model. Memory is the
process's peak resident set (VmHWM) while the update runs, reset just before it
(/proc/self/clear_refs), with glibc returning every freed block of 64 KiB or more to the
OS (MALLOC_MMAP_THRESHOLD_), so the peak follows the live tensor bytes; "above loaded"
is that peak minus the RSS with the models loaded (what the update itself adds).

    python benchmarks/ppo_memory.py [--quick]

Prints a table and the ratios 256 / 64: with both fixed, within 10%.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from memory import kib, reset_peak, run_child  # noqa: E402  (benchmarks/memory.py)


def child(args: dict) -> dict:
    """One PPO update in this process; returns its memory."""
    from types import SimpleNamespace

    import torch

    from rlhf.config import DistributedConfig, ModelConfig, PPOConfig
    from rlhf.data.schema import PromptRow
    from rlhf.stages.contract import Runtime
    from rlhf.stages.ppo import make_experience, ppo_update
    from rlhf.stages.ppo_models import load_models
    from rlhf.train.distributed import Dist

    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    B = args["rollout"]
    pcfg = PPOConfig(rollout_batch_size=B, minibatch_size=16, ppo_epochs=1, max_new_tokens=args["new_tokens"],
                     forward_batch_size=args["fbs"], generation_batch_size=args["gbs"], temperature=1.0)
    dirs = {"sft/model": args["model"], "reward/model": args["reward"]}
    ctx = SimpleNamespace(config=pcfg, model=ModelConfig(), runtime=Runtime("cpu", None, DistributedConfig()),
                          store=SimpleNamespace(get_dir=lambda key: dirs[key]))
    dist = Dist(0, 1, 0, 0, torch.device("cpu"), False)
    models = load_models(ctx, dist, opt_steps=10)
    prompts = [models.fmt.prompt_ids(PromptRow(prompt=f"reverse: {' '.join('abcdefgh'[:3 + i % 6])} {i}"))
               for i in range(B)]
    loaded = kib("VmRSS")
    reset_peak()
    exp = make_experience(models, prompts, pcfg, (0.0, 1.0), 0.1, dist)
    ppo_update(exp, models, pcfg, dist)
    peak = kib("VmHWM")
    return {"loaded_mib": loaded / 1024, "peak_mib": peak / 1024, "above_mib": (peak - loaded) / 1024,
            "response_tokens": int(exp.mask.sum())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller model and shorter responses")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    from rlhf.models.stand_in import build_stand_in

    size = dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2) if a.quick else dict(
        hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2)
    new_tokens = 32 if a.quick else 64
    with tempfile.TemporaryDirectory() as tmp:
        model = build_stand_in(Path(tmp) / "policy", "qwen2", vocab_size=4000, **size)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        rm = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
        rm.config.pad_token_id = AutoTokenizer.from_pretrained(model).pad_token_id
        rm.save_pretrained(Path(tmp) / "reward")
        AutoTokenizer.from_pretrained(model).save_pretrained(Path(tmp) / "reward")
        rows = []
        for label, fbs, gbs in (("forward 16, generation 16", 16, 16),
                                ("defaults: forward 16, generation all", None, None),
                                ("before: forward all, generation all", "all", None)):
            for B in (64, 256):
                got = run_child(__file__, {"rollout": B, "fbs": B if fbs == "all" else fbs, "gbs": gbs,
                                           "model": str(model), "reward": str(Path(tmp) / "reward"), "threads": 2,
                                           "new_tokens": new_tokens})
                if got is None:
                    return 1
                rows.append((label, B, got))
    params = sum(p.numel() for p in rm.parameters())
    print(f"PPO peak memory, one update, Qwen2-shaped stand-in ({params / 1e6:.1f}M parameters, 4 models), "
          f"minibatch 16, {new_tokens} new tokens, CPU")
    print(f"{'scoring / generation batch':38} {'rollout':>7} {'loaded MiB':>11} {'peak MiB':>9} "
          f"{'above loaded MiB':>17} {'response tokens':>16}")
    for label, B, m in rows:
        print(f"{label:38} {B:7d} {m['loaded_mib']:11.1f} {m['peak_mib']:9.1f} {m['above_mib']:17.1f} "
              f"{m['response_tokens']:16d}")
    for label in dict.fromkeys(r[0] for r in rows):
        small, big = [m for lab, B, m in rows if lab == label]
        print(f"{label}: peak 256/64 = {big['peak_mib'] / small['peak_mib']:.3f}, "
              f"above loaded 256/64 = {big['above_mib'] / small['above_mib']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
