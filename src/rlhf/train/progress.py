"""Progress bars, wall clocks and the steady-state throughput of a training loop."""

from __future__ import annotations

import time

from tqdm.auto import tqdm


def progress(total: int, desc: str, quiet: bool):
    return tqdm(total=total, desc=desc, disable=quiet, dynamic_ncols=True, leave=False)


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


class StepClock:
    """Steady-state throughput of a training loop: `tick(units)` at the end of every
    step; the first `untimed` steps of this process (warm-up: allocator, thread pools,
    first-call kernels) are not counted, so rates are comparable between runs of any
    length. Evaluations and checkpoints between two timed step ends count."""

    def __init__(self, untimed: int = 2):
        untimed = max(untimed, 1)  # the clock starts at the end of a step: at least the first is untimed
        self.untimed, self.ticks, self.units, self.t0, self.t_last = untimed, 0, 0.0, None, None
        self.parts: dict[str, float] = {}

    def tick(self, units: float = 1.0, **parts: float) -> None:
        now = time.perf_counter()
        self.ticks += 1
        if self.ticks == self.untimed:
            self.t0 = now
        elif self.ticks > self.untimed:
            self.units += units
            for k, v in parts.items():
                self.parts[k] = self.parts.get(k, 0.0) + v
        self.t_last = now

    @property
    def timed_steps(self) -> int:
        return max(0, self.ticks - self.untimed)

    @property
    def seconds(self) -> float:
        return (self.t_last - self.t0) if self.t0 is not None else 0.0

    def rate(self) -> float | None:
        """Units per second over the timed steps (None when too few steps ran)."""
        return self.units / self.seconds if self.timed_steps and self.seconds > 0 else None

    def summary(self, unit: str) -> dict:
        return {"untimed_steps": self.untimed, "timed_steps": self.timed_steps, "timed_s": self.seconds,
                f"{unit}_per_s": self.rate(), **{f"{k}_s": v for k, v in self.parts.items()}}
