"""Peak memory of a piece of work on the CPU, measured in a fresh process.

The process's peak resident set (VmHWM) is reset just before the work
(/proc/self/clear_refs) and read after it, with glibc returning every freed block of
64 KiB or more to the OS (MALLOC_MMAP_THRESHOLD_), so the peak follows the live tensor
bytes rather than what the allocator keeps. Used by plan_check.py and ppo_memory.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: now, VmHWM: the peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Start VmHWM again from the current resident set."""
    Path("/proc/self/clear_refs").write_text("5")


def run_child(script: str, job: dict) -> dict | None:
    """`python script --child JOB_JSON` in a fresh process with the allocator setting above;
    its last stdout line parsed as JSON (None, with its stderr printed, when it failed)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, script, "--child", json.dumps(job)], capture_output=True, text=True, env=env,
                       timeout=1800)
    if r.returncode:
        print(r.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])
