"""`rlhf plan`'s estimates against measured peaks, on the CPU.

For three sizes of a hub-shaped stand-in (Qwen2 architecture, ~1M, ~10M and ~50M
parameters) x {full, LoRA} x {fp32, bf16}: one SFT optimizer step (the stage's own loss
and training layer: packed batch, autocast for bf16, AdamW) in a fresh process, its peak
memory measured as the process's peak resident set while loading the model and taking
the step (VmHWM, reset just before), minus the resident set before (the interpreter and
libraries), with glibc returning every freed block of 64 KiB or more to the OS
(MALLOC_MMAP_THRESHOLD_) so the peak follows the live tensor bytes. Printed beside
`rlhf.ops.plan.estimate_stage`'s estimate for the same config, with their ratio.

    python benchmarks/plan_check.py [--quick]      # --quick: ~1M and ~10M only

The target: every estimate within +-20% of its measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from memory import kib, reset_peak, run_child  # noqa: E402  (benchmarks/memory.py)
SIZES = {  # stand-in shapes (Qwen2: GQA with 2 KV heads, tied embeddings, 4000-row embedding)
    "~1M": dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512),
    "~10M": dict(hidden_size=320, num_layers=6, num_heads=5, num_kv_heads=1, intermediate_size=1280),
    "~50M": dict(hidden_size=576, num_layers=10, num_heads=9, num_kv_heads=3, intermediate_size=2304),
}
BATCH, SEQ = 8, 256


def child(job: dict) -> dict:
    import torch

    from rlhf.config import DistributedConfig, LoraConfig, ModelConfig, SFTConfig
    from rlhf.train.distributed import Dist

    from rlhf.models import load_causal_lm
    from rlhf.models.loading import apply_lora
    from rlhf.stages.sft import SFTSteps, loss_tokens
    from rlhf.train.loop import accumulate
    from rlhf.train.trainable import make_trainable

    import peft

    assert peft  # imported before the baseline: libraries are not the model's memory

    torch.set_num_threads(2)
    torch.manual_seed(0)
    before = kib("VmRSS")
    reset_peak()

    mcfg = ModelConfig(lora=LoraConfig(enabled=job["lora"]))
    scfg = SFTConfig(batch_size=BATCH)
    dist = Dist(0, 1, 0, 0, torch.device("cpu"), False)
    model = apply_lora(load_causal_lm(job["model"], mcfg), mcfg)
    model = make_trainable(model, dist, DistributedConfig(), scfg, total_steps=10, batch_size=BATCH,
                           precision=job["precision"])
    g = torch.Generator().manual_seed(1)
    vocab = model.module.config.vocab_size
    batch = [(torch.randint(3, vocab, (SEQ,), generator=g).tolist(), SEQ // 4) for _ in range(BATCH)]
    steps = SFTSteps(model, [], 0, dist.device, dist, scfg, {"best_loss": 1.0}, {})
    steps.packed = True
    accumulate(model, batch, steps.loss, loss_tokens)
    return {"peak_mib": (kib("VmHWM") - before) / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    from rlhf.config import load_config
    from rlhf.models.stand_in import build_stand_in
    from rlhf.ops.plan import ModelShape, estimate_stage

    sizes = {k: v for k, v in SIZES.items() if not (a.quick and k == "~50M")}
    rows, worst = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for size, shape in sizes.items():
            path = build_stand_in(Path(tmp) / size, "qwen2", embedding_rows=4000, **shape)
            for lora in (False, True):
                for precision in ("fp32", "bf16"):
                    got = run_child(__file__, {"model": str(path), "lora": lora, "precision": precision})
                    if got is None:
                        return 1
                    measured = got["peak_mib"]
                    cfg = load_config("demo", overrides=[f"model.lora.enabled={str(lora).lower()}",
                                                         f"train.precision={precision}", f"sft.batch_size={BATCH}"])
                    est = estimate_stage("sft", cfg, ModelShape.from_pretrained(path), device="cpu", world=1,
                                         seq_len=SEQ)
                    ratio = est.peak / 2**20 / measured
                    worst = max(worst, abs(ratio - 1))
                    rows.append((size, est.params, "LoRA" if lora else "full", precision, measured,
                                 est.peak / 2**20, ratio))
    print(f"rlhf plan vs measured peak, one SFT step, batch {BATCH} x {SEQ} tokens (packed), CPU")
    print(f"{'size':6} {'params':>11} {'weights':7} {'prec':5} {'measured MiB':>13} {'estimate MiB':>13} {'ratio':>6}")
    for size, params, kind, prec, meas, est, ratio in rows:
        print(f"{size:6} {params:11,d} {kind:7} {prec:5} {meas:13.1f} {est:13.1f} {ratio:6.3f}")
    print(f"largest deviation: {worst:.1%} (target: within 20%)")
    return 0 if worst <= 0.2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
