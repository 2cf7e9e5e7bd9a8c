"""`rlhf experiment kl|size|tax`: the InstructGPT paper's claims, reproduced as commands
on any task with a judge (the built-in task, or a plugin family with its gold score).

  - `kl`: a sweep of the fixed KL coefficient beta over {0, 0.01, 0.03, 0.1, 0.3} x seeds
    (no ptx, no checkpoint selection, so the curves are PPO's own). The proxy (PPO reward
    model) and gold scores of the policy on the fixed judge prompt set are plotted against
    sqrt(KL) to SFT with the functional form of Gao et al. (2022) for RL fitted to each,
    R(d) = d (alpha - beta log d). Claim: without the KL penalty the proxy rises while gold
    falls below SFT (reward hacking); at beta 0.1 gold ends above SFT.
  - `size`: the "1.3B preferred over 175B" analogue. A small PPO policy against an SFT
    model with >= 8x its parameters trained on the same demonstrations, judged on the
    held-out prompts: the small policy's decisive preference rate with its Wilson interval.
  - `tax`: the alignment tax (held-out demonstration loss, policy vs SFT) without and with
    PPO-ptx, beside each policy's decisive win rate over SFT.

Every arm is a set of `--set` overrides over a shared base per seed (prep, SFT and the
reward model trained once), run through the one dispatcher (`rlhf.dispatch`), its MLflow
runs nested under one parent run that also holds the table and the plot. `--quick`
shrinks the base and PPO to finish within 20 minutes on 2 CPU cores. The table, the
plot and the command go to `<output>/<kind>.md` (and to `docs/RESULTS.md` with
`--results`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rlhf.config import load_config

KINDS = ("kl", "size", "tax")
BETAS = (0.0, 0.01, 0.03, 0.1, 0.3)
DEFAULT_BETA = 0.1
QUICK = ["task.num_demonstrations=4000", "sft.patience=2", "reward.policy_comparisons=6000", "ppo.updates=40",
         "ppo.judge_every=4", "eval.num_prompts=200"]
"""--quick: a smaller base and shorter PPO."""
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=192"]
"""`size`: the small policy's model (the large SFT model is the preset's, or LARGE)."""
LARGE = ["model.hidden_size=192", "model.num_layers=6", "model.num_heads=4", "model.intermediate_size=576"]


@dataclass
class Arm:
    """One run of an experiment: overrides over its base, the stages it runs."""

    name: str
    seed: int
    sets: list[str]
    stages: tuple[str, ...] = ("ppo", "eval")
    base: str = "base"
    result: dict = field(default_factory=dict)


def plan(kind: str, seeds: list[int]) -> tuple[dict[str, list[str]], list[Arm]]:
    """The bases (name -> overrides; each trained once per seed) and the arms of `kind`."""
    no_select = ["ppo.select=last", "ppo.patience=null"]
    if kind == "kl":
        arms = [Arm(f"beta={b}-s{s}", s, [f"ppo.kl.init_coef={b}", "ppo.kl.adaptive=false", "ppo.ptx_coef=0",
                                          *no_select]) for s in seeds for b in BETAS]
        return {"base": []}, arms
    if kind == "tax":
        arms = [Arm(f"ptx={c}-s{s}", s, [f"ppo.ptx_coef={c}"]) for s in seeds for c in (0.0, 1.0)]
        return {"base": []}, arms
    if kind == "size":
        arms = [a for s in seeds for a in (Arm(f"small-ppo-s{s}", s, [*SMALL], ("ppo",), "small"),
                                           Arm(f"large-sft-s{s}", s, [*LARGE], (), "large"))]
        return {"small": SMALL, "large": LARGE}, arms
    raise ValueError(f"unknown experiment {kind!r}; choose one of {', '.join(KINDS)}")


def base_stages(base: str) -> tuple[str, ...]:
    """What a base trains: the stages before PPO (the large SFT model: before the reward model)."""
    from rlhf.stages.table import STAGES

    order = [n for n, s in STAGES.items() if s.standalone]
    return tuple(order[:order.index("reward" if base == "large" else "ppo")])


def run_stages(stages, root: Path, sets: list[str], preset: str, settings, parent: str,
               config_file: str | None = None) -> dict:
    """Stages through the dispatcher into `root`; the last stage's result."""
    from rlhf.dispatch import StageRequest, dispatch

    cfg = load_config(preset, config_file, sets)
    out = {}
    for name in stages:
        out = dispatch(StageRequest(name, str(root), str(root), parent_run_id=parent, quiet=True), cfg, settings)
    return out


def copy_base(base: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(base, dest, ignore=shutil.ignore_patterns("checkpoints", "ppo", "eval", "summary.json"))


# ----------------------------------------------------------------------------- analysis


def gao_fit(d: np.ndarray, r: np.ndarray) -> tuple[float, float] | None:
    """Least squares of r = d (alpha - beta log d) over d > 0 (Gao et al. 2022, RL)."""
    keep = d > 1e-6
    if keep.sum() < 2:
        return None
    d, r = d[keep], r[keep]
    X = np.stack([d, -d * np.log(d)], 1)
    (alpha, beta), *_ = np.linalg.lstsq(X, r, rcond=None)
    return float(alpha), float(beta)


def kl_table(arms: list[Arm]) -> list[dict]:
    rows = []
    for a in arms:
        curve = a.result["judge_curve"]  # [update, judge, proxy, sqrt_kl]
        rows.append({"arm": a.name, "beta": float(a.sets[0].split("=")[1]), "seed": a.seed,
                     "sqrt_kl": curve[-1][3], "gold_sft": curve[0][1], "gold_final": curve[-1][1],
                     "gold_peak": max(c[1] for c in curve), "proxy_start": curve[0][2], "proxy_final": curve[-1][2],
                     "gold_minus_sft": curve[-1][1] - curve[0][1], "proxy_gain": curve[-1][2] - curve[0][2]})
    return rows


def kl_claims(rows: list[dict]) -> dict:
    hacked = [r for r in rows if r["beta"] == 0.0]
    default = [r for r in rows if r["beta"] == DEFAULT_BETA]
    return {"beta0_gold_below_sft_and_proxy_up": all(r["gold_minus_sft"] < 0 and r["proxy_gain"] > 0 for r in hacked),
            f"beta{DEFAULT_BETA}_gold_above_sft": all(r["gold_minus_sft"] > 0 for r in default)}


def plot_kl(arms: list[Arm], path: Path) -> dict:
    """Proxy and gold gain over SFT against sqrt(KL), each beta a colour, Gao fits over all points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4.5))
    pts = {"gold": ([], []), "proxy": ([], [])}
    for i, beta in enumerate(BETAS):
        for a in [a for a in arms if a.sets[0] == f"ppo.kl.init_coef={beta}"]:
            c = np.array(a.result["judge_curve"])
            for j, (key, col) in enumerate((("gold", 1), ("proxy", 2))):
                d, r = c[:, 3], c[:, col] - c[0, col]
                ax[j].plot(d, r, "o-", color=f"C{i}", ms=3, label=f"beta={beta}" if a.seed == arms[0].seed else None)
                pts[key][0].extend(d)
                pts[key][1].extend(r)
    fits = {}
    for j, key in enumerate(("gold", "proxy")):
        d, r = np.array(pts[key][0]), np.array(pts[key][1])
        fit = gao_fit(d, r)
        fits[key] = fit
        if fit is not None:
            x = np.linspace(1e-3, max(d.max(), 1e-2), 100)
            ax[j].plot(x, x * (fit[0] - fit[1] * np.log(x)), "k--", label=f"d(α-β log d): α={fit[0]:.2f} β={fit[1]:.2f}")
        ax[j].axhline(0, color="grey", lw=0.5)
        ax[j].set(xlabel="sqrt(KL(policy || SFT))", ylabel=f"{key} score - SFT's",
                  title=f"{'gold (judge)' if key == 'gold' else 'proxy (PPO reward model)'} vs sqrt(KL)")
        ax[j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fits


def wilson(wins: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = wins / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (
        1 + z * z / n)
    return centre - half, centre + half


def markdown(kind: str, rows: list[dict], extra: dict, command: str, wall: float) -> str:
    keys = list(rows[0]) if rows else []
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"### `rlhf experiment {kind}`", "", f"    {command}", "",
             f"Wall time {wall / 60:.1f} min on this machine.", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    lines += ["", "```", json.dumps(extra, indent=1, default=str), "```", "", f"![{kind}]({kind}.png)", ""]
    return "\n".join(lines)


def params_of(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def size_comparison(small_root: Path, large_root: Path, preset: str, sets: list[str], seed: int) -> dict:
    """The small PPO policy against the large SFT model on the held-out prompts, decoded
    as eval decodes, judged by the task's gold judge."""
    import torch

    from rlhf.data.prepared import PrepData
    from rlhf.data.tasks.judge import build_judge
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.models.chat import chat_format
    from rlhf.models.rollout import decode_responses
    from rlhf.stages.evaluate import compare, decode_same_way
    from rlhf.stages.judging import scores_everything
    from rlhf.train.seed import seed_everything

    cfg = load_config(preset, overrides=[*sets, f"seed={seed}"])
    rows = PrepData(_DirStore(small_root)).rows("prompt_eval")[: cfg.eval.num_prompts]
    judge = build_judge(cfg)
    if not scores_everything(judge, rows):
        raise ValueError("rlhf experiment size needs a task with a gold judge (the built-in task or a plugin family)")
    texts = {}
    for name, d in (("small", small_root / "ppo/model"), ("large", large_root / "sft/model")):
        tok, model = load_tokenizer(str(d), cfg.model), load_causal_lm(str(d), cfg.model).eval()
        fmt = chat_format(tok, cfg.model, str(d))
        with torch.no_grad():
            texts[name] = [t for ro in decode_same_way(model, fmt, rows, cfg.eval, seed, "cpu")
                           for t in decode_responses(tok, ro)]
    seed_everything(seed)
    small = np.array([judge.score(r.prompt, t) for r, t in zip(rows, texts["small"])])
    large = np.array([judge.score(r.prompt, t) for r, t in zip(rows, texts["large"])])
    c = compare(small, large)
    return {"seed": seed, "small_params": params_of(small_root / "ppo/model"),
            "large_params": params_of(large_root / "sft/model"), "prompts": len(rows),
            "small_gold": float(small.mean()), "large_gold": float(large.mean()),
            "decisive_comparisons": c["decisive_comparisons"], "small_preferred": c["decisive_win_rate"],
            "lower95": c["decisive_win_rate_lower"], "upper95": c["decisive_win_rate_upper"], "tie_rate": c["tie_rate"]}


class _DirStore:
    """The smallest store `PrepData` reads through: a local folder."""

    def __init__(self, root: Path):
        self.root = root

    def get_dir(self, prefix: str) -> Path:
        return self.root / prefix


def _done(root: Path, stage: str) -> bool:
    return (root / stage / "result.json").is_file()


def run_experiment(kind: str, *, preset: str, quick: bool, seeds: list[int], sets: list[str], output: str,
                   settings, results: str | None = None, command: str = "", config_file: str | None = None) -> dict:
    """Bases, then arms (a stage already done in the output folder is not run again), then
    the table, the plot and the claims; all under one MLflow parent run."""
    from rlhf.adapters.tracking import _client, finish_pipeline_run, start_pipeline_run, tracking_uri_for

    t0, out = time.time(), Path(output)
    out.mkdir(parents=True, exist_ok=True)
    common = [*(QUICK if quick else []), *sets]
    bases, arms = plan(kind, seeds)
    cfg = load_config(preset, config_file, common)
    uri, run_id = tracking_uri_for(cfg, settings), f"experiment-{kind}-{out.resolve().name}"
    parent = start_pipeline_run(uri, cfg.tracking.experiment, run_id, f"experiment-{kind}", cfg.model_dump(),
                                {"rlhf.experiment": kind, "rlhf.command": command[:5000]})
    try:
        for seed in seeds:
            for name, bsets in bases.items():
                root = out / f"{name}-s{seed}"
                if name == "large" and not _done(root, "prep"):
                    root.mkdir(parents=True, exist_ok=True)
                    shutil.copytree(out / f"small-s{seed}" / "prep", root / "prep", dirs_exist_ok=True)
                todo = [s for s in base_stages(name) if not _done(root, s)]
                run_stages(todo, root, [*common, *bsets, f"seed={seed}"], preset, settings, parent, config_file)
        for arm in arms:
            root = out / "arms" / arm.name
            if arm.stages and not all(_done(root, s) for s in arm.stages):
                copy_base(out / f"{arm.base}-s{arm.seed}", root)
                run_stages(arm.stages, root, [*common, *arm.sets, f"seed={arm.seed}"], preset, settings, parent,
                           config_file)
            arm.result = {**(json.loads((root / "ppo/result.json").read_text()) if _done(root, "ppo") else {}),
                          **(json.loads((root / "summary.json").read_text()) if (root / "summary.json").is_file()
                             else {})}
        report = analyse(kind, arms, out, preset, common, seeds)
        report.update(wall_s=time.time() - t0, command=command, output=str(out))
        (out / f"{kind}.json").write_text(json.dumps(report, indent=1, default=str))
        md = markdown(kind, report["rows"], {k: v for k, v in report.items() if k not in ("rows", "command")},
                      command, report["wall_s"])
        (out / f"{kind}.md").write_text(md)
        client = _client(uri)
        for name in (f"{kind}.json", f"{kind}.md", f"{kind}.png"):
            if (out / name).is_file():
                client.log_artifact(parent, str(out / name), "experiment")
        client.log_metric(parent, "experiment/wall_s", report["wall_s"])
        if results:
            write_results(Path(results), kind, md, out / f"{kind}.png")
        finish_pipeline_run(uri, cfg.tracking.experiment, run_id, True)
        return report
    except BaseException as e:
        finish_pipeline_run(uri, cfg.tracking.experiment, run_id, False, f"{type(e).__name__}: {e}")
        raise


def analyse(kind: str, arms: list[Arm], out: Path, preset: str, common: list[str], seeds: list[int]) -> dict:
    if kind == "kl":
        rows = kl_table(arms)
        return {"rows": rows, "claims": kl_claims(rows), "gao_fits": plot_kl(arms, out / "kl.png")}
    if kind == "tax":
        keys = ("eval/alignment_tax", "eval/alignment_tax_rel", "eval/heldout_loss_sft", "eval/heldout_loss_policy",
                "eval/decisive_win_rate_vs_sft", "eval/decisive_win_rate_lower_vs_sft", "eval/judge_delta")
        rows = [{"arm": a.name, "ptx_coef": float(a.sets[0].split("=")[1]), "seed": a.seed,
                 **{k.split("/")[1]: a.result.get(k) for k in keys}} for a in arms]
        with_ptx = [r for r in rows if r["ptx_coef"] > 0]
        return {"rows": rows, "claims": {"ptx_tax_rel_at_most_2pct": all(r["alignment_tax_rel"] <= 0.02
                                                                          for r in with_ptx)}}
    rows = [size_comparison(out / "arms" / f"small-ppo-s{s}", out / f"large-s{s}", preset, [*common, *SMALL], s)
            for s in seeds]
    return {"rows": rows, "claims": {"small_preferred_in_most_decisive": all(r["small_preferred"] > 0.5 for r in rows),
                                     "large_at_least_8x": all(r["large_params"] >= 8 * r["small_params"]
                                                              for r in rows)}}


def write_results(path: Path, kind: str, md: str, png: Path) -> None:
    """Replace (or add) this experiment's section of RESULTS.md, its plot beside it."""
    begin, end = f"<!-- rlhf experiment {kind} -->", f"<!-- /rlhf experiment {kind} -->"
    text = path.read_text() if path.is_file() else "# Results of `rlhf experiment`\n\n"
    block = f"{begin}\n{md}\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    if png.is_file():
        shutil.copy(png, path.parent / png.name)
