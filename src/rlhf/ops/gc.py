"""`rlhf gc`: remove what interrupted writes left in a run root, never a committed artifact.

A crash, a preemption or a kill mid-write can leave, in a local folder or an S3 prefix:
- staging folders (`.<name>.staging-<id>/`, `.<name>.old-<id>/`), readers' views (`.<name>.view-<id>/`)
  and temp files (`.<name>.<random>.tmp`) of the local store;
- artifact folders whose upload never reached its commit marker (files and maybe a
  `MANIFEST.json`, no `_COMMITTED`), above all step checkpoints (`<stage>/checkpoints/
  step-N/`, with their DeepSpeed node parts `step-N.node-K/`) that a restarted stage
  will never read.

A group is removed only when its newest file is older than `older_than_s`, so a write in
progress (another run, a stage still uploading) is left alone. Anything under a committed
artifact (a folder holding `_COMMITTED`), and every loose file a run writes atomically
(`summary.json`, `pipeline.json`, `result.json`, ...), is kept.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from dataclasses import dataclass

from rlhf.adapters.store import COMMIT_MARKER, MANIFEST

_STEP = re.compile(r"^(step-\d+)(\.node-\d+)?$")
_STAGING = re.compile(r"^\..+\.(staging|old|partial|view)(-[0-9A-Za-z_]+)?$")
"""The local store's staging folders of a write, versions it moved aside to commit a new one,
and the read-only views it hands readers (removed when their process exits; left by a kill)."""


@dataclass(frozen=True)
class Leftover:
    prefix: str
    """The folder (or temp file) to remove, relative to the store root."""
    why: str
    files: int
    bytes: int
    age_s: float


def _group_of(key: str, committed: set[str], manifested: set[str]) -> tuple[str, str] | None:
    """The leftover group a key belongs to and why, or None when it is kept."""
    parts = key.split("/")
    for i in range(1, len(parts)):
        if "/".join(parts[:i]) in committed:
            return None  # inside a committed artifact
    for i, part in enumerate(parts):
        if _STAGING.match(part) and i < len(parts) - 1:
            if part.split(".")[-1].startswith("view"):
                return "/".join(parts[:i + 1]), "reader's view left by a process that did not exit cleanly"
            return "/".join(parts[:i + 1]), "staging folder of an interrupted write"
    if parts[-1].startswith(".") and parts[-1].endswith(".tmp"):
        return key, "temp file of an interrupted write"
    for i in range(1, len(parts)):
        m = _STEP.match(parts[i])
        if parts[i - 1] == "checkpoints" and m:
            step = "/".join(parts[:i - 1] + ["checkpoints", m.group(1)])
            if step not in committed:
                return "/".join(parts[:i + 1]), "checkpoint that was never committed"
            return None  # a node part of a committed checkpoint
    for i in range(len(parts) - 1, 0, -1):
        if "/".join(parts[:i]) in manifested:
            return "/".join(parts[:i]), "artifact upload that never reached its commit marker"
    return None


def leftovers(store, older_than_s: float, now: float | None = None) -> list[Leftover]:
    """Uncommitted leftovers in `store` whose newest file is older than `older_than_s`."""
    now = time.time() if now is None else now
    files = list(store.walk(""))
    committed = {k[: -len(COMMIT_MARKER) - 1] for k, _, _ in files if k.endswith("/" + COMMIT_MARKER)}
    manifested = {k[: -len(MANIFEST) - 1] for k, _, _ in files if k.endswith("/" + MANIFEST)}
    groups: dict[tuple[str, str], list[tuple[float, int]]] = defaultdict(list)
    for key, mtime, size in files:
        group = _group_of(key, committed, manifested)
        if group is not None:
            groups[group].append((mtime, size))
    out = []
    for (prefix, why), stats in sorted(groups.items()):
        age = now - max(m for m, _ in stats)
        if age >= older_than_s:
            out.append(Leftover(prefix, why, len(stats), sum(s for _, s in stats), age))
    return out


def collect(store, older_than_s: float, dry_run: bool = False) -> list[Leftover]:
    """Remove (unless `dry_run`) and return the leftovers of `store`."""
    found = leftovers(store, older_than_s)
    if not dry_run:
        for item in found:
            store.delete(item.prefix)
    return found


def parse_age(text: str) -> float:
    """`90s`, `30m`, `24h`, `7d` (or plain seconds) -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text or "")
    if not m:
        raise ValueError(f"--older-than {text!r}: give a number with s, m, h or d, e.g. 24h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
