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


STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("prep", "rlhf.stages.prep", "data", reads_prep=False),
    StageSpec("sft", "rlhf.stages.sft", "sft", trains=True, model_key="sft/model", registers="sft",
              logs_data_report=True),
    StageSpec("reward", "rlhf.stages.reward", "reward", trains=True, model_key="reward/model", registers="reward"),
    StageSpec("ppo", "rlhf.stages.ppo", "ppo", trains=True, model_key="ppo/model", registers="policy"),
    StageSpec("eval", "rlhf.stages.evaluate", "eval", also_reads=("gate",), updates_summary=True),
    StageSpec("promote", "rlhf.stages.promote", "gate", standalone=False, reads_prep=False, also_reads=("eval",),
              updates_summary=True),
)}

STAGE_OF_KIND = {s.registers: s.name for s in STAGES.values() if s.registers}
"""Registered-model kind -> the stage that trained it ("policy" -> "ppo")."""
