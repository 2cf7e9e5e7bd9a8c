"""The stage contract: every stage is `run(ctx: StageContext) -> StageResult`.

`StageContext` carries what a stage may use, built once per process by the
dispatcher (`rlhf.runs.stage`): its own config section, the base model and run-wide
settings it shares with every stage, the stores, the tracker, the judge and task,
fault injection, and the process settings. A stage never reads the environment,
never builds an adapter and never looks at another stage's config section.
`StageResult.values` is what the dispatcher writes to `<stage>/result.json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlhf.adapters.settings import Settings
from rlhf.adapters.tracking import Tracker
from rlhf.config import DistributedConfig, ModelConfig
from rlhf.data.tasks.judge import Judge
from rlhf.train.faults import Faults


@dataclass(frozen=True)
class Runtime:
    """Where and how a stage computes: device, CPU threads, processes (DeepSpeed)."""

    device: str
    num_threads: int | None
    distributed: DistributedConfig
    precision: str = "auto"
    """`train.precision`: auto, fp32, bf16 or fp16 (`rlhf.train.trainable.resolve_precision`)."""


@dataclass
class StageContext:
    name: str
    """The stage's name in the table (`rlhf.stages.table.STAGES`)."""
    config: Any
    """This stage's own config section (`SFTConfig` for sft, ...)."""
    model: ModelConfig
    """The base model every stage loads or builds."""
    seed: int
    runtime: Runtime
    store: Any
    """The run's artifact store (`rlhf.adapters.store`): checkpoints, models, results."""
    prep_store: Any
    """The store holding committed data prep output (the run's own, or a shared dataset)."""
    tracker: Tracker
    judge: Judge
    task: Any | None
    """The built-in task (datasets, simulated labelers), or None for user data."""
    settings: Settings
    faults: Faults
    fingerprint: str
    """Hash of the training config: a checkpoint written under another is refused."""
    params: dict
    """The pipeline config as logged to the stage's MLflow run."""
    registered_model: str = "rlhf"
    """Base name of the registered models (<name>-sft, -reward, -policy)."""
    parent_run_id: str | None = None
    quiet: bool = True
    options: dict = field(default_factory=dict)
    """Stage-specific call options (promote: `move_alias`)."""
    sections: dict = field(default_factory=dict)
    """Other config sections this stage declares it reads (`StageSpec.also_reads`)."""

    def section(self, name: str):
        """Another stage's config section, if the table says this stage reads it."""
        if name not in self.sections:
            raise KeyError(f"stage {self.name!r} does not declare config section {name!r} in rlhf.stages.table")
        return self.sections[name]


@dataclass
class StageResult:
    values: dict
    """Metrics, timings and ids of the stage; written to `<stage>/result.json` by rank 0."""
