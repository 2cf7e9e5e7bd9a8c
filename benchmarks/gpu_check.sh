#!/usr/bin/env bash
# One call on a GPU machine (the device machine): SFT, reward and a few PPO updates on
# one GPU with DeepSpeed, then a short table. Target: well under 8 minutes on an H100/H200.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # PYTHON=/path/to/python to pick the interpreter
#
# The model is built from a config (no downloads): a Llama of ~110M parameters
# (hidden 768, 12 layers, 12 heads, MLP 3072) on the built-in task's data, so the GPU
# does real work while the whole check stays short. Rows:
#   sft     ZeRO-2, bf16                                 tokens/s
#   reward  ZeRO-2, bf16                                 pairs/s
#   ppo     ZeRO-2, bf16                                 episodes/s, generation/scoring/training split
#   ppo     ZeRO-3, bf16, gradient checkpointing, generation with the policy gathered
#   ppo     ZeRO-3, bf16, generation with synced_gpus (layer-by-layer gathering)
#   sft/ppo ZeRO-2, fp32: the bf16 rows' stages in full precision (bf16/fp32 speed-ups printed below
#           the table, with PPO's generation share in each precision)
#   sft     ZeRO-2, bf16, ZeRO-Offload (optimizer on the CPU, DeepSpeed's CPU Adam)
#   sft     ~335M Llama (hidden 1024, 24 layers, 16 heads, MLP 3072), bf16, longer task
#           instances (20-40 items), batch 128: tokens/s and MFU (target >= 45% on H100/H200)
#   q05-*   a Qwen2-0.5B-shaped hub checkpoint (rlhf.models.stand_in: its config, a tokenizer with
#           the ChatML template, random bf16-trained weights), full and LoRA: one SFT step, one
#           reward-model step and one PPO update each, the measured peak GPU memory
#           (torch.cuda.max_memory_allocated) beside `rlhf plan`'s estimate
# MFU = achieved model FLOPs / the card's dense bf16 peak, with model FLOPs per trained
# token = 6N + 12*L*h*E[n^2]/E[n] (PaLM, appendix B: N = parameters less the input
# embedding, L layers, hidden h; the attention term counts each sequence of n tokens over
# its own n positions, packed rows attend within a sequence). Peak: 989 TFLOP/s for
# H100/H200 SXM, 312 for A100; GPU_PEAK_TFLOPS=... overrides. The table, with the card's
# name, is appended to benchmarks/RESULTS.md (not in the CPU smoke mode).
# Each row is a real `rlhf stage` run (torchrun -> rlhf.ops.worker -> DeepSpeed engine); a
# row that fails prints FAILED and the check goes on. Exit status: number of failed rows.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
OUT="${1:-$(mktemp -d /tmp/rlhf-gpu-check.XXXXXX)}"
mkdir -p "$OUT"

SMOKE="${GPU_CHECK_SMOKE:-0}"  # 1: the same rows on the CPU with the tiny model (checks this script, not the GPU)
if [ "$SMOKE" != 1 ] && ! "$PY" - <<'EOF'
import sys
try:
    import torch, deepspeed, rlhf  # noqa: F401
except ImportError as e:
    sys.exit(f"gpu_check: {e}: install the project with the gpu extra (pip install -e '.[gpu]') and a CUDA torch build")
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no GPU (torch.cuda.is_available() is False)")
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, deepspeed {deepspeed.__version__}")
EOF
then
    exit 100
fi

export RLHF_HOME="$OUT/home" RLHF_QUIET=1 PYTHONUNBUFFERED=1
BASE=(--preset tiny --set device=cuda --set tracking.log_models=false --set distributed.engine=deepspeed
      --set distributed.num_processes=1 --set distributed.bf16=true
      --set model.vocab_size=4096 --set model.hidden_size=768 --set model.num_layers=12 --set model.num_heads=12
      --set model.intermediate_size=3072
      --set task.num_demonstrations=6000 --set task.num_comparisons=4000 --set task.num_prompts=2000
      --set sft.batch_size=64 --set sft.max_steps=150 --set sft.eval_every=50 --set sft.checkpoint_every=100
      --set sft.patience=100 --set sft.lr=3e-4
      --set reward.batch_size=64 --set reward.max_steps=60 --set reward.checkpoint_every=50
      --set reward.policy_comparisons=512
      --set ppo.updates=4 --set ppo.rollout_batch_size=128 --set ppo.minibatch_size=32 --set ppo.ppo_epochs=2
      --set ppo.max_new_tokens=24 --set ppo.checkpoint_every=2 --set ppo.gold_log_every=2)
if [ "$SMOKE" = 1 ]; then
    BASE=(--preset tiny --set device=cpu --set num_threads=1 --set tracking.log_models=false
          --set distributed.engine=deepspeed --set distributed.num_processes=1 --set distributed.bf16=false
          --set ppo.checkpoint_every=2)
fi
FAILED=0

row() {  # row NAME DIR STAGE [--set ...]
    local name="$1" dir="$2" stage="$3"; shift 3
    local t0=$SECONDS
    if "$PY" -m rlhf.cli stage "$stage" "${BASE[@]}" "$@" --output "$dir" >"$OUT/$name.log" 2>&1; then
        echo "$name ok $((SECONDS - t0))s" >>"$OUT/rows.txt"
    else
        echo "$name FAILED $((SECONDS - t0))s (log: $OUT/$name.log)" >>"$OUT/rows.txt"
        tail -n 25 "$OUT/$name.log"
        FAILED=$((FAILED + 1))
    fi
}
copy_inputs() {  # copy_inputs SRC DEST STAGE...
    local src="$1" dest="$2"; shift 2
    mkdir -p "$dest"
    for s in "$@"; do [ -d "$src/$s" ] && cp -r "$src/$s" "$dest/$s"; done
    rm -rf "$dest"/*/checkpoints
}

: >"$OUT/rows.txt"
T0=$SECONDS
"$PY" -m rlhf.cli stage prep "${BASE[@]}" --output "$OUT/main" >"$OUT/prep.log" 2>&1 || { tail -n 25 "$OUT/prep.log"; exit 101; }
row sft-zero2 "$OUT/main" sft --set distributed.zero_stage=2
row reward-zero2 "$OUT/main" reward --set distributed.zero_stage=2
row ppo-zero2 "$OUT/main" ppo --set distributed.zero_stage=2
copy_inputs "$OUT/main" "$OUT/z3" prep sft reward
row ppo-zero3-gather "$OUT/z3" ppo --set distributed.zero_stage=3 --set distributed.gradient_checkpointing=true
copy_inputs "$OUT/main" "$OUT/z3s" prep sft reward
row ppo-zero3-synced "$OUT/z3s" ppo --set distributed.zero_stage=3 --set distributed.zero3_generation=synced
copy_inputs "$OUT/main" "$OUT/fp32" prep sft reward  # bf16 against fp32: the same stages, full precision
row sft-zero2-fp32 "$OUT/fp32" sft --set distributed.zero_stage=2 --set distributed.bf16=false
rm -rf "$OUT/fp32/ppo"; row ppo-zero2-fp32 "$OUT/fp32" ppo --set distributed.zero_stage=2 --set distributed.bf16=false
copy_inputs "$OUT/main" "$OUT/off" prep
row sft-zero2-offload "$OUT/off" sft --set distributed.zero_stage=2 --set distributed.offload_optimizer=true \
    --set sft.max_steps=$([ "$SMOKE" = 1 ] && echo 6 || echo 30)
MFU=(--set model.hidden_size=1024 --set model.num_layers=24 --set model.num_heads=16 --set model.intermediate_size=3072
     --set model.max_position_embeddings=512 --set task.min_items=20 --set task.max_items=40
     --set data.max_prompt_tokens=160 --set data.max_total_tokens=320 --set task.num_demonstrations=12000
     --set sft.batch_size=128 --set sft.max_steps=60 --set sft.eval_every=1000 --set sft.checkpoint_every=1000
     --set sft.lr=2e-4 --set distributed.zero_stage=2)
if [ "$SMOKE" = 1 ]; then
    MFU=(--set task.min_items=6 --set task.max_items=8 --set sft.max_steps=8 --set sft.eval_every=1000)
fi
if "$PY" -m rlhf.cli stage prep "${BASE[@]}" "${MFU[@]}" --output "$OUT/mfu" >"$OUT/prep-mfu.log" 2>&1; then
    row sft-350m-mfu "$OUT/mfu" sft "${MFU[@]}"
else
    echo "sft-350m-mfu FAILED 0s (prep; log: $OUT/prep-mfu.log)" >>"$OUT/rows.txt"; FAILED=$((FAILED + 1))
fi

# a Qwen2-0.5B-shaped hub checkpoint, full and LoRA: one step of each training stage, peak memory vs rlhf plan
QDIR="$OUT/qwen2-0.5b"
if [ "$SMOKE" = 1 ]; then QSHAPE=(); else QSHAPE=(--qwen2-0.5b); fi
Q=(--set "model.name_or_path=$QDIR" --set train.precision=$([ "$SMOKE" = 1 ] && echo fp32 || echo bf16)
   --set data.max_total_tokens=256 --set sft.batch_size=16 --set sft.max_steps=1 --set sft.eval_every=1000
   --set reward.batch_size=16 --set reward.max_steps=1 --set reward.policy_comparisons=0
   --set ppo.updates=1 --set ppo.rollout_batch_size=32 --set ppo.minibatch_size=16 --set ppo.ppo_epochs=1
   --set ppo.max_new_tokens=32 --set ppo.generation_batch_size=32 --set ppo.normalize_reward=false)
if "$PY" -m rlhf.models.stand_in "$QDIR" "${QSHAPE[@]}" >"$OUT/stand-in.log" 2>&1; then
    for kind in full lora; do
        QK=("${Q[@]}"); [ "$kind" = lora ] && QK+=(--set model.lora.enabled=true)
        if "$PY" -m rlhf.cli stage prep "${BASE[@]}" "${QK[@]}" --output "$OUT/q05-$kind" >"$OUT/prep-q05-$kind.log" 2>&1
        then
            for stage in sft reward ppo; do row "q05-$kind-$stage" "$OUT/q05-$kind" "$stage" "${QK[@]}"; done
        else
            echo "q05-$kind-sft FAILED 0s (prep; log: $OUT/prep-q05-$kind.log)" >>"$OUT/rows.txt"; FAILED=$((FAILED + 1))
        fi
    done
else
    echo "q05-full-sft FAILED 0s (stand-in; log: $OUT/stand-in.log)" >>"$OUT/rows.txt"; FAILED=$((FAILED + 1))
fi

"$PY" - "$OUT" "$((SECONDS - T0))" "$SMOKE" <<'EOF'
import datetime, io, json, os, platform, sys
from contextlib import redirect_stdout
from pathlib import Path

out, total, smoke = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
rows = {l.split()[0]: l.split()[1:] for l in (out / "rows.txt").read_text().splitlines()}
where = {"sft-zero2": "main/sft", "reward-zero2": "main/reward", "ppo-zero2": "main/ppo",
         "ppo-zero3-gather": "z3/ppo", "ppo-zero3-synced": "z3s/ppo", "sft-zero2-fp32": "fp32/sft",
         "ppo-zero2-fp32": "fp32/ppo", "sft-zero2-offload": "off/sft",
         "sft-350m-mfu": "mfu/sft",
         **{f"q05-{k}-{s}": f"q05-{k}/{s}" for k in ("full", "lora") for s in ("sft", "reward", "ppo")}}
PEAKS = {"H100": 989.4e12, "H200": 989.4e12, "H800": 989.4e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
         "L4": 121e12, "A10": 125e12}
import torch

card = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not smoke else "CPU (smoke mode)"
peak = float(os.environ["GPU_PEAK_TFLOPS"]) * 1e12 if os.environ.get("GPU_PEAK_TFLOPS") else next(
    (v for k, v in PEAKS.items() if k in card), None)


def mfu(run_dir: Path, tokens_per_s: float) -> tuple[float, str]:
    """Model FLOPs per second over the peak: tokens/s x (6N + 12 L h E[n^2]/E[n])."""
    from rlhf.data.processing import read_jsonl_rows
    from rlhf.models import load_tokenizer
    from rlhf.config import ModelConfig
    from rlhf.models.batching import tokenize_pair

    mc = json.loads((run_dir / "sft" / "model" / "config.json").read_text())
    h, L, i, V = mc["hidden_size"], mc["num_hidden_layers"], mc["intermediate_size"], mc["vocab_size"]
    n_params = L * (4 * h * h + 3 * h * i + 2 * h) + h + V * h  # less the input embedding; lm_head untied
    tok = load_tokenizer(str(run_dir / "sft" / "model"), ModelConfig())
    lens = [len(tokenize_pair(tok, r.prompt, r.completion)[0])
            for r in read_jsonl_rows(run_dir / "prep" / "sft_train.jsonl", "sft")]
    en, en2 = sum(lens) / len(lens), sum(n * n for n in lens) / len(lens)
    per_token = 6 * n_params + 12 * L * h * en2 / en
    achieved = tokens_per_s * per_token
    return (achieved / peak if peak else float("nan")), (f"N={n_params / 1e6:.0f}M, mean seq {en:.0f} tok, "
                                                        f"{achieved / 1e12:.1f} TFLOP/s")


def num(x, spec: str, unit: str = "") -> str:
    """A number, or "-" for None (a throughput needs more than the 2 warm-up steps)."""
    return "-" if x is None else f"{x:{spec}}{unit}"


def plan_vs_peak(out: Path, name: str, r: dict) -> str:
    """The stage's measured peak GPU memory beside rlhf plan's estimate for its config."""
    import yaml

    from rlhf.config import PipelineConfig
    from rlhf.ops.plan import ModelShape, estimate_stage

    _, kind, stage = name.split("-")
    cfg = PipelineConfig.model_validate(yaml.safe_load((out / f"q05-{kind}" / stage / "config.yaml").read_text()))
    est = estimate_stage(stage, cfg, ModelShape.from_pretrained(out / "qwen2-0.5b"),
                         device="cuda" if not smoke else "cpu", world=1)
    peak = r.get("peak_gpu_memory_gib")
    if peak is None:
        return f"plan {est.peak / 2**30:.2f} GiB (no GPU peak measured)"
    return f"peak {peak:.2f} GiB, plan {est.peak / 2**30:.2f} GiB, plan/peak {est.peak / 2**30 / peak:.2f}"


def precision_line(out: Path) -> str:
    """bf16 against fp32 on the same stages: SFT tokens/s and PPO episodes/s ratios, and the
    share of PPO's update time spent generating in each precision."""
    def result(rel):
        f = out / rel / "result.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    def gen_share(r):
        t = r.get("throughput", {})
        split = t.get("gen_s", 0) + t.get("score_s", 0) + t.get("train_s", 0)
        return t.get("gen_s", 0) / split if split else float("nan")

    sb, sf, pb, pf = (result(x) for x in ("main/sft", "fp32/sft", "main/ppo", "fp32/ppo"))
    parts = []
    if sb.get("tokens_per_s") and sf.get("tokens_per_s"):
        parts.append(f"SFT {sb['tokens_per_s'] / sf['tokens_per_s']:.2f}x tokens/s")
    eb, ef = (r.get("throughput", {}).get("episodes_per_s") for r in (pb, pf))
    if eb and ef:
        parts.append(f"PPO {eb / ef:.2f}x episodes/s (generation {gen_share(pb):.0%} of an update in bf16, "
                     f"{gen_share(pf):.0%} in fp32)")
    label = "bf16 vs fp32" if not smoke else "bf16 vs fp32 (smoke mode: both rows ran in fp32)"
    return f"{label}: " + ("; ".join(parts) if parts else "- (a row failed)")


buf = io.StringIO()
with redirect_stdout(buf):
    print(f"\n{'row':<20} {'status':<7} {'wall':>6} {'steps':>6} {'throughput':>22}  detail")
    for name, rel in where.items():
        status, wall = rows.get(name, ["-", "-"])[:2]
        f = out / rel / "result.json"
        r = json.loads(f.read_text()) if f.is_file() and status == "ok" else {}
        steps, thr, detail = "-", "-", ""
        kind = name.split("-")[-1] if name.startswith("q05") else name  # q05-full-sft: an sft row
        if name == "sft-350m-mfu" and r:
            u, note = mfu(out / "mfu", r["tokens_per_s"])
            steps, thr = r["steps"], f"{r['tokens_per_s']:,.0f} tokens/s"
            detail = (f"MFU {u:.1%} ({note}, peak {peak / 1e12:.0f} TFLOP/s)" if peak else
                      f"MFU - (no known peak for {card}: set GPU_PEAK_TFLOPS; {note})")
        elif kind.startswith("sft") and r:
            steps, thr = r["steps"], num(r["tokens_per_s"], ",.0f", " tokens/s")
            detail = f"best eval loss {r['best_eval_loss']:.3f}"
        elif kind.startswith("reward") and r:
            steps, thr = r["steps"], num(r["pairs_per_s"], ",.1f", " pairs/s")
            detail = f"rm/accuracy {r.get('rm/accuracy', float('nan')):.3f}"
        elif kind.startswith("ppo") and r:
            t = r["throughput"]  # steady state: updates after the first 2
            steps, thr = r["updates"], f"{t['episodes_per_s'] or float('nan'):,.1f} episodes/s"
            split = t.get("gen_s", 0) + t.get("score_s", 0) + t.get("train_s", 0)
            detail = (f"gen {t.get('gen_s', 0) / split:.0%} / score {t.get('score_s', 0) / split:.0%} / "
                      f"train {t.get('train_s', 0) / split:.0%}" if split else "")
        if name.startswith("q05") and r:
            detail = f"{detail}; {plan_vs_peak(out, name, r)}"
        print(f"{name:<20} {status:<7} {wall:>6} {steps!s:>6} {thr:>22}  {detail}")
    print(precision_line(out))
    print(f"total {total}s; logs and outputs in {out}")
table = buf.getvalue()
print(table, end="")
if not smoke:
    import deepspeed
    import transformers

    with open("benchmarks/RESULTS.md", "a") as f:
        f.write(f"\n## GPU check: {card}, {datetime.date.today()}\n\n`bash benchmarks/gpu_check.sh` on "
                f"{platform.node()}: torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
                f"transformers {transformers.__version__}\n\n```{table}```\n")
    print("appended to benchmarks/RESULTS.md")
EOF
exit "$FAILED"
