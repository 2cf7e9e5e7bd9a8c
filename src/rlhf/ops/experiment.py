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
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rlhf.config import ConfigError, load_config

KINDS = ("kl", "size", "tax")
BETAS = (0.0, 0.01, 0.03, 0.1, 0.3)
DEFAULTS = {"kl": ["ppo.lr=2e-4"]}
"""Per experiment, before the user's --set (which may change them). The kl sweep's PPO steps 4x harder than the default (lr 5e-5), so that within its
updates beta 0 reaches the over-optimisation region (demo task, --quick, seed 0: at lr
2e-5 gold still rose at beta 0, sqrt(KL) 0.8; at 1e-4 it ended 0.016 below SFT; at 2e-4
0.084 below, while at beta 0.1 it ended 0.08 above)."""
DEFAULT_BETA = 0.1
QUICK = ["task.num_demonstrations=4000", "sft.patience=2", "reward.policy_comparisons=6000", "ppo.updates=40",
         "ppo.judge_every=4", "eval.num_prompts=200"]
"""--quick: a smaller base and shorter PPO."""
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=192"]
"""`size`: the small policy's model (the large SFT model is the preset's, or LARGE)."""
LARGE = ["model.hidden_size=192", "model.num_layers=6", "model.num_heads=4", "model.intermediate_size=576",
         "sft.lr=5e-4", "sft.patience=4"]
"""The large SFT model at a third of the SFT learning rate (its width is 3x the small one's) and
with more patience: at the small model's settings (--quick, seed 0) it stopped at held-out
loss 0.95 against the small SFT model's 0.75 and scored below it on gold (0.49 vs 0.55), a
baseline too weak to show anything."""


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
    raise ConfigError(f"unknown experiment {kind!r}; choose one of {', '.join(KINDS)}")


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2], or a clear error."""
    try:
        seeds = [int(s) for s in str(text).replace(" ", "").split(",") if s]
    except ValueError:
        raise ConfigError(f"seeds {text!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not seeds:
        raise ConfigError("rlhf experiment: give at least one seed, e.g. 0 or 0,1,2")
    return seeds


def base_stages(base: str) -> tuple[str, ...]:
    """What a base trains: the stages before PPO (the large SFT model: before the reward model)."""
    from rlhf.stages.table import STAGES

    order = [n for n, s in STAGES.items() if s.standalone]
    return tuple(order[:order.index("reward" if base == "large" else "ppo")])


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


def markdown(kind: str, rows: list[dict], extra: dict, command: str, wall: float, stage_s: float,
             plot: bool) -> str:
    keys = list(rows[0]) if rows else []
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"### `rlhf experiment {kind}`", "", f"    {command}", "",
             f"Wall time {wall / 60:.1f} min on this machine, of which the stages' own work "
             f"{stage_s / 60:.1f} min (a resumed experiment's wall time includes its pauses).", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    lines += ["", "```", json.dumps(extra, indent=1, default=str), "```", ""]
    lines += [f"![{kind}]({kind}.png)", ""] if plot else []
    return "\n".join(lines)


def params_of(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def size_comparison(seed: int, data_root: str, small_root: str, large_root: str, rec: dict, settings) -> dict:
    """The small PPO policy against the large SFT model on the held-out prompts, decoded
    as eval decodes, judged by the task's gold judge (the small SFT model's gold score
    beside them: the larger model is the stronger SFT baseline)."""
    import torch

    from rlhf.adapters.store import open_store
    from rlhf.data.prepared import PrepData
    from rlhf.data.tasks.judge import build_judge
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.models.chat import chat_format
    from rlhf.models.rollout import decode_responses
    from rlhf.stages.evaluate import compare, decode_same_way
    from rlhf.stages.judging import scores_everything

    cfg = load_config(rec["preset"] or None, None, [*rec["sets"], *SMALL, f"seed={seed}"], config_dict=rec["config"])
    rows = PrepData(open_store(data_root, settings)).rows("prompt_eval")[: cfg.eval.num_prompts]
    judge = build_judge(cfg)
    if not scores_everything(judge, rows):
        raise ConfigError("rlhf experiment size needs a task with a gold judge (the built-in task or a plugin family)")
    texts, params = {}, {}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the report step runs where eval does
    for name, root, prefix in (("small", small_root, "ppo/model"), ("large", large_root, "sft/model"),
                               ("small_sft", data_root, "sft/model")):
        d = open_store(root, settings).get_dir(prefix)
        tok, model = load_tokenizer(str(d), cfg.model), load_causal_lm(str(d), cfg.model).to(device).eval()
        fmt, params[name] = chat_format(tok, cfg.model, str(d)), params_of(d)
        with torch.no_grad():
            texts[name] = [t for ro in decode_same_way(model, fmt, rows, cfg.eval, seed, device)
                           for t in decode_responses(tok, ro)]
    small = np.array([judge.score(r.prompt, t) for r, t in zip(rows, texts["small"])])
    large = np.array([judge.score(r.prompt, t) for r, t in zip(rows, texts["large"])])
    small_sft = np.array([judge.score(r.prompt, t) for r, t in zip(rows, texts["small_sft"])])
    c = compare(small, large)
    return {"seed": seed, "small_params": params["small"], "large_params": params["large"], "prompts": len(rows),
            "small_gold": float(small.mean()), "large_gold": float(large.mean()),
            "small_sft_gold": float(small_sft.mean()),  # the large SFT model should beat it: a fair baseline
            "decisive_comparisons": c["decisive_comparisons"], "small_preferred": c["decisive_win_rate"],
            "lower95": c["decisive_win_rate_lower"], "upper95": c["decisive_win_rate_upper"], "tie_rate": c["tie_rate"]}


# ----------------------------------------------------------------------------- steps
# The command runs these in order in one process; the KFP pipeline (`rlhf.pipelines.experiment`)
# runs them as steps, bases per seed and arms in ParallelFor loops. All state is in the
# experiment's store (a folder or s3:// prefix): `experiment.json`, one root per base and arm.

RECORD = "experiment.json"
MODEL_PREFIXES = ("sft/model", "reward/model", "reward/judge_model")
"""What an arm takes from its base (data prep is read from the base's root in place)."""


def start(kind: str, *, preset: str, quick: bool, seeds: list[int], sets: list[str], output: str, settings,
          command: str = "", config_dict: dict | None = None, run_id: str | None = None) -> list[dict]:
    """Validate, record the experiment in its store, open the MLflow parent run; one spec
    per seed (what a base step takes). A second start on the same output resumes it."""
    from rlhf.adapters.store import open_store
    from rlhf.adapters.tracking import start_pipeline_run, tracking_uri_for

    plan(kind, seeds)  # an unknown kind fails here
    if not seeds:
        raise ConfigError("rlhf experiment: give at least one seed, e.g. 0 or 0,1,2")
    common = [*(QUICK if quick else []), *DEFAULTS.get(kind, []), *sets]
    cfg = load_config(preset or None, None, common, config_dict=config_dict)
    if kind == "size" and not cfg.uses_builtin_task:  # found now, not after every model is trained
        raise ConfigError("rlhf experiment size judges with the task's gold judge: use the built-in task or a "
                          "plugin family (task.families), not data.sft_path / data.preference_path")
    store = open_store(output, settings)
    run_id = run_id or f"experiment-{kind}-{uuid.uuid4().hex[:12]}"  # finds the parent run again on a resume
    if store.exists(RECORD):
        old = store.read_json(RECORD)
        if (old["kind"], old["sets"], old["preset"], old["seeds"], old["config"]) != (
                kind, common, preset, seeds, config_dict):
            raise ConfigError(f"{store.uri(RECORD)} holds another experiment ({old['kind']}, seeds {old['seeds']}, "
                              f"--set {old['sets']}, preset {old['preset']!r}, its own config file); give this one "
                              "its own --output")
        run_id = old["run_id"]
    parent = start_pipeline_run(tracking_uri_for(cfg, settings), cfg.tracking.experiment, run_id,
                                f"experiment-{kind}", cfg.model_dump(),
                                {"rlhf.experiment": kind, "rlhf.command": command[:5000], "rlhf.run": store.uri("")})
    if not store.exists(RECORD):
        store.write_json(RECORD, {"kind": kind, "preset": preset, "quick": quick, "seeds": seeds, "sets": common,
                                  "config": config_dict, "run_id": run_id, "parent_run_id": parent,
                                  "command": command, "started": time.time()})
    return [{"output": output, "seed": s} for s in seeds]


def _record(output: str, settings):
    from rlhf.adapters.store import open_store

    store = open_store(output, settings)
    return store, store.read_json(RECORD)


def _root(output: str, *parts: str) -> str:
    return "/".join([output.rstrip("/"), *parts])


def _run_stages(rec: dict, stages, root: str, prep_root: str, sets: list[str], settings) -> None:
    from rlhf.adapters.store import open_store
    from rlhf.dispatch import StageRequest, dispatch

    cfg = load_config(rec["preset"] or None, None, [*rec["sets"], *sets], config_dict=rec["config"])
    store = open_store(root, settings)
    for name in stages:
        if not store.exists(f"{name}/result.json"):  # done before (a retried step, a resumed experiment)
            dispatch(StageRequest(name, root, prep_root, parent_run_id=rec["parent_run_id"], quiet=True), cfg,
                     settings)


def train_bases(spec: dict, settings) -> list[dict]:
    """One seed's bases (prep, SFT, reward model; `size`'s large model: SFT on the small
    base's data); the specs of the seed's arms."""
    _, rec = _record(spec["output"], settings)
    seed = int(spec["seed"])
    bases, arms = plan(rec["kind"], [seed])
    for name, bsets in bases.items():
        root = _root(spec["output"], f"{name}-s{seed}")
        prep_root = _root(spec["output"], f"small-s{seed}") if name == "large" else root
        stages = [s for s in base_stages(name) if not (name == "large" and s == "prep")]
        _run_stages(rec, stages, root, prep_root, [*bsets, f"seed={seed}"], settings)
    return [{"output": spec["output"], "seed": seed, "arm": a.name} for a in arms if a.stages]


def _arm(rec: dict, seed: int, name: str) -> Arm:
    return next(a for a in plan(rec["kind"], [seed])[1] if a.name == name)


def train_arm(spec: dict, settings) -> dict:
    """One arm: its base's models copied into its root, then its stages with its overrides."""
    from rlhf.adapters.store import open_store

    _, rec = _record(spec["output"], settings)
    arm = _arm(rec, int(spec["seed"]), spec["arm"])
    base_root, root = _root(spec["output"], f"{arm.base}-s{arm.seed}"), _root(spec["output"], "arms", arm.name)
    base, store = open_store(base_root, settings), open_store(root, settings)
    for prefix in MODEL_PREFIXES:
        if base.is_committed(prefix) and not store.is_committed(prefix):
            copy_artifact(base, store, prefix)
    _run_stages(rec, arm.stages, root, base_root, [*arm.sets, f"seed={arm.seed}"], settings)
    return store.read_json(f"{arm.stages[-1]}/result.json")


def copy_artifact(src, dest, prefix: str) -> None:
    """A committed folder from one store to another (verified on the way out, a new
    manifest and commit marker on the way in)."""
    import tempfile

    from rlhf.adapters.store import COMMIT_MARKER, MANIFEST

    with tempfile.TemporaryDirectory(prefix="rlhf-exp-") as tmp:
        local = src.get_dir(prefix, Path(tmp) / "a")
        for marker in (MANIFEST, COMMIT_MARKER):
            (local / marker).unlink(missing_ok=True)
        dest.put_dir(local, prefix, move=True)


def stage_seconds(output: str, rec: dict, settings) -> float:
    """The stages' own wall time, summed over bases and arms (what the experiment cost,
    without the pauses of a resumed run; on a cluster, more than its wall time)."""
    from rlhf.adapters.store import open_store

    seeds = [int(s) for s in rec["seeds"]]
    bases, arms = plan(rec["kind"], seeds)
    where = [(_root(output, f"{b}-s{s}"), base_stages(b)) for s in seeds for b in bases]
    where += [(_root(output, "arms", a.name), a.stages) for a in arms if a.stages]
    total = 0.0
    for root, stages in where:
        store = open_store(root, settings)
        total += sum(store.read_json(f"{st}/result.json").get("wall_s", 0.0) for st in stages
                     if store.exists(f"{st}/result.json"))
    return total


def report(output: str, settings, results: str | None = None) -> dict:
    """The table, the plot and the claims from every arm's result; into the experiment's
    store and its MLflow parent run (closed FINISHED), and into RESULTS.md if asked."""
    import tempfile

    from rlhf.adapters.store import open_store
    from rlhf.adapters.tracking import _client, finish_pipeline_run, tracking_uri_for

    store, rec = _record(output, settings)
    kind, seeds = rec["kind"], [int(s) for s in rec["seeds"]]
    arms = plan(kind, seeds)[1]
    for arm in [a for a in arms if a.stages]:
        a = open_store(_root(output, "arms", arm.name), settings)
        arm.result = {**(a.read_json("ppo/result.json") if a.exists("ppo/result.json") else {}),
                      **(a.read_json("summary.json") if a.exists("summary.json") else {})}
    cfg = load_config(rec["preset"] or None, None, rec["sets"], config_dict=rec["config"])
    uri = tracking_uri_for(cfg, settings)
    with tempfile.TemporaryDirectory(prefix="rlhf-exp-") as tmp:
        out = Path(tmp)
        rep = analyse(kind, arms, out, output, rec, settings)
        rep.update(wall_s=time.time() - rec["started"], stage_s=stage_seconds(output, rec, settings),
                   command=rec["command"], output=store.uri(""))
        (out / f"{kind}.json").write_text(json.dumps(rep, indent=1, default=str))
        md = markdown(kind, rep["rows"], {k: v for k, v in rep.items() if k not in ("rows", "command")},
                      rec["command"], rep["wall_s"], rep["stage_s"], (out / f"{kind}.png").is_file())
        (out / f"{kind}.md").write_text(md)
        client = _client(uri)
        for name in (f"{kind}.json", f"{kind}.md", f"{kind}.png"):
            if (out / name).is_file():
                store.write_bytes(name, (out / name).read_bytes())
                client.log_artifact(rec["parent_run_id"], str(out / name), "experiment")
        client.log_metric(rec["parent_run_id"], "experiment/wall_s", rep["wall_s"])
    if results:
        results_from_store(output, settings, results)
    finish_pipeline_run(uri, cfg.tracking.experiment, rec["run_id"], True)
    return rep


def fail(output: str, settings, error: str) -> None:
    """Close the parent run FAILED (the exit step of a failed experiment)."""
    from rlhf.adapters.tracking import finish_pipeline_run, tracking_uri_for

    _, rec = _record(output, settings)
    cfg = load_config(rec["preset"] or None, None, rec["sets"], config_dict=rec["config"])
    finish_pipeline_run(tracking_uri_for(cfg, settings), cfg.tracking.experiment, rec["run_id"], False, error)


def run_experiment(kind: str, *, preset: str, quick: bool, seeds: list[int], sets: list[str], output: str,
                   settings, results: str | None = None, command: str = "", config_dict: dict | None = None) -> dict:
    """The whole experiment in this process: bases, then arms (a stage already done in the
    output is not run again), then the report."""
    specs = start(kind, preset=preset, quick=quick, seeds=seeds, sets=sets, output=output, settings=settings,
                  command=command, config_dict=config_dict)
    try:
        for spec in specs:
            for arm in train_bases(spec, settings):
                train_arm(arm, settings)
        return report(output, settings, results)
    except BaseException as e:
        fail(output, settings, f"{type(e).__name__}: {e}")
        raise


def analyse(kind: str, arms: list[Arm], out: Path, output: str, rec: dict, settings) -> dict:
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
    rows = [size_comparison(a.seed, _root(output, f"small-s{a.seed}"), _root(output, "arms", a.name),
                            _root(output, f"large-s{a.seed}"), rec, settings) for a in arms if a.base == "small"]
    return {"rows": rows, "claims": {"small_preferred_in_most_decisive": all(r["small_preferred"] > 0.5 for r in rows),
                                     "large_at_least_8x": all(r["large_params"] >= 8 * r["small_params"]
                                                              for r in rows)}}


def results_from_store(output: str, settings, results: str) -> None:
    """The experiment's report (in its store) into a RESULTS.md section, its plot beside it."""
    import tempfile

    store, rec = _record(output, settings)
    with tempfile.TemporaryDirectory(prefix="rlhf-exp-") as tmp:
        png = Path(tmp) / f"{rec['kind']}.png"
        if store.exists(png.name):
            png.write_bytes(store.read_bytes(png.name))
        write_results(Path(results), rec["kind"], store.read_bytes(f"{rec['kind']}.md").decode(), png)


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
