"""Graceful preemption: Kubernetes sends SIGTERM, then SIGKILL after the pod's grace
period, to a pod on a preempted or spot node.

While a training loop runs (`rlhf.train.loop.Loop`), SIGTERM only raises a flag. The
loop finishes the optimizer step (or PPO update) in flight, writes a checkpoint, flushes
the metrics, and exits with `PREEMPTED_EXIT_CODE`, which KFP's retry policy (and
kfp.local's) answers by running the step again: it resumes from that checkpoint, no
update lost. Under torchrun every rank gets the signal; they agree on the step to stop
at (`Dist.sum`), so the checkpoint is one collective write.
"""

from __future__ import annotations

import signal
import threading

PREEMPTED_EXIT_CODE = 143
"""128 + SIGTERM: what a process killed by SIGTERM reports, so a retry policy treats it alike."""


class Preempted(SystemExit):
    """The stage stopped for SIGTERM after checkpointing; the process exits with 143."""

    def __init__(self, message: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Preemption:
    """SIGTERM -> `requested`, for as long as it is installed (the loop's lifetime);
    the previous handler comes back on `uninstall`. Only the main thread can install a
    handler: elsewhere (a test calling a stage from a thread) SIGTERM keeps its default."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._installed = False

    def _on_term(self, signum, frame) -> None:
        self.requested = True

    def install(self) -> "Preemption":
        if not self._installed and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_term)
            self._installed = True
        return self

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
