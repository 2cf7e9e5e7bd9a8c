"""Fault injection for crash-recovery tests, read from the settings once per process.

`RLHF_FAULT_KILL_AT_STEP=N` (or `ppo:N` for one stage) makes a stage die exactly like
`kill -9` (no cleanup, no flush) right after its optimizer step or PPO update N; the
promote stage numbers its two dangerous moments 1 (registered, alias not moved) and
2 (alias moved). A retried step must then resume from the store.

`RLHF_FAULT_TERM_AT_STEP=N` (or `ppo:N`) sends the process SIGTERM as step N ends, as a
node's preemption would mid-step: the loop checkpoints that step and exits with 143.

`RLHF_FAULT_PACE_DIR=D` paces steps for outage tests: while `D/slow` exists (it holds
seconds), each step ends with that sleep and a line "stage step unix-time" in
`D/steps.log`; the test removes `D/slow` to let the stage finish at full speed.

`RLHF_FAULT_PROMOTE_BARRIER=D` holds promote until two processes have reached it
(a file each in D): two concurrent runs then race for `@champion` every time.

`RLHF_FAULT_HOLD_FINISH=D` holds the exit task (finish) before it touches the registry
until `D/go` exists; each attempt appends a line to `D/attempts` first. A test takes the
MLflow server down at exactly that moment.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Faults:
    at_step: int | None = None
    """Kill after this step (None: never)."""
    stage: str | None = None
    """Only in this stage (None: any)."""
    term_at_step: int | None = None
    """SIGTERM at the end of this step (None: never)."""
    term_stage: str | None = None
    pace_dir: str | None = None
    """Pace steps while `<pace_dir>/slow` exists (None: never)."""
    barrier_dir: str | None = None
    """Promote waits here for a second process (None: never)."""
    hold_dir: str | None = None
    """The exit task waits for `<hold_dir>/go` (None: never)."""

    @classmethod
    def from_settings(cls, settings) -> "Faults":
        return cls(settings.fault_kill_at_step, settings.fault_kill_stage, settings.fault_term_at_step,
                   settings.fault_term_stage, settings.fault_pace_dir, settings.fault_promote_barrier,
                   settings.fault_hold_finish)

    def hold(self, timeout_s: float = 600.0) -> None:
        if self.hold_dir is None:
            return
        folder = Path(self.hold_dir)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "attempts", "a") as f:
            f.write(f"{os.getpid()} {time.time():.3f}\n")
        deadline = time.monotonic() + timeout_s
        while not (folder / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.2)

    def barrier(self, timeout_s: float = 600.0) -> None:
        if self.barrier_dir is None:
            return
        folder = Path(self.barrier_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / str(os.getpid())).write_text("")
        deadline = time.monotonic() + timeout_s
        while len(list(folder.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)

    def pace(self, step: int, stage: str) -> None:
        if self.pace_dir is None:
            return
        slow = Path(self.pace_dir) / "slow"
        try:
            seconds = float(slow.read_text() or 1)
        except (OSError, ValueError):
            return
        with open(Path(self.pace_dir) / "steps.log", "a") as f:
            f.write(f"{stage} {step} {time.time():.3f}\n")
        time.sleep(seconds)

    def terminate_after_step(self, step: int, stage: str) -> None:
        if self.term_at_step is not None and step == self.term_at_step and self.term_stage in (None, stage):
            os.kill(os.getpid(), signal.SIGTERM)

    def after_step(self, step: int, stage: str) -> None:
        if self.at_step is not None and step == self.at_step and self.stage in (None, stage):
            os.kill(os.getpid(), signal.SIGKILL)
