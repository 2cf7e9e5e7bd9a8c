"""The one table of stages: the CLI, the KFP steps, the workers, warm-step preloading,
multi-process launching and promotion all read it.

Order is pipeline order. `model_key` is where a stage leaves its model in the run's
store; `registers` is the registered-model kind that model becomes at promotion.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    name: str
    """Name on the command line, in the store and in MLflow (`rlhf stage <name>`)."""
    module: str
    """Module whose `run(ctx) -> StageResult` runs the stage."""
    section: str
    """Its own section of the pipeline config."""
    trains: bool = False
    """A training stage: may run in several processes (torchrun / Kubeflow Trainer)."""
    model_key: str | None = None
    registers: str | None = None
    standalone: bool = True
    """Runnable alone with `rlhf stage <name>` (promote runs inside a pipeline only)."""
    reads_prep: bool = True
    """Reads the committed output of data prep."""
    also_reads: tuple[str, ...] = ()
    """Config sections of other stages it reads (eval computes the gate's verdict)."""
    updates_summary: bool = False
    """After it, the dispatcher (re)writes the run's summary.json from the stages' results."""
    logs_data_report: bool = False
    """Its MLflow run logs prep's data report to the pipeline's parent run (the first trainer)."""
    headline: tuple[str, ...] = ()
    """Its headline numbers: the `dsl.Metrics` its KFP step shows in the Kubeflow UI. Paths
    into the step's result (prep: `rlhf.runs.prep`'s), `a.b` into a nested dict, `*` every
    key of one; `rlhf.stages.report.headline_metrics` names them."""


EVAL_HEADLINE = tuple(f"eval/{k}_vs_sft" for k in ("decisive_win_rate", "decisive_win_rate_lower",
                                                     "decisive_win_rate_upper", "decisive_comparisons", "win_rate",
                                                     "tie_rate", "rm_decisive_win_rate", "rm_decisive_win_rate_lower",
                                                     "rm_win_rate", "rm_tie_rate", "kl")) + (
    "eval/judge_delta", "eval/judge_delta_ci95", "eval/judge_score_sft", "eval/judge_score_policy",
    "eval/reward_score_sft", "eval/reward_score_policy", "eval/alignment_tax", "eval/alignment_tax_rel",
    "eval/heldout_loss_sft", "eval/heldout_loss_policy", "eval/prompts", "champion/decisive_win_rate",
    "champion/decisive_win_rate_lower", "champion/tie_rate", "champion/prompts", "gate/passed", "eval/wall_s")

STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("prep", "rlhf.stages.prep", "data", reads_prep=False, headline=("sizes.*", "rejected.*")),
    StageSpec("sft", "rlhf.stages.sft", "sft", trains=True, model_key="sft/model", registers="sft",
              logs_data_report=True, headline=("best_eval_loss", "best_step", "steps", "early_stopped",
                                               "tokens_per_s", "wall_s")),
    StageSpec("reward", "rlhf.stages.reward", "reward", trains=True, model_key="reward/model", registers="reward",
              headline=("rm/accuracy", "rm/label_accuracy", "rm/judge_accuracy", "rm/auc", "rm/eval_loss",
                        "rm/gold_pairs", "proxy_pairs", "judge_pairs", "steps", "pairs_per_s", "wall_s")),
    StageSpec("ppo", "rlhf.stages.ppo", "ppo", trains=True, model_key="ppo/model", registers="policy",
              headline=("last_metrics.ppo/reward", "last_metrics.ppo/kl", "final_beta", "last_metrics.ppo/gold_score",
                        "last_metrics.ppo/judge_score", "judge_best_score", "selected_update", "updates",
                        "early_stopped", "episodes_per_s", "wall_s")),
    StageSpec("eval", "rlhf.stages.evaluate", "eval", also_reads=("gate",), updates_summary=True,
              headline=EVAL_HEADLINE),
    StageSpec("promote", "rlhf.stages.promote", "gate", standalone=False, reads_prep=False, also_reads=("eval",),
              updates_summary=True),
)}

STAGE_OF_KIND = {s.registers: s.name for s in STAGES.values() if s.registers}
"""Registered-model kind -> the stage that trained it ("policy" -> "ppo")."""
