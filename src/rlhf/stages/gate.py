"""The promotion gate: thresholds from the config, numbers from evaluation.

Eval computes the verdict (so the pipeline's `dsl.If` can branch on it); promote
re-checks it before moving `@champion`.
"""

from __future__ import annotations

from rlhf.config import GateConfig


def gate_decision(summary: dict, g: GateConfig) -> tuple[bool, list[str]]:
    """(passed, reasons it failed). Pure: thresholds from the config, numbers from eval."""
    reasons = []
    win = summary.get("eval/win_rate_vs_sft")
    if win is None or win < g.min_win_rate:
        reasons.append(f"win rate vs SFT {win} is below gate.min_win_rate={g.min_win_rate}")
    delta = summary.get("eval/gold_delta")
    if delta is not None and delta < g.min_gold_delta:
        reasons.append(f"gold delta {delta:.4f} is below gate.min_gold_delta={g.min_gold_delta}")
    kl = summary.get("eval/kl_vs_sft")
    if kl is not None and kl > g.max_kl:
        reasons.append(f"KL vs SFT {kl:.3f} is above gate.max_kl={g.max_kl}")
    tax = summary.get("eval/alignment_tax")
    if tax is not None and tax > g.max_alignment_tax:
        reasons.append(f"alignment tax {tax:.4f} is above gate.max_alignment_tax={g.max_alignment_tax}")
    if summary.get("champion/version"):
        cw = summary.get("champion/win_rate")
        if cw is None or cw <= 0.5 + g.champion_margin:
            reasons.append(f"does not beat champion version {summary['champion/version']}: win rate {cw} "
                           f"is not above {0.5 + g.champion_margin} (0.5 + gate.champion_margin)")
    return not reasons, reasons
