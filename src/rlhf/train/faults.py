"""Fault injection for crash-recovery tests, read from the settings once per process.

`RLHF_FAULT_KILL_AT_STEP=N` (or `ppo:N` for one stage) makes a stage die exactly like
`kill -9` (no cleanup, no flush) right after its optimizer step or PPO update N; the
promote stage numbers its two dangerous moments 1 (registered, alias not moved) and
2 (alias moved). A retried step must then resume from the store.

`RLHF_FAULT_TERM_AT_STEP=N` (or `ppo:N`) sends the process SIGTERM as step N ends, as a
node's preemption would mid-step: the loop checkpoints that step and exits with 143.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass


@dataclass(frozen=True)
class Faults:
    at_step: int | None = None
    """Kill after this step (None: never)."""
    stage: str | None = None
    """Only in this stage (None: any)."""
    term_at_step: int | None = None
    """SIGTERM at the end of this step (None: never)."""
    term_stage: str | None = None

    @classmethod
    def from_settings(cls, settings) -> "Faults":
        return cls(settings.fault_kill_at_step, settings.fault_kill_stage, settings.fault_term_at_step,
                   settings.fault_term_stage)

    def terminate_after_step(self, step: int, stage: str) -> None:
        if self.term_at_step is not None and step == self.term_at_step and self.term_stage in (None, stage):
            os.kill(os.getpid(), signal.SIGTERM)

    def after_step(self, step: int, stage: str) -> None:
        if self.at_step is not None and step == self.at_step and self.stage in (None, stage):
            os.kill(os.getpid(), signal.SIGKILL)
