"""The promotion gate: thresholds from the config, numbers from evaluation.

The quality question is asked of the decisive comparisons (the independent judge's
wins and losses; ties left out) with a significance test: the lower bound of the
Wilson interval of the decisive win rate must reach `gate.min_decisive_win_rate`. A
ties-as-half win rate cannot be used for this: when most comparisons tie, its reach
is capped below any fixed threshold. The champion comparison uses the same test.

Eval computes the verdict (so the pipeline's `dsl.If` can branch on it); promote
re-checks it before moving `@champion`. A missing, NaN or infinite number fails its check,
and any other score, loss or rate from eval that is not finite fails the gate.
"""

from __future__ import annotations

import math

from rlhf.config import GateConfig


def wilson_interval(wins: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion of `wins` in `n` trials ((0, 1) when n is 0)."""
    if n <= 0:
        return 0.0, 1.0
    z = _normal_quantile(0.5 + confidence / 2)
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _normal_quantile(q: float) -> float:
    """The standard normal quantile (bisection on erf; exact to 1e-10)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _bad(x) -> bool:
    """Missing, or not a finite number (NaN or infinite: a diverged policy or evaluation)."""
    return x is None or isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x)


CHECKED = ("eval/policy_nonfinite", "eval/decisive_win_rate_lower_vs_sft", "eval/judge_delta", "eval/gold_delta",
           "eval/kl_vs_sft", "eval/alignment_tax", "champion/decisive_win_rate_lower")
"""The numbers with a threshold of their own; every other number eval reports must be finite."""


def gate_decision(summary: dict, g: GateConfig) -> tuple[bool, list[str]]:
    """(passed, reasons it failed). Pure: thresholds from the config, numbers from eval."""
    reasons = []
    if summary.get("eval/policy_nonfinite"):
        reasons.append(f"the policy diverged: {summary.get('eval/policy_nonfinite_first')} (and "
                       f"{int(summary['eval/policy_nonfinite']) - 1} more) hold NaN or infinite values, so it could not "
                       "be sampled; lower ppo.lr or raise ppo.kl.init_coef, and look at ppo/approx_kl and the "
                       "losses in the PPO run")
    lower, judge = summary.get("eval/decisive_win_rate_lower_vs_sft"), summary.get("eval/judge", "the judge")
    if _bad(lower) or lower < g.min_decisive_win_rate:
        reasons.append(
            f"not better than SFT by {judge}: decisive win rate {summary.get('eval/decisive_win_rate_vs_sft')} "
            f"({summary.get('eval/decisive_comparisons_vs_sft')} decisive comparisons) has the lower bound {lower} "
            f"of its {g.confidence:.0%} interval below gate.min_decisive_win_rate={g.min_decisive_win_rate}")
    delta = summary.get("eval/judge_delta", summary.get("eval/gold_delta"))
    if delta is not None and (_bad(delta) or delta < g.min_gold_delta):
        reasons.append(f"judge delta {delta:.4f} is below gate.min_gold_delta={g.min_gold_delta}")
    kl = summary.get("eval/kl_vs_sft")
    if kl is not None and (_bad(kl) or kl > g.max_kl):
        reasons.append(f"KL vs SFT {kl:.3f} is above gate.max_kl={g.max_kl}")
    tax = summary.get("eval/alignment_tax")
    if tax is not None and (_bad(tax) or tax > g.max_alignment_tax):
        reasons.append(f"alignment tax {tax:.4f} is above gate.max_alignment_tax={g.max_alignment_tax}")
    for key, x in summary.items():
        if key.startswith(("eval/", "champion/")) and key not in CHECKED and isinstance(x, float) and _bad(x):
            reasons.append(f"{key} is {x}: the policy or its evaluation diverged (a score, loss or rate that is "
                           f"not a finite number)")
    if summary.get("champion/version"):
        cl = summary.get("champion/decisive_win_rate_lower")
        if _bad(cl) or cl <= 0.5 + g.champion_margin:
            reasons.append(
                f"does not beat champion version {summary['champion/version']}: decisive win rate "
                f"{summary.get('champion/decisive_win_rate')} has the lower bound {cl} of its {g.confidence:.0%} "
                f"interval not above {0.5 + g.champion_margin} (0.5 + gate.champion_margin)")
    return not reasons, reasons
