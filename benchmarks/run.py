"""Our stages against Hugging Face TRL on the fixed CPU workloads, alternating, with ratios.

    .venv/bin/python benchmarks/run.py [--quick] [--repeats N] [--stages sft,rm,ppo] [--workloads 1m,25m]
                                       [--json FILE]

Two workloads: `1m` (../shared/benchmarks/WORKLOAD.md: a ~1M-parameter model on ~70-token rows,
overhead-bound) and `25m` (benchmarks/WORKLOAD-25M.md: a ~25M-parameter Llama on rows of 256-512
tokens, compute-bound). For every workload, stage (SFT, reward model, PPO) and repeat it runs our
stage (`ours_side.py`) and TRL's (`trl_side.py`), each in a fresh process, alternating which goes
first, and prints:
- our rate and TRL's (median, min-max), the ratio = median of the pairwise ratios (ours / TRL of
  the same repeat, so slow spells of this shared machine hit both), min-max of those ratios;
- peak RSS of each process;
- for PPO, the split of the timed updates between generation, rollout scoring and training, for
  TRL also its forced `gc.collect()` time, and the ratio against TRL with that time taken out;
- the loss check: at equal steps our SFT and RM losses against TRL's (10-step windows), so a speed
  gain is not bought with a different computation.
`--json FILE` writes all of it, with the headline keys `sft_ratio`, `rm_ratio`, `ppo_ratio`,
`ppo_ratio_vs_no_gc` (1m) and `sft_ratio_25m`, `rm_ratio_25m`, `ppo_ratio_25m`,
`ppo_ratio_25m_vs_no_gc`. `--quick` (2 repeats of shortened stages) takes about 3 minutes for
the 1m workload; the 25m one's time is in RESULTS.md.

TRL is a benchmark-only dependency. Its side folders (trl 1.16.0 for SFT/RM, trl 1.12.0 for PPO,
since 1.13+ ship no PPO trainer) are made on first use with `pip install --no-deps --target`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
TRL_DIRS = {"1.16.0": "trl-1.16.0", "1.12.0": "trl-1.12.0"}
TRL_FOR_STAGE = {"sft": ("1.16.0", ""), "rm": ("1.16.0", ""), "ppo": ("1.12.0", "pandas tzdata")}
RATE = {"sft": "tokens_per_s", "rm": "pairs_per_s", "ppo": "episodes_per_s"}
UNIT = {"sft": "non-pad tok/s", "rm": "pairs/s", "ppo": "episodes/s"}
FULL_STEPS = {"1m": {"sft": 60, "rm": 60, "ppo": 12}, "25m": {"sft": 20, "rm": 20, "ppo": 8}}
QUICK_STEPS = {"1m": {"sft": 24, "rm": 24, "ppo": 6}, "25m": {"sft": 5, "rm": 5, "ppo": 5}}
PAGES = {"1m": "WORKLOAD.md", "25m": "WORKLOAD-25M.md"}


def trl_dir(root: Path, stage: str) -> Path:
    """The side folder holding the trl version this stage is compared with; installed when missing."""
    version, extra = TRL_FOR_STAGE[stage]
    folder = root / TRL_DIRS[version]
    if not (folder / "trl" / "__init__.py").is_file():
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(folder),
               f"trl=={version}", *extra.split()]
        print(f"installing trl {version} for the benchmark: {' '.join(cmd)}", file=sys.stderr, flush=True)
        r = subprocess.run(cmd)
        if r.returncode:
            sys.exit(f"run.py: could not install trl {version} into {folder} (exit {r.returncode}); "
                     f"run the command above by hand, or pass --trl-root to folders that hold it")
    return folder


def run_side(side: str, stage: str, steps: int, trl_root: Path, extra: list[str], workload: str = "1m") -> dict:
    script = BENCH_DIR / f"{side}_side.py"
    cmd = [sys.executable, str(script), stage, "--steps", str(steps), "--workload", workload, *extra]
    if side == "trl":
        cmd += ["--trl-dir", str(trl_dir(trl_root, stage))]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"run.py: {' '.join(cmd[1:])} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def span(xs: list[float], fmt: str) -> str:
    return f"{format(min(xs), fmt)}-{format(max(xs), fmt)}"


def loss_check(ours: list[float], trl: list[float], window: int = 10) -> dict:
    """Our loss curve against TRL's at equal steps, in windows of `window` steps.

    The two sides see the same rows in different batches (each framework shuffles its own way),
    so single steps differ by batch noise. Per window the difference of the mean losses must lie
    within 3 standard errors, the per-step noise estimated from step-to-step differences
    (var(diff)/2, which a smooth downward trend barely inflates) on both sides."""
    n = min(len(ours), len(trl))
    rows, ok = [], True
    for a in range(0, n - n % window or n, window):
        o, t = ours[a:a + window], trl[a:a + window]
        if len(o) < 3:
            continue

        def noise(xs):
            d = [y - x for x, y in zip(xs, xs[1:])]
            return statistics.pvariance(d) / 2 if len(d) > 1 else 0.0

        se = ((noise(o) + noise(t)) / len(o)) ** 0.5
        diff = statistics.mean(o) - statistics.mean(t)
        within = abs(diff) <= 3 * se + 1e-6
        ok &= within
        rows.append({"steps": f"{a + 1}-{a + len(o)}", "ours": statistics.mean(o), "trl": statistics.mean(t),
                     "diff": diff, "tolerance": 3 * se, "within": within})
    return {"ok": ok, "windows": rows, "first": [ours[0], trl[0]] if n else None}


def summarize(stage: str, pairs: list[tuple[dict, dict]]) -> dict:
    key = RATE[stage]
    ours = [o[key] for o, _ in pairs]
    trl = [t[key] for _, t in pairs]
    ratios = [o / t for o, t in zip(ours, trl)]
    out = {"ours": ours, "trl": trl, "ratios": ratios, "ratio": med(ratios),
           "ours_peak_rss_mb": [o["peak_rss_mb"] for o, _ in pairs],
           "trl_peak_rss_mb": [t["peak_rss_mb"] for _, t in pairs]}
    if stage == "ppo":
        no_gc = [t["episodes_per_s_without_gc"] for _, t in pairs]
        out["trl_without_gc"] = no_gc
        out["ratios_vs_no_gc"] = [o / t for o, t in zip(ours, no_gc)]
        out["ratio_vs_no_gc"] = med(out["ratios_vs_no_gc"])

        def split(runs, parts):
            tot = sum(r["wall_s"] for r in runs)
            return {p: sum(r[f"{p}_s"] for r in runs) / tot for p in parts}

        out["ours_split"] = split([o for o, _ in pairs], ("gen", "rollout_score", "train", "other"))
        out["trl_split"] = split([t for _, t in pairs], ("gen", "rollout_score", "gc", "train"))
        trl_no_gc = sum(t["wall_s"] - t["gc_s"] for _, t in pairs)
        out["trl_split_without_gc"] = {p: sum(t[f"{p}_s"] for _, t in pairs) / trl_no_gc
                                       for p in ("gen", "rollout_score", "train")}
    else:
        out["loss_check"] = loss_check(pairs[0][0]["losses"], pairs[0][1]["losses"])
    return out


def report(stage: str, s: dict) -> list[str]:
    fmt = ",.0f" if stage == "sft" else ".1f"
    lines = [f"{stage.upper():4s} ours {format(med(s['ours']), fmt):>8s} {UNIT[stage]} ({span(s['ours'], fmt)})"
             f"   TRL {format(med(s['trl']), fmt):>8s} ({span(s['trl'], fmt)})"
             f"   ratio {s['ratio']:.2f}x ({span(s['ratios'], '.2f')})"
             f"   peak RSS ours {med(s['ours_peak_rss_mb']):.0f} MB, TRL {med(s['trl_peak_rss_mb']):.0f} MB"]
    if stage == "ppo":
        lines.append(f"     vs TRL without its gc.collect() time: {med(s['trl_without_gc']):.1f} episodes/s, "
                     f"ratio {s['ratio_vs_no_gc']:.2f}x ({span(s['ratios_vs_no_gc'], '.2f')})")
        pct = lambda d: ", ".join(f"{k} {v:.0%}" for k, v in d.items())  # noqa: E731
        lines.append(f"     time split ours: {pct(s['ours_split'])}")
        lines.append(f"     time split TRL:  {pct(s['trl_split'])}")
        lines.append(f"     TRL without gc:  {pct(s['trl_split_without_gc'])}")
    else:
        lc = s["loss_check"]
        lines.append("     losses at equal steps (10-step means, ours / TRL): " + ", ".join(
            f"{w['steps']}: {w['ours']:.4f}/{w['trl']:.4f}" for w in lc["windows"]))
        lines.append(f"     loss check: {'same within noise' if lc['ok'] else 'DIFFERENT'} (step 1: "
                     f"{lc['first'][0]:.4f} / {lc['first'][1]:.4f}; largest |diff| "
                     f"{max(abs(w['diff']) for w in lc['windows']):.4f}, tolerance 3 standard errors)")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 repeats of shortened stages")
    parser.add_argument("--repeats", type=int, help="pairs per stage (default 3; --quick 2)")
    parser.add_argument("--stages", default="sft,rm,ppo", help="comma-separated subset of sft,rm,ppo")
    parser.add_argument("--workloads", default="1m,25m",
                        help="comma-separated subset of 1m (WORKLOAD.md) and 25m (WORKLOAD-25M.md)")
    parser.add_argument("--trl-root", type=Path, default=BENCH_DIR / ".trl",
                        help="folder for the trl side folders (default benchmarks/.trl)")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    if bad := [s for s in stages if s not in RATE]:
        parser.error(f"--stages: unknown {bad} (expected sft, rm, ppo)")
    workloads = [w for w in args.workloads.split(",") if w]
    if bad := [w for w in workloads if w not in PAGES]:
        parser.error(f"--workloads: unknown {bad} (expected 1m, 25m)")
    repeats = args.repeats or (2 if args.quick else 3)
    began = time.perf_counter()
    for s in stages:  # install before timing anything
        trl_dir(args.trl_root, s)

    out: dict = {}
    for wl in workloads:
        steps = (QUICK_STEPS if args.quick else FULL_STEPS)[wl]
        summary = compare(wl, stages, steps, repeats, args.trl_root, began, args.quick)
        suffix = "" if wl == "1m" else f"_{wl}"
        out.update({f"{s}_ratio{suffix}": summary[s]["ratio"] for s in stages})
        if "ppo" in summary:
            out[f"ppo_ratio{suffix}_vs_no_gc"] = summary["ppo"]["ratio_vs_no_gc"]
        out.setdefault("workloads", {})[wl] = summary
    total = time.perf_counter() - began
    print(f"({total:.0f} s in all)")
    out.update(quick=args.quick, repeats=repeats, seconds=total)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


def compare(wl: str, stages: list[str], steps: dict, repeats: int, trl_root: Path, began: float,
            quick: bool) -> dict:
    """Alternating pairs of one workload's stages; prints the table; returns the summary."""
    results: dict[str, list[tuple[dict, dict]]] = {s: [] for s in stages}
    for rep in range(repeats):
        for stage in stages:
            order = ("ours", "trl") if rep % 2 == 0 else ("trl", "ours")
            got = {side: run_side(side, stage, steps[stage], trl_root, [], wl) for side in order}
            results[stage].append((got["ours"], got["trl"]))
            print(f"[{time.perf_counter() - began:5.0f}s] {wl} repeat {rep + 1}/{repeats} {stage}: ours "
                  f"{got['ours'][RATE[stage]]:.1f}, TRL {got['trl'][RATE[stage]]:.1f} {UNIT[stage]}",
                  file=sys.stderr, flush=True)

    summary = {s: summarize(s, results[s]) for s in stages}
    first = results[stages[0]][0]
    versions = {**first[1]["versions"], "rlhf": first[0]["versions"]["rlhf"]}
    print(f"\nOurs vs TRL on the {PAGES[wl]} workload ({'quick: ' if quick else ''}{repeats} alternating "
          f"pairs per stage, {', '.join(f'{s} {steps[s]}' for s in stages)} steps, first 2 untimed)")
    print(f"machine: {platform.processor() or platform.machine()}, {first[0]['threads']} threads; "
          + ", ".join(f"{k} {v}" for k, v in versions.items()))
    for s in stages:
        print("\n".join(report(s, summary[s])))
    for s in stages:
        summary[s].update(steps=steps[s], versions=versions, threads=first[0]["threads"],
                          runs=[{"ours": o, "trl": t} for o, t in results[s]])
    return summary


if __name__ == "__main__":
    main()
