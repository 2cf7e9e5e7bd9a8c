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
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class Check:
    """One check of the gate: what it measures, this run's value, its rule, and (when it
    failed) the reason, as the run's `gate/reasons` and eval's report list them."""

    name: str
    value: Any
    rule: str
    passed: bool
    reason: str = ""


def gate_checks(summary: dict, g: GateConfig) -> list[Check]:
    """Every check of the gate, passed or not, in the order of `gate/reasons`. Pure:
    thresholds from the config, numbers from eval. A check whose number eval does not
    report (no judge delta, no KL) is left out; NaN or infinite numbers fail."""
    checks = []
    diverged = summary.get("eval/policy_nonfinite")
    checks.append(Check("policy weights are finite", "no" if diverged else "yes", "no NaN or infinite weight",
                        not diverged, "" if not diverged else
                        f"the policy diverged: {summary.get('eval/policy_nonfinite_first')} (and "
                        f"{int(diverged) - 1} more) hold NaN or infinite values, so it could not "
                        "be sampled; lower ppo.lr or raise ppo.kl.init_coef, and look at ppo/approx_kl and the "
                        "losses in the PPO run"))
    lower, judge = summary.get("eval/decisive_win_rate_lower_vs_sft"), summary.get("eval/judge", "the judge")
    ok = not (_bad(lower) or lower < g.min_decisive_win_rate)
    checks.append(Check(
        f"decisive win rate vs SFT, lower bound of its {g.confidence:.0%} interval", lower,
        f"≥ {g.min_decisive_win_rate} (gate.min_decisive_win_rate)", ok, "" if ok else
        f"not better than SFT by {judge}: decisive win rate {summary.get('eval/decisive_win_rate_vs_sft')} "
        f"({summary.get('eval/decisive_comparisons_vs_sft')} decisive comparisons) has the lower bound {lower} "
        f"of its {g.confidence:.0%} interval below gate.min_decisive_win_rate={g.min_decisive_win_rate}"))
    delta = summary.get("eval/judge_delta", summary.get("eval/gold_delta"))
    if delta is not None:
        ok = not (_bad(delta) or delta < g.min_gold_delta)
        checks.append(Check("judge delta, policy − SFT", delta, f"≥ {g.min_gold_delta} (gate.min_gold_delta)", ok,
                            "" if ok else f"judge delta {delta:.4f} is below gate.min_gold_delta={g.min_gold_delta}"))
    kl = summary.get("eval/kl_vs_sft")
    if kl is not None:
        ok = not (_bad(kl) or kl > g.max_kl)
        checks.append(Check("KL(policy ‖ SFT) per response", kl, f"≤ {g.max_kl} (gate.max_kl)", ok,
                            "" if ok else f"KL vs SFT {kl:.3f} is above gate.max_kl={g.max_kl}"))
    tax = summary.get("eval/alignment_tax")
    if tax is not None:
        ok = not (_bad(tax) or tax > g.max_alignment_tax)
        checks.append(Check("alignment tax: held-out loss, policy − SFT", tax,
                            f"≤ {g.max_alignment_tax} (gate.max_alignment_tax)", ok, "" if ok else
                            f"alignment tax {tax:.4f} is above gate.max_alignment_tax={g.max_alignment_tax}"))
    checks += _finite_checks(summary)
    if summary.get("champion/version"):
        cl = summary.get("champion/decisive_win_rate_lower")
        ok = not (_bad(cl) or cl <= 0.5 + g.champion_margin)
        checks.append(Check(
            f"decisive win rate vs champion v{summary['champion/version']}, lower bound", cl,
            f"> {0.5 + g.champion_margin} (0.5 + gate.champion_margin)", ok, "" if ok else
            f"does not beat champion version {summary['champion/version']}: decisive win rate "
            f"{summary.get('champion/decisive_win_rate')} has the lower bound {cl} of its {g.confidence:.0%} "
            f"interval not above {0.5 + g.champion_margin} (0.5 + gate.champion_margin)"))
    return checks


def _finite_checks(summary: dict) -> list[Check]:
    """Every other eval number must be finite: one failed check per number that is not,
    or one passed check."""
    bad = [(key, x) for key, x in summary.items()
           if key.startswith(("eval/", "champion/")) and key not in CHECKED and isinstance(x, float) and _bad(x)]
    rule = "finite"
    if not bad:
        return [Check("every other score, loss and rate of eval", "finite", rule, True)]
    return [Check(key, x, rule, False, f"{key} is {x}: the policy or its evaluation diverged (a score, loss or rate "
                                       f"that is not a finite number)") for key, x in bad]


def gate_decision(summary: dict, g: GateConfig) -> tuple[bool, list[str]]:
    """(passed, reasons it failed). Pure: thresholds from the config, numbers from eval."""
    reasons = [c.reason for c in gate_checks(summary, g) if not c.passed]
    return not reasons, reasons
