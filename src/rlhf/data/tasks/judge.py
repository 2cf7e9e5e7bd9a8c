"""The judge of a run: who says how good a response really is.

Built once per process from the config (`build_judge`) and handed to the stages that
need it (reward's held-out accuracy, PPO's monitoring, eval and the gate); never
guessed from prompt text at the point of use. A task with a programmatic judge (the
built-in families) gets `GoldJudge`; user data without one gets `NoJudge`, and the
stages fall back to reward-model scores.

The simulated labelers belong to the task (`BuiltinTask.label`), which `build_task`
builds once beside the judge.
"""

from __future__ import annotations

from typing import Protocol

from rlhf.config import PipelineConfig
from rlhf.data.tasks.base import TaskFamily
from rlhf.data.tasks.plugins import resolve_families


class Judge(Protocol):
    name: str

    def score(self, prompt: str, completion: str) -> float | None:
        """The true quality of `completion` for `prompt`, or None when this judge has no
        opinion on the prompt."""


class NoJudge:
    """No programmatic judge: every score is None (eval compares by reward model)."""

    name = "none"

    def score(self, prompt: str, completion: str) -> float | None:
        return None


class GoldJudge:
    """The gold scores of task families: the family that owns the prompt scores it."""

    name = "gold"

    def __init__(self, fams: list[TaskFamily]):
        self.families = list(fams)

    def family(self, prompt: str) -> TaskFamily | None:
        return next((f for f in self.families if f.parse_prompt(prompt) is not None), None)

    def score(self, prompt: str, completion: str) -> float | None:
        fam = self.family(prompt)
        return None if fam is None else fam.gold_score(prompt, completion)


def build_judge(cfg: PipelineConfig) -> Judge:
    """The gold judge of the task's families (built-in or plugins), or none for user data."""
    return GoldJudge(resolve_families(cfg.task.families, cfg.task.plugins)) if cfg.uses_builtin_task else NoJudge()


def build_task(cfg: PipelineConfig):
    """The built-in task (its datasets and its simulated labelers), or None for user data."""
    if not cfg.uses_builtin_task:
        return None
    from rlhf.data.tasks.builtin import BuiltinTask

    return BuiltinTask(cfg.task, cfg.seed)
