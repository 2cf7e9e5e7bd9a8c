"""Pipeline overhead of `rlhf run`: the share of wall time outside the stages' own compute.

    .venv/bin/python benchmarks/overhead.py [--preset demo] [--set KEY=VALUE ...] [--cold-too] [--json FILE]

Runs the user's command, `rlhf run --preset demo` (the KFP DAG on kfp.local's subprocess runner,
MLflow on sqlite, the local artifact store), in a fresh RLHF_HOME, and splits its wall time:
- stage compute: each step's own work, the `wall_s` its stage reports (run.summary.json), less
  the time that stage spent in MLflow calls (`tracking_s`, measured by the tracker);
- overhead: everything else: the KFP local runner (a Python process per step, importing torch and
  transformers, the DAG bookkeeping), MLflow (runs, params, metrics, models, registry, in and
  between the stages) and the store (committing and reading artifacts between steps).
The target (issue 5) is overhead <= 5% of the wall time. `rlhf run` forks its steps from a
preloaded server (docs/pipeline.md, "Warm steps"); `--cold-too` first runs the same command with
RLHF_WARM_STEPS=0 (a fresh Python per step, as kfp.local does) for the before/after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--cold-too", action="store_true", help="also run with cold steps first (RLHF_WARM_STEPS=0)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = measure(args.preset, args.overrides, warm=True) if not args.cold_too else {
        "cold": measure(args.preset, args.overrides, warm=False), "warm": measure(args.preset, args.overrides, warm=True)}
    if args.cold_too:
        saved = result["cold"]["overhead_s"] - result["warm"]["overhead_s"]
        print(f"warm steps: overhead {result['cold']['overhead_s']:.1f} s -> {result['warm']['overhead_s']:.1f} s "
              f"({saved:.1f} s less); wall {result['cold']['wall_s']:.1f} s -> {result['warm']['wall_s']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def measure(preset: str, overrides: list[str], warm: bool) -> dict:
    rlhf = Path(sys.executable).with_name("rlhf")
    with tempfile.TemporaryDirectory(prefix="rlhf_overhead_") as home:
        out = Path(home) / "run"
        env = {**os.environ, "RLHF_HOME": home, "RLHF_WARM_STEPS": "1" if warm else "0"}
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [str(rlhf), "run", "--preset", preset, "--output", str(out)]
        for o in overrides:
            cmd += ["--set", o]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode:
            sys.exit(f"overhead.py: {' '.join(cmd)} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
        summary = json.loads((out / "summary.json").read_text())
    stages = {k: v for k, v in summary["wall_s"].items() if k != "total"}
    tracking = summary.get("tracking_s", {})
    compute = {k: v - tracking.get(k, 0.0) for k, v in stages.items()}
    total_compute = sum(compute.values())
    overhead = wall - total_compute
    result = {
        "command": " ".join(["rlhf", *cmd[1:]]), "wall_s": wall, "stage_wall_s": stages, "stage_tracking_s": tracking,
        "stage_compute_s": compute, "compute_s": total_compute, "overhead_s": overhead,
        "overhead_share": overhead / wall, "in_stage_tracking_s": sum(tracking.values()),
        "promoted": summary.get("promoted"), "warm_steps": warm,
    }
    print(f"`{result['command']}` ({'warm' if warm else 'cold'} steps): {wall:.1f} s wall")
    print("  stage compute: " + ", ".join(f"{k} {v:.1f} s" for k, v in compute.items()) + f" = {total_compute:.1f} s")
    print(f"  MLflow calls inside the stages: {result['in_stage_tracking_s']:.1f} s ("
          + ", ".join(f"{k} {v:.1f}" for k, v in tracking.items()) + ")")
    print(f"  overhead (KFP local runner, MLflow, store; everything outside stage compute): {overhead:.1f} s = "
          f"{result['overhead_share']:.1%} of the wall time (target <= 5%)", flush=True)
    return result


if __name__ == "__main__":
    main()
