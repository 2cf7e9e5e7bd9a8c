"""What a run says about itself in the Kubeflow UI, without MLflow.

- `headline_metrics`: a step's headline numbers (its `headline` paths in the table of
  stages) under names KFP accepts: `rm/accuracy` -> `rm_accuracy`, sft's
  `best_eval_loss` -> `sft_best_eval_loss`, a `[lo, hi]` interval -> `..._lo`/`..._hi`.
  The component logs them as the step's `dsl.Metrics`.
- `pair_classification`: the reward model's held-out pairs as a confusion matrix and an
  ROC curve (the reward step's `dsl.ClassificationMetrics`).
- `eval_report` / `write_report`: eval's Markdown page (the eval step's `dsl.Markdown`,
  also `eval/report.md` in the run's store and `report.md` in the eval MLflow run): the
  gate's verdict, its checks and reasons, the win rates with their intervals by the
  independent judge and by the proxy reward model, KL and alignment tax, the champion
  comparison, PPO's curves (a PNG inside the page) and a samples table.

The Kubeflow UI renders Markdown with markdown-to-jsx, raw HTML off, and cuts the text
at 400,000 characters (`MAX_MARKDOWN_STR_LENGTH` of its MarkdownViewer), so the page is
plain Markdown, the image a `data:image/png` URI, and model text is escaped.
"""

from __future__ import annotations

import base64
import io
import math
import re
import unicodedata

import numpy as np

from rlhf.stages.gate import gate_checks
from rlhf.stages.table import STAGES

REPORT_KEY = "eval/report.md"
"""Where eval leaves its Markdown report in the run's store."""
MARKDOWN_LIMIT = 400_000
"""The Kubeflow UI shows at most this many characters of a Markdown artifact."""
SAMPLE_ROWS = 20
CELL_CHARS = 160
PPO_HISTORY = ("ppo/reward", "ppo/kl", "ppo/beta", "ppo/gold_score", "ppo/judge_score", "ppo/judge_proxy")
"""PPO's per-update metrics kept in `ppo/history.json` (`rlhf.train.loop.Loop(history=...)`): the curves here."""
JUDGES = {"gold": "gold judge (the task's)", "heldout_reward_model": "held-out reward model",
          "reward_model": "PPO's reward model (no independent judge)"}


# ----------------------------------------------------------------------------- dsl.Metrics


def metric_name(stage: str, keys: tuple[str, ...]) -> str:
    """A KFP metric name for the value at `keys` of `stage`'s result: a namespaced key
    keeps its namespace (`last_metrics`, `ppo/kl` -> `ppo_kl`), any other gets the stage's
    (`best_eval_loss` -> `sft_best_eval_loss`); characters other than letters, digits and
    `_` become `_`."""
    name = keys[-1] if "/" in keys[-1] else "_".join((stage, *keys))
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def _resolve(obj, keys: list[str], seen: tuple[str, ...] = ()):
    """(keys, value) at a path; `*` takes every key of a dict."""
    if not keys:
        yield seen, obj
        return
    if not isinstance(obj, dict):
        return
    head, rest = keys[0], keys[1:]
    for key in (sorted(obj) if head == "*" else [head] if head in obj else []):
        yield from _resolve(obj[key], rest, (*seen, key))


def headline_metrics(stage: str, result: dict) -> dict[str, float]:
    """The headline numbers of `stage`'s step (the table's `headline`): finite numbers and
    flags (1.0/0.0) only; a missing, None, NaN or infinite value is left out (KFP stores
    metrics as JSON, which has no NaN), and a two-element list is an interval `_lo`/`_hi`."""
    out: dict[str, float] = {}
    for path in STAGES[stage].headline:
        for keys, value in _resolve(result, path.split(".")):
            name = metric_name(stage, keys)
            parts = (zip(("_lo", "_hi"), value) if isinstance(value, (list, tuple)) and len(value) == 2
                     else [("", value)])
            for suffix, v in parts:
                if isinstance(v, bool):
                    v = float(v)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    out[name + suffix] = float(v)
    return out


# ----------------------------------------------------------------------------- dsl.ClassificationMetrics

CATEGORIES = ["chosen better", "rejected better"]


def pair_classification(margins, chosen_better, truth: str, max_points: int = 101) -> dict:
    """The reward model's held-out comparisons as a two-class problem.

    Each pair (labelled chosen, labelled rejected) is an example; its true class is which
    of the two answers is better by `truth` (`judge`: the task's judge, on the pairs it
    does not tie; `labels`: the labels, when there is no judge: then every pair is
    "chosen better" and there is no ROC curve), and the reward model predicts "chosen
    better" when its margin r(chosen) - r(rejected) is above 0. Rows of the confusion
    matrix are the truth, columns the reward model's call, so its diagonal share is
    `rm/accuracy` (`rm/label_accuracy` by labels), and the row "rejected better" counts the
    pairs the labellers got wrong. The ROC curve moves the margin threshold; its area is
    the chance that a pair the judge calls "chosen better" gets a larger margin than one it
    calls "rejected better". The curve is over margins, not raw scores: a reward model's
    score is defined up to a shift per prompt (InstructGPT eq. 1 sees only differences)."""
    m, y = np.asarray(margins, dtype=float), np.asarray(chosen_better, dtype=bool)  # (P,), (P,)
    pred = m > 0
    matrix = [[int((y & pred).sum()), int((y & ~pred).sum())], [int((~y & pred).sum()), int((~y & ~pred).sum())]]
    out = {"truth": truth, "categories": list(CATEGORIES), "matrix": matrix, "pairs": int(len(m)), "roc": None,
           "auc": None}
    if not (y.any() and (~y).any()):
        return out
    order = np.argsort(-m, kind="stable")
    m_sorted, y_sorted = m[order], y[order]
    last = np.r_[np.nonzero(np.diff(m_sorted))[0], len(m) - 1]  # the last pair at each distinct margin
    tpr = np.r_[0.0, np.cumsum(y_sorted)[last] / y.sum()]
    fpr = np.r_[0.0, np.cumsum(~y_sorted)[last] / (~y).sum()]
    thresholds = np.r_[m_sorted[0] + 1.0, m_sorted[last]]  # predict "chosen better" at margin >= threshold
    out["auc"] = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(max_points, len(fpr))).round().astype(int))
    out["roc"] = {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist(), "threshold": thresholds[keep].tolist()}
    return out


# ----------------------------------------------------------------------------- Markdown: formatting

_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+!|~&$])")
_SHOWN = {"\n": " ↵ ", "\r": "\\r", "\t": "\\t"}


def escape(text: str, limit: int | None = None) -> str:
    """Model (or user) text as literal inline Markdown, safe in a table cell: Markdown and
    HTML punctuation backslash-escaped (`|` cannot end a cell, `<` cannot open a tag, `&`
    cannot start an entity), a line break shown as ↵, other control characters and
    invisible format characters (bidi overrides, zero-width) as their escape (`\\r`,
    `\\x14`, `\\u202e`) so they can neither reorder nor hide text; cut to `limit`
    characters with an ellipsis."""
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    out = []
    for ch in text:
        if ch in _SHOWN:
            out.append(_SHOWN[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs", "Cn", "Zl", "Zp"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return _SPECIAL.sub(r"\\\1", "".join(out))


def num(x, digits: int = 3, signed: bool = False) -> str:
    """A number for the page: `–` when missing, NaN and infinities spelled out."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:+d}" if signed else str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        if math.isinf(x):
            return "+∞" if x > 0 else "−∞"
        return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"
    return escape(str(x))


def interval(lo, hi, digits: int = 3) -> str:
    return "–" if lo is None or hi is None else f"[{num(lo, digits)}, {num(hi, digits)}]"


def table(header: list[str], rows: list[list[str]], align: str = "") -> str:
    """A Markdown table; cells are Markdown already (escape text first). `align`: one of
    `l`, `r`, `c` per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule[a] for a in align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def judge_label(name) -> str:
    return escape(JUDGES.get(name, str(name or "–")))


def pct(x, signed: bool = True) -> str:
    return "–" if x is None or not isinstance(x, (int, float)) or not math.isfinite(x) else (
        f"{100 * x:+.2f}%" if signed else f"{100 * x:.1f}%")


# ----------------------------------------------------------------------------- Markdown: the sections


def verdict_section(s: dict, gate, run: str = "") -> str:
    """The verdict first: passed or refused, the reasons (as the registry's tag lists them)
    and every check of the gate with this run's number and the rule."""
    passed, reasons = s.get("gate/passed"), list(s.get("gate/reasons") or [])
    lines = ["# RLHF evaluation: policy vs SFT", ""]
    if run:
        lines += [f"Run `{run.replace('`', '')}`", ""]
    if passed:
        lines.append("**Gate: passed.** Every check below holds, so the pipeline's promote step registers the policy "
                     "and moves `@champion` to it.")
    else:
        n = "this reason" if len(reasons) == 1 else f"these {len(reasons)} reasons"
        lines += [f"**Gate: refused.** The pipeline registers the policy without moving `@champion`, tagged with "
                  f"{n} (`rlhf.gate_reasons`):", ""]
        lines += [f"{i}. {escape(r)}" for i, r in enumerate(reasons, 1)]
    if gate is not None:
        rows = [[escape(c.name), num(c.value), escape(c.rule), "✓ pass" if c.passed else "✗ **fail**"]
                for c in gate_checks(s, gate)]
        lines += ["", table(["check", "this run", "rule", "result"], rows, "lrlc")]
    return "\n".join(lines)


def _wins(s: dict, prefix: str, suffix: str, level: str) -> list[tuple[str, str]]:
    """(row label, cell) of one judge's comparison: keys `<prefix>decisive_win_rate<suffix>` ..."""
    def get(k):
        return s.get(f"{prefix}{k}{suffix}")

    bounds = interval(get("decisive_win_rate_lower"), get("decisive_win_rate_upper"))
    return [(f"decisive win rate: wins / (wins + losses), [{level} Wilson interval]",
             f"**{num(get('decisive_win_rate'))}** {bounds}"),
            ("decisive comparisons (ties left out)", num(get("decisive_comparisons"))),
            ("tie rate", num(get("tie_rate"))),
            ("win rate, ties count half", num(get("win_rate")))]


def versus_sft_section(s: dict, level: str) -> str:
    """Win rates by the independent judge and by the proxy reward model, side by side: a
    proxy that wins where the judge does not is reward hacking."""
    judge, rm_same = s.get("eval/judge"), s.get("eval/judge") == "reward_model"
    judge_col, rm_col = _wins(s, "eval/", "_vs_sft", level), _wins(s, "eval/rm_", "_vs_sft", level)
    rows = [[label, a, b] for (label, a), (_, b) in zip(judge_col, rm_col)]
    rows.append(["mean score: SFT → policy",
                 f"{num(s.get('eval/judge_score_sft'))} → {num(s.get('eval/judge_score_policy'))}",
                 f"{num(s.get('eval/reward_score_sft'))} → {num(s.get('eval/reward_score_policy'))}"])
    rm_delta = _diff(s.get("eval/reward_score_policy"), s.get("eval/reward_score_sft"))
    ci = s.get("eval/judge_delta_ci95") or [None, None]
    rows.append([f"mean delta, policy − SFT [{level} bootstrap interval]",
                 f"**{num(s.get('eval/judge_delta'), signed=True)}** {interval(*ci)}", num(rm_delta, signed=True)])
    if s.get("eval/exact_sft") is not None:
        rows.append(["exact answers (gold score 1): SFT → policy",
                     f"{pct(s.get('eval/exact_sft'), False)} → {pct(s.get('eval/exact_policy'), False)}", "–"])
    note = (" Without an independent judge both columns are the PPO reward model's." if rm_same else "")
    return "\n".join([
        "## Policy vs SFT", "",
        f"{num(s.get('eval/prompts'))} held-out samples, both models decoded the same way "
        f"({escape(str(s.get('eval/decoding') or '–'))}). The gate reads the **independent judge**, the "
        f"{judge_label(judge)}; the proxy reward model, the one PPO optimised, stands beside it.{note}", "",
        table(["", f"{'judge' if rm_same else 'independent judge'}: {judge_label(judge)}", "proxy reward model"],
              rows)])


def _diff(a, b):
    return a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None


def cost_section(s: dict, gate) -> str:
    """What the policy paid for its gains: KL to SFT and the alignment tax."""
    tax, rel = s.get("eval/alignment_tax"), s.get("eval/alignment_tax_rel")
    rows = [["held-out demonstration loss (nats/token)", num(s.get("eval/heldout_loss_sft"), 4),
             num(s.get("eval/heldout_loss_policy"), 4), f"**{num(tax, 4, True)}** ({pct(rel)}): the alignment tax"],
            ["KL(policy ‖ SFT) per response (nats)", "0 (reference)", f"**{num(s.get('eval/kl_vs_sft'), 4)}**", ""],
            ["response length (tokens)", num(s.get("eval/response_length_sft"), 1),
             num(s.get("eval/response_length_policy"), 1),
             num(_diff(s.get("eval/response_length_policy"), s.get("eval/response_length_sft")), 1, True)]]
    limits = (f" The gate allows KL up to {gate.max_kl} (`gate.max_kl`) and a tax up to {gate.max_alignment_tax} "
              "(`gate.max_alignment_tax`)." if gate is not None else "")
    return "\n".join([
        "## Cost: KL and alignment tax", "",
        "KL is the mean over the policy's samples of Σₜ log π(yₜ) − log π_SFT(yₜ); the alignment tax is the "
        f"policy's loss on held-out demonstrations minus SFT's (InstructGPT's regressions on public NLP data).{limits}",
        "", table(["", "SFT", "policy", "policy − SFT"], rows)])


def champion_section(s: dict, level: str) -> str:
    """The champion/challenger comparison, one column per judge that compared them."""
    version = s.get("champion/version")
    if not version:
        why = ("the policy diverged, so it was not compared" if s.get("eval/policy_nonfinite") else
               "no `@champion` was registered when this run was evaluated: it was compared with SFT only")
        return f"## Against the champion\n\nNone: {why}."
    judges = [j for j in str(s.get("champion/compared_by") or "").split("+") if j]
    columns = [_wins(s, f"champion/{j}_", "", level) for j in judges]
    rows = [[label, *(col[i][1] for col in columns)] for i, (label, _) in enumerate(columns[0])] if columns else []
    rows.append(["mean score: champion → policy", *(f"{num(s.get(f'champion/{j}_score_champion'))} → "
                                                     f"{num(s.get(f'champion/{j}_score_policy'))}" for j in judges)])
    return "\n".join([
        f"## Against the champion (version {escape(str(version))})", "",
        f"The registered `@champion` answered the first {num(s.get('champion/prompts'))} held-out prompts, decoded as "
        "above. The gate takes the lowest lower bound over the judges: "
        f"**{num(s.get('champion/decisive_win_rate_lower'))}**.",
        "", table(["", *(judge_label(j) for j in judges)], rows)])


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = [(r["step"], r[key]) for r in history if isinstance(r.get(key), (int, float))]
    return [x for x, _ in rows], [y for _, y in rows]


def curves_png(history: list[dict], sft_curve: list | None, selected: int | None, judge, dpi: int = 80) -> bytes | None:
    """PPO's curves per update (proxy reward, the independent judge and gold, KL and beta)
    and SFT's held-out loss, as one PNG (matplotlib's Agg canvas: no display, no pyplot
    state). None when there is nothing to draw."""
    if not history and not sft_curve:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 6.6), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.subplots(2, 2)
    panels = (
        (ax[0, 0], "PPO: proxy reward (the reward model PPO optimises)",
         (("ppo/reward", "rollouts", None), ("ppo/judge_proxy", "judge's prompt set", "o"))),
        (ax[0, 1], f"PPO: independent judge ({JUDGES.get(judge, judge or '–')})",
         (("ppo/judge_score", "judge's prompt set (update 0: SFT)", "o"), ("ppo/gold_score", "gold, rollouts", None))),
        (ax[1, 0], "PPO: KL(policy ‖ SFT) per response, nats", (("ppo/kl", "KL", None),)),
    )
    for a, title, lines in panels:
        for key, label, marker in lines:
            x, y = _series(history, key)
            if x:
                a.plot(x, y, marker=marker, label=label)
        if selected is not None and history:
            a.axvline(selected, color="grey", linestyle=":", label=f"selected update {selected}")
        a.set_title(title, fontsize=10)
        a.set_xlabel("PPO update")
    x, y = _series(history, "ppo/beta")
    if x:  # beta on its own scale, in the KL panel's legend
        twin = ax[1, 0].twinx()
        twin.plot(x, y, color="tab:red", linestyle="--", label="β, the KL coefficient (right axis)")
        twin.set_ylabel("β", color="tab:red")
        ax[1, 0].plot([], [], color="tab:red", linestyle="--", label="β, the KL coefficient (right axis)")
    for a, _, _ in panels:
        if a.lines:
            a.legend(fontsize=8, framealpha=0.8)
        else:
            a.text(0.5, 0.5, "no data", ha="center", va="center", transform=a.transAxes, color="grey")
    if sft_curve:
        ax[1, 1].plot([p[0] for p in sft_curve], [p[1] for p in sft_curve], marker="o")
    ax[1, 1].set_title("SFT: held-out demonstration loss", fontsize=10)
    ax[1, 1].set_xlabel("SFT step")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def training_section(results: dict, s: dict, history: list[dict], image: bytes | None) -> str:
    """How the models got here: the curves, then one line per trained model."""
    sft = results.get("sft") or {}
    rm = results.get("reward") or {}
    ppo = results.get("ppo") or {}
    lines = ["## Training", ""]
    if image:
        lines += [f"![PPO and SFT curves](data:image/png;base64,{base64.b64encode(image).decode()})", ""]
    else:
        lines += ["No curves: the run's store holds no `ppo/history.json` (PPO from an older version) and no SFT "
                  "curve, or the image did not fit the page.", ""]
    if sft:
        lines.append(f"- **SFT**: best held-out loss {num(sft.get('best_eval_loss'), 4)} at step "
                     f"{num(sft.get('best_step'))} of {num(sft.get('steps'))}; "
                     f"early stop: {num(sft.get('early_stopped'))}.")
    if rm:
        truth = "the gold judge, on the pairs it does not tie" if rm.get("rm/gold_pairs") else "the labels"
        judge = (f"; the held-out judge model: {num(rm.get('rm/judge_accuracy'))} on {num(rm.get('judge_pairs'))} "
                 "training pairs of its own" if rm.get("rm/judge_accuracy") is not None else "")
        auc = f"; ROC area of its margins {num(rm.get('rm/auc'))}" if rm.get("rm/auc") is not None else ""
        lines.append(f"- **Reward model**: held-out accuracy **{num(rm.get('rm/accuracy'))}** against {truth} "
                     f"(against the labels: {num(rm.get('rm/label_accuracy'))}){auc}{judge}.")
    if ppo:
        last = ppo.get("last_metrics") or {}
        lines.append(
            f"- **PPO**: {num(ppo.get('updates'))} updates (early stop: {num(ppo.get('early_stopped'))}); kept update "
            f"**{num(ppo.get('selected_update'))}** (`ppo.select: {escape(str(ppo.get('select')))}`, best judge score "
            f"{num(ppo.get('judge_best_score'))}); last update: proxy reward {num(last.get('ppo/reward'))}, "
            f"KL {num(last.get('ppo/kl'), 4)}, β {num(ppo.get('final_beta'), 4)}.")
    return "\n".join(lines).rstrip()


def samples_section(samples: list[dict], s: dict, rows: int = SAMPLE_ROWS) -> str:
    """The first held-out samples: prompt, both answers (escaped), the judge's and the proxy's scores."""
    if not samples:
        return "## Samples\n\nNone: " + ("the policy diverged, so it was not sampled." if s.get("eval/policy_nonfinite")
                                         else "eval logged no samples (`eval.table_rows: 0`).")
    shown = samples[:rows]

    def better(r) -> str:
        a, b = r.get("judge_policy"), r.get("judge_sft")
        return "–" if a is None or b is None else "policy" if a > b else "SFT" if b > a else "tie"

    body = [[str(i), escape(str(r.get("prompt", "")), CELL_CHARS) or "*(empty)*",
             escape(str(r.get("sft", "")), CELL_CHARS) or "*(empty)*",
             escape(str(r.get("policy", "")), CELL_CHARS) or "*(empty)*",
             num(r.get("judge_sft"), 2), num(r.get("judge_policy"), 2), num(r.get("rm_sft"), 2),
             num(r.get("rm_policy"), 2), better(r)] for i, r in enumerate(shown, 1)]
    return "\n".join([
        "## Samples", "",
        f"The first {len(shown)} of {num(s.get('eval/prompts'))} held-out samples (those logged: `eval/samples.json` "
        "in the run's store, `eval_samples.json` in the MLflow eval run). "
        f"*judge*: the {judge_label(s.get('eval/judge'))}; "
        "*RM*: the proxy reward model. In answers ↵ marks a line break, and control characters show as escapes "
        f"(`\\x14`); text over {CELL_CHARS} characters is cut (…).", "",
        table(["#", "prompt", "SFT answer", "policy answer", "judge SFT", "judge policy", "RM SFT", "RM policy",
               "better by the judge"], body, "rlllrrrrc")])


def eval_report(summary: dict, gate, results: dict, history: list[dict], samples: list[dict], run: str = "",
                dpi: int = 80, limit: int = MARKDOWN_LIMIT) -> str:
    """Eval's Markdown page. `results`: the trained stages' results by name; `history`:
    PPO's per-update rows. Under `limit` characters: the image shrinks, then goes."""
    level = f"{gate.confidence:.0%}" if gate is not None else "95%"
    ppo = results.get("ppo") or {}
    image = curves_png(history, (results.get("sft") or {}).get("eval_curve"), ppo.get("selected_update"),
                       ppo.get("judge") or summary.get("eval/judge"), dpi) if dpi else None
    text = "\n\n".join([verdict_section(summary, gate, run), versus_sft_section(summary, level),
                        cost_section(summary, gate), champion_section(summary, level),
                        training_section(results, summary, history, image), samples_section(samples, summary)]) + "\n"
    if len(text) > limit and dpi:
        return eval_report(summary, gate, results, history, samples, run, dpi // 2 if dpi > 40 else 0, limit)
    return text[:limit]


def write_report(ctx, summary: dict, samples: list[dict]) -> str:
    """Eval's step: the report from this run's store (the trained stages' results, PPO's
    history) into `eval/report.md` and the eval MLflow run (`report.md`)."""
    def read(key: str, default):
        return ctx.store.read_json(key) if ctx.store.exists(key) else default

    results = {name: read(f"{name}/result.json", {}) for name, spec in STAGES.items() if spec.trains}
    text = eval_report(summary, ctx.section("gate"), results, read("ppo/history.json", []), samples,
                       run=ctx.store.uri(""))
    ctx.store.write_bytes(REPORT_KEY, text.encode())
    ctx.tracker.log_text(text, "report.md")
    return text
