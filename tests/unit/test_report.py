"""What a run shows in the Kubeflow UI (rlhf.stages.report): headline metrics, the reward
model's held-out pairs, and eval's Markdown report, rendered here with markdown-it-py
(CommonMark + tables, raw HTML off, as the UI's markdown-to-jsx is configured)."""

from __future__ import annotations

import base64
import math
import re

import pytest
from markdown_it import MarkdownIt

from rlhf.adapters.store import LocalStore
from rlhf.adapters.tracking import NullTracker
from rlhf.config import GateConfig
from rlhf.stages.gate import gate_decision
from rlhf.stages.report import (
    MARKDOWN_LIMIT, REPORT_KEY, escape, eval_report, headline_metrics, metric_name, pair_classification,
    write_report,
)
from rlhf.stages.table import STAGES

HOSTILE = "a | b <script>alert(1)</script> **bold** [x](javascript:1) `c` &lt; \\| \n2nd\r\x14\u202eevil\t# h"


def render(md: str) -> str:
    return MarkdownIt("commonmark", {"html": False}).enable("table").render(md)


def summary(**over) -> dict:
    """An eval summary of a policy that wins by gold, with its gate verdict."""
    s = {"eval/prompts": 40, "eval/decoding": "temperature=0.7, top_k=0, top_p=1, same seed for both",
         "eval/judge": "gold", "eval/reward_score_sft": 0.1, "eval/reward_score_policy": 0.9,
         "eval/response_length_sft": 9.0, "eval/response_length_policy": 7.5, "eval/kl_vs_sft": 1.25,
         "eval/rm_win_rate_vs_sft": 0.9, "eval/rm_tie_rate_vs_sft": 0.0, "eval/rm_decisive_win_rate_vs_sft": 0.9,
         "eval/rm_decisive_win_rate_lower_vs_sft": 0.77, "eval/rm_decisive_win_rate_upper_vs_sft": 0.96,
         "eval/rm_decisive_comparisons_vs_sft": 40, "eval/judge_score_sft": 0.2, "eval/judge_score_policy": 0.5,
         "eval/judge_delta": 0.3, "eval/judge_delta_ci95": [0.18, 0.41], "eval/win_rate_vs_sft": 0.7,
         "eval/tie_rate_vs_sft": 0.3, "eval/decisive_win_rate_vs_sft": 0.8571,
         "eval/decisive_win_rate_lower_vs_sft": 0.6974, "eval/decisive_win_rate_upper_vs_sft": 0.9373,
         "eval/decisive_comparisons_vs_sft": 28, "eval/gold_score_sft": 0.2, "eval/gold_score_policy": 0.5,
         "eval/exact_sft": 0.1, "eval/exact_policy": 0.35, "eval/gold_delta": 0.3, "eval/gold_delta_ci95": [0.18, 0.41],
         "eval/heldout_loss_sft": 1.5, "eval/heldout_loss_policy": 1.56, "eval/alignment_tax": 0.06,
         "eval/alignment_tax_rel": 0.04, "eval/wall_s": 3.0, **over}
    s["gate/passed"], s["gate/reasons"] = gate_decision(s, GateConfig())
    return s


CHAMPION = {"champion/version": "4", "champion/prompts": 40, "champion/compared_by": "gold",
            "champion/gold_score_champion": 0.45, "champion/gold_score_policy": 0.5, "champion/gold_win_rate": 0.55,
            "champion/gold_tie_rate": 0.5, "champion/gold_decisive_win_rate": 0.6,
            "champion/gold_decisive_win_rate_lower": 0.39, "champion/gold_decisive_win_rate_upper": 0.78,
            "champion/gold_decisive_comparisons": 20, "champion/win_rate": 0.55, "champion/tie_rate": 0.5,
            "champion/decisive_win_rate": 0.6, "champion/decisive_win_rate_lower": 0.39,
            "champion/decisive_win_rate_upper": 0.78, "champion/decisive_comparisons": 20}
RESULTS = {"sft": {"best_eval_loss": 1.5, "best_step": 40, "steps": 60, "early_stopped": True,
                   "eval_curve": [[0, 3.0], [20, 1.8], [40, 1.5], [60, 1.52]]},
           "reward": {"rm/accuracy": 0.71, "rm/label_accuracy": 0.66, "rm/gold_pairs": 180.0, "rm/auc": 0.78},
           "ppo": {"updates": 6, "selected_update": 4, "select": "judge", "judge": "gold", "judge_best_score": 0.52,
                   "early_stopped": False, "final_beta": 0.09, "last_metrics": {"ppo/reward": 1.1, "ppo/kl": 2.0}}}
HISTORY = [{"step": 0, "ppo/judge_score": 0.2, "ppo/judge_proxy": 0.1},
           *({"step": i, "ppo/reward": 0.1 * i, "ppo/kl": 0.3 * i, "ppo/beta": 0.1 - 0.002 * i,
              "ppo/gold_score": 0.2 + 0.05 * i, **({"ppo/judge_score": 0.2 + 0.08 * i, "ppo/judge_proxy": 0.15 * i}
                                                   if i % 2 == 0 else {})} for i in range(1, 7))]
SAMPLES = [{"prompt": "sort: 3 1 2", "sft": "1 3 2", "policy": "1 2 3", "rm_sft": 0.1, "rm_policy": 0.8,
            "judge_sft": 0.3, "judge_policy": 1.0},
           {"prompt": "reverse: a b", "sft": HOSTILE, "policy": "", "rm_sft": -0.2, "rm_policy": 0.4,
            "judge_sft": 0.0, "judge_policy": 0.0}]


def sections(md: str) -> list[str]:
    return re.findall(r"^## (.+)$", md, flags=re.M)


# ----------------------------------------------------------------------------- escaping


def test_escaped_text_stays_literal_and_inside_its_cell():
    cell = escape(HOSTILE)
    html = render(f"| a | b |\n| --- | --- |\n| {cell} | x |\n")
    body = html.split("<tbody>")[1]
    assert body.count("<td>") == 2  # the | in the text did not open a third cell
    assert "<script>" not in html and "<strong>" not in html and "<a " not in html and "<code>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # shown as text, not run
    assert "&amp;lt;" in html  # an entity in model text stays the characters it is, not a <
    assert "↵" in cell and "\\\\r" in cell and "\\\\x14" in cell and "\\\\u202e" in cell
    assert "\u202e" not in cell and "\x14" not in cell and "\n" not in cell  # nothing invisible or breaking is left


def test_escape_cuts_long_text_with_an_ellipsis():
    assert escape("x" * 500, 20) == "x" * 19 + "…"
    assert escape("short", 20) == "short"


# ----------------------------------------------------------------------------- dsl.Metrics


def test_headline_metrics_name_nested_flag_interval_and_skip_what_kfp_cannot_store():
    ppo = {"last_metrics": {"ppo/reward": 1.5, "ppo/kl": float("nan")}, "selected_update": 4, "early_stopped": True,
           "judge_best_score": float("-inf"), "wall_s": 2.0}
    assert headline_metrics("ppo", ppo) == {"ppo_reward": 1.5, "ppo_selected_update": 4.0,
                                            "ppo_early_stopped": 1.0, "ppo_wall_s": 2.0}
    ev = headline_metrics("eval", summary())
    assert ev["eval_judge_delta_ci95_lo"] == 0.18 and ev["eval_judge_delta_ci95_hi"] == 0.41
    assert ev["gate_passed"] == 1.0 and ev["eval_decisive_win_rate_lower_vs_sft"] == 0.6974
    assert "champion_decisive_win_rate" not in ev  # no champion: left out, not 0
    prep = {"sizes": {"sft_train": 90, "sft_eval": 10}, "rejected": {"sft": 2}, "uri": "file:///x"}
    assert headline_metrics("prep", prep) == {"prep_sizes_sft_eval": 10.0, "prep_sizes_sft_train": 90.0,
                                              "prep_rejected_sft": 2.0}


@pytest.mark.parametrize("stage", [s for s, spec in STAGES.items() if spec.headline])
def test_every_headline_name_is_a_valid_unique_kfp_metric_name(stage):
    names = [metric_name(stage, tuple(p.replace("*", "x").split("."))) for p in STAGES[stage].headline]
    assert all(re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", n) for n in names), names
    assert len(set(names)) == len(names), names


# ----------------------------------------------------------------------------- dsl.ClassificationMetrics


def test_pair_classification_by_hand():
    """Margins of 5 held-out pairs; the judge says chosen is better for the first three.
    Confusion (rows: truth, columns: the reward model's call at margin > 0): [[2, 1], [1, 1]].
    AUC: of the 3 x 2 (better, worse) pairs, the better one has the larger margin in 5."""
    c = pair_classification([2.0, 1.0, -1.0, 0.5, -2.0], [True, True, True, False, False], "judge")
    assert c["matrix"] == [[2, 1], [1, 1]] and c["pairs"] == 5 and c["truth"] == "judge"
    assert c["auc"] == pytest.approx(5 / 6)
    roc = c["roc"]
    assert roc["fpr"] == pytest.approx([0, 0, 0, 0.5, 0.5, 1])
    assert roc["tpr"] == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3, 1, 1])
    assert roc["threshold"] == pytest.approx([3.0, 2.0, 1.0, 0.5, -1.0, -2.0])
    # accuracy on the matrix's diagonal is what rm/accuracy reports
    assert (c["matrix"][0][0] + c["matrix"][1][1]) / c["pairs"] == pytest.approx(3 / 5)


def test_pair_classification_ties_count_half_and_labels_give_no_curve():
    assert pair_classification([1.0, 1.0], [True, False], "judge")["auc"] == pytest.approx(0.5)
    by_labels = pair_classification([0.3, -0.1, 0.2], [True, True, True], "labels")
    assert by_labels["matrix"] == [[2, 1], [0, 0]] and by_labels["roc"] is None and by_labels["auc"] is None


def test_pair_classification_keeps_the_ends_when_it_thins_the_curve():
    n = 1000
    c = pair_classification([i / n for i in range(n)], [i % 3 != 0 for i in range(n)], "judge", max_points=51)
    assert len(c["roc"]["fpr"]) <= 51
    assert (c["roc"]["fpr"][0], c["roc"]["tpr"][0]) == (0, 0) and (c["roc"]["fpr"][-1], c["roc"]["tpr"][-1]) == (1, 1)


# ----------------------------------------------------------------------------- the Markdown report


def test_report_of_a_passed_gate_with_a_champion_reads_as_a_page():
    s = summary(**CHAMPION)
    s["gate/passed"], s["gate/reasons"] = gate_decision(s, GateConfig())
    assert not s["gate/passed"]  # lower bound 0.39 vs the champion: refused, with one reason
    s2 = summary()
    md = eval_report(s2, GateConfig(), RESULTS, HISTORY, SAMPLES, run="file:///runs/r1")
    assert sections(md) == ["Policy vs SFT", "Cost: KL and alignment tax", "Against the champion", "Training",
                            "Samples"]
    assert "**Gate: passed.**" in md and "✗" not in md
    assert "**0.857** [0.697, 0.937]" in md  # decisive win rate and its Wilson interval, by the judge
    assert "**0.900** [0.770, 0.960]" in md  # the proxy reward model's, beside it
    assert "**+0.300** [0.180, 0.410]" in md  # judge delta with its bootstrap interval
    assert "**+0.0600** (+4.00%): the alignment tax" in md and "**1.2500**" in md
    assert "None: no `@champion` was registered" in md
    html = render(md)
    img = re.search(r'<img src="data:image/png;base64,([^"]+)"', html)
    assert img and base64.b64decode(img.group(1))[:8] == b"\x89PNG\r\n\x1a\n"
    samples = html.split("<h2>Samples</h2>")[1]
    rows = samples.split("<tbody>")[1].split("</tbody>")[0].split("<tr>")[1:]
    assert len(rows) == 2 and all(r.count("<td") == 9 for r in rows)
    assert "<script>" not in html and "*(empty)*" not in html and "<em>(empty)</em>" in html
    assert ">policy<" in rows[0] and ">tie<" in rows[1]  # better by the judge
    md_c = eval_report(s, GateConfig(), RESULTS, HISTORY, SAMPLES)
    assert "## Against the champion (version 4)" in md_c and "**0.600** [0.390, 0.780]" in md_c


def test_report_of_a_refused_gate_lists_its_reasons_and_failed_checks():
    s = summary(**{"eval/decisive_win_rate_lower_vs_sft": 0.41, "eval/kl_vs_sft": 14.0})
    assert not s["gate/passed"] and len(s["gate/reasons"]) == 2
    md = eval_report(s, GateConfig(), RESULTS, HISTORY, SAMPLES)
    assert "**Gate: refused.**" in md and "these 2 reasons" in md
    for i, reason in enumerate(s["gate/reasons"], 1):
        assert f"{i}. {escape(reason)}" in md
    html = render(md)
    failed = [row for row in html.split("<tr>") if "✗" in row]
    assert len(failed) == 2 and "gate.min_decisive_win_rate" in failed[0] and "gate.max_kl" in failed[1]
    assert html.count("✓ pass") == 4  # finite weights, judge delta, tax, every other number


def test_report_without_judge_champion_samples_or_history_says_so():
    """User data with no independent judge: the PPO reward model judged; no gold keys; no
    champion; no PPO history (older run); no samples logged."""
    s = summary(**{"eval/judge": "reward_model", "eval/gold_score_sft": None, "eval/gold_score_policy": None,
                   "eval/gold_delta": None, "eval/gold_delta_ci95": None, "eval/exact_sft": None,
                   "eval/exact_policy": None})
    md = eval_report(s, GateConfig(), {}, [], [])
    assert "PPO's reward model (no independent judge)" in escape_back(md)
    assert "both columns are the PPO reward model's" in md and "| judge: PPO" in md
    assert "exact answers" not in md and "data:image/png" not in md and "No curves" in md
    assert "None: eval logged no samples" in md and "None: no `@champion`" in md
    assert "- **PPO**" not in md


def test_report_of_a_diverged_policy():
    s = {"eval/policy_nonfinite": 3.0, "eval/policy_nonfinite_first": "model.layers.0.weight",
         "eval/kl_vs_sft": math.nan, "eval/decisive_win_rate_vs_sft": math.nan,
         "eval/decisive_win_rate_lower_vs_sft": math.nan}
    s["gate/passed"], s["gate/reasons"] = gate_decision(s, GateConfig())
    md = eval_report(s, GateConfig(), RESULTS, HISTORY, [])
    assert "**Gate: refused.**" in md and "the policy diverged: model.layers.0.weight (and 2 more)" in escape_back(md)
    assert "| policy weights are finite | no |" in md and "NaN" in md
    assert "the policy diverged, so it was not sampled" in md and "it was not compared" in md


def escape_back(md: str) -> str:
    return re.sub(r"\\(.)", r"\1", md)


def test_report_fits_the_kubeflow_viewer():
    long = [{**SAMPLES[0], "sft": "y" * 10_000, "policy": "z" * 10_000} for _ in range(500)]
    md = eval_report(summary(), GateConfig(), RESULTS, HISTORY, long)
    assert len(md) < MARKDOWN_LIMIT and md.count("\n| ") < 60  # 20 rows, cells cut
    assert "data:image/png" in md
    small = eval_report(summary(), GateConfig(), RESULTS, HISTORY, SAMPLES, limit=20_000)
    assert len(small) <= 20_000 and "data:image/png" not in small and "## Samples" in small


class Ctx:
    """What `write_report` reads of a stage context."""

    def __init__(self, store):
        self.store, self.tracker = store, NullTracker()

    def section(self, name):
        assert name == "gate"
        return GateConfig()


def test_write_report_reads_the_run_store_and_writes_the_store_and_mlflow(tmp_path):
    store = LocalStore(tmp_path / "run")
    for name, result in RESULTS.items():
        store.write_json(f"{name}/result.json", result)
    store.write_json("ppo/history.json", HISTORY)
    ctx = Ctx(store)
    text = write_report(ctx, summary(), SAMPLES)
    assert store.read_bytes(REPORT_KEY).decode() == text == ctx.tracker.texts["report.md"]
    assert "kept update **4**" in text and "held-out accuracy **0.710** against the gold judge" in text
    assert f"Run `{store.uri('')}`" in text
