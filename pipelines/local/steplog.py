"""`rlhf run`'s output: one line per finished step on the terminal, every step's log in a file.

kfp.local prints each step's executor input and output, and each step prints its own
log: hundreds of lines per run. While the pipeline runs, this process's stdout and
stderr (and so every step process's, which inherit them) go into a pipe; a thread
copies everything to the log file and writes a line to the terminal when kfp.local
reports that a step finished ("train-sft: success (139 s)"), retries included. The
summary and a failing step's error are printed by the caller after the pipe is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from rlhf.redaction import guard_streams

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = re.compile(r" - INFO - Executing task '([^']+)'")
_END = re.compile(r" - (?:INFO|ERROR) - Task '([^']+)' finished with status (\w+)")


def progress_line(line: str, started: dict[str, float], now: float) -> str | None:
    """The terminal line for one line of kfp.local's log, or None."""
    line = _ANSI.sub("", line)
    if m := _START.search(line):
        started[m.group(1)] = now
        return None
    if m := _END.search(line):
        name, status = m.groups()
        took = now - started.pop(name, now)
        return f"  {name}: {status.lower()} ({took:.0f} s)"
    return None


@contextlib.contextmanager
def step_log(path: Path, progress: bool = True) -> Iterator[None]:
    """Send this process's (and its children's) stdout and stderr to `path` while the
    block runs; with `progress`, a line per finished step to the terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved_out), "w", buffering=1, errors="replace")
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    # Python's own streams too, where they are not the file descriptors (pytest, notebooks)
    streams = sys.stdout, sys.stderr
    sys.stdout = os.fdopen(os.dup(1), "w", buffering=1, errors="replace")
    sys.stderr = os.fdopen(os.dup(2), "w", buffering=1, errors="replace")
    guard_streams()  # through the one redaction, as before
    log = open(path, "ab")

    def pump() -> None:
        started: dict[str, float] = {}
        with os.fdopen(read_fd, "rb") as pipe:
            for raw in pipe:  # until every writer (this process, its steps) has let go
                log.write(raw)
                log.flush()
                if progress:
                    try:
                        line = progress_line(raw.decode(errors="replace"), started, time.monotonic())
                        if line:
                            terminal.write(line + "\n")
                    except Exception:  # noqa: BLE001 - the terminal line is a courtesy; keep draining
                        pass

    reader = threading.Thread(target=pump, name="rlhf-step-log", daemon=True)
    reader.start()
    try:
        yield
    finally:
        sys.stdout.close()
        sys.stderr.close()
        sys.stdout, sys.stderr = streams
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        reader.join(timeout=10)  # a step's stray child that keeps the pipe open must not hang the command
        log.close()
        terminal.close()
