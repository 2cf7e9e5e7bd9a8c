"""How our cost grows: prep by rows (wall, peak RSS); `rlhf run`'s overhead by stage time.

    .venv/bin/python benchmarks/scaling.py prep [--rows 10000,100000,1000000] [--json FILE]
    .venv/bin/python benchmarks/scaling.py overhead [--json FILE]
    .venv/bin/python benchmarks/scaling.py prep --plot before=old.json after=new.json [--out PNG]

Prep: for each size, a preference file of that many rows and an SFT file of a tenth as
many (at least 2000) are generated from the built-in task's families (realistic
prompts and answers, one file per size, reused when present), then `rlhf stage prep`
reads, checks, de-duplicates, trains the tokenizer on, length-filters and splits them
in a fresh process, alone. The table gives its wall time, its peak RSS (the process's
own `ru_maxrss`, from wait4), the time per 1k rows, and two ratios against the middle
size: RSS (flat means prep streams) and time over the linear prediction.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def generate(path: Path, kind: str, n: int, seed: int) -> Path:
    """`n` rows of `kind` (sft or preference) on the built-in families, written once."""
    if path.is_file():
        return path
    from rlhf.data.tasks.base import FAMILIES
    import rlhf.data.tasks  # noqa: F401  (registers reverse and sort)

    rng = random.Random(seed)
    fams = [FAMILIES["reverse"], FAMILIES["sort"]]
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for _ in range(n):
            fam = rng.choice(fams)
            # up to 24 items: prompts of realistic spread (4-60 tokens), few exact duplicates
            prompt = fam.prompt(fam.make_items(rng, rng.randint(3, 24)))
            if kind == "sft":
                row = {"prompt": prompt, "completion": fam.respond(rng, prompt, 0.75, 0.4)}
            else:
                a, b = (fam.respond(rng, prompt, 0.5, 0.4) for _ in range(2))
                row = {"prompt": prompt, "chosen": a, "rejected": b if b != a else a + " ok"}
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)
    return path


def run_prep(data: Path, n: int, out: Path) -> dict:
    sft = generate(data / f"sft-{max(2000, n // 10)}.jsonl", "sft", max(2000, n // 10), seed=1)
    pref = generate(data / f"preference-{n}.jsonl", "preference", n, seed=2)
    env = {**os.environ, "RLHF_HOME": str(out / "home"), "RLHF_QUIET": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "rlhf.cli", "stage", "prep", "--preset", "demo", "--set", f"data.sft_path={sft}",
           "--set", f"data.preference_path={pref}", "--set", "data.max_truncate_rate=0.5",
           "--set", "tracking.log_models=false", "--output", str(out / f"prep-{n}"), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"prep at {n} rows failed:\n{err[-3000:]}")
    sizes = json.loads((out / f"prep-{n}" / "prep" / "report.json").read_text())["sizes"]
    return {"rows": n, "wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "sizes": sizes}


def prep_table(results: list[dict]) -> dict:
    """Ratios against the middle size: RSS, and time over the linear prediction."""
    ref = results[len(results) // 2 - (len(results) % 2 == 0)] if len(results) > 1 else results[0]
    for r in results:
        r["ms_per_1k_rows"] = round(1000 * r["wall_s"] / (r["rows"] / 1000), 1)
        r["rss_vs_ref"] = round(r["peak_rss_mb"] / ref["peak_rss_mb"], 3)
        r["time_vs_linear"] = round(r["wall_s"] / (ref["wall_s"] * r["rows"] / ref["rows"]), 3)
    return {"reference_rows": ref["rows"], "rows": results}


OVERHEAD_RUNS = {
    "tiny": ("tiny", []),
    "tiny x8": ("tiny", ["sft.max_epochs=8", "reward.epochs=8", "ppo.updates=24", "eval.num_prompts=64"]),
    "demo-short": ("demo", ["sft.max_steps=150", "reward.max_steps=60", "ppo.updates=8",
                             "reward.policy_comparisons=2000", "eval.num_prompts=100"]),
    "demo": ("demo", []),
}
"""Runs of `rlhf run` whose stages take longer and longer (seconds to minutes)."""


def overhead_curve(names: list[str] | None = None) -> list[dict]:
    """`benchmarks/overhead.py`'s split of each run's wall time (warm steps): compute
    inside the stages against everything else (the KFP local runner, MLflow, the store)."""
    sys.path.insert(0, str(BENCH_DIR))
    from overhead import measure

    rows = []
    for name, (preset, sets) in OVERHEAD_RUNS.items():
        if names and name not in names:
            continue
        r = measure(preset, ["num_threads=2", *sets], warm=True)
        rows.append({"run": name, "sets": sets, "wall_s": round(r["wall_s"], 1), "compute_s": round(r["compute_s"], 1),
                     "overhead_s": round(r["overhead_s"], 1), "overhead_share": round(r["overhead_share"], 4)})
    return rows


def plot_prep(tables: dict[str, dict], path: Path) -> None:
    """Wall time and peak RSS against rows, one line per table (e.g. before / after)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for label, table in tables.items():
        rows = [r["rows"] for r in table["rows"]]
        ax[0].plot(rows, [r["wall_s"] for r in table["rows"]], marker="o", label=label)
        ax[1].plot(rows, [r["peak_rss_mb"] for r in table["rows"]], marker="o", label=label)
    ax[0].set(xscale="log", yscale="log", xlabel="preference rows", ylabel="wall (s)", title="prep: wall time")
    ax[1].set(xscale="log", xlabel="preference rows", ylabel="peak RSS (MB)", title="prep: peak RSS", ylim=(0, None))
    for a in ax:
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["prep", "overhead"])
    ap.add_argument("--rows", default="10000,100000,1000000")
    ap.add_argument("--work", default="/tmp/rlhf-scaling")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", nargs="+", metavar="LABEL=FILE.json", default=None,
                    help="Only plot earlier --json tables (e.g. before=old.json after=new.json) to --out.")
    ap.add_argument("--runs", default=None, help=f"overhead: some of {', '.join(OVERHEAD_RUNS)} (comma-separated)")
    ap.add_argument("--out", default=str(BENCH_DIR / "results" / "scaling_prep.png"))
    args = ap.parse_args(argv)
    if args.plot:
        tables = {k: json.loads(Path(v).read_text()) for k, v in (x.split("=", 1) for x in args.plot)}
        plot_prep(tables, Path(args.out))
        print(f"wrote {args.out}")
        return 0
    if args.what == "overhead":
        rows = overhead_curve(args.runs.split(",") if args.runs else None)
        print("| run | stage compute (s) | overhead (s) | wall (s) | overhead share |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['run']} | {r['compute_s']} | {r['overhead_s']} | {r['wall_s']} | {r['overhead_share']:.1%} |")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return 0
    work = Path(args.work)
    (work / "data").mkdir(parents=True, exist_ok=True)
    results = []
    for n in (int(x) for x in args.rows.split(",")):
        r = run_prep(work / "data", n, work / f"run-{int(time.time())}")
        print(json.dumps(r), flush=True)
        results.append(r)
    table = prep_table(results)
    print("| preference rows | wall (s) | ms / 1k rows | peak RSS (MB) | RSS vs ref | time vs linear |")
    print("|---|---|---|---|---|---|")
    for r in table["rows"]:
        print(f"| {r['rows']:,} | {r['wall_s']} | {r['ms_per_1k_rows']} | {r['peak_rss_mb']} | {r['rss_vs_ref']} "
              f"| {r['time_vs_linear']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
