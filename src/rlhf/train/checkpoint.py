"""Resumable checkpoints that are never half-written.

A checkpoint is a folder `step-00000120/` holding model weights (safetensors), the
optimiser/scheduler states and RNG states (torch.save, loaded back with
`weights_only=True`: tensors and plain containers only), and `state.json` (data
position, controller state, anything JSON). It is written under a temporary name,
fsynced, renamed into place, and only then marked with `COMPLETE`. `latest()` ignores
folders without the marker, so a crash (even `kill -9`) mid-save leaves the previous
checkpoint as the newest complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MARKER = "COMPLETE"


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), np_state[2], np_state[3], np_state[4]],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _state_dict(module) -> dict[str, torch.Tensor]:
    sd = module if isinstance(module, dict) else module.state_dict()
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def save(root: Path, step: int, *, models: dict[str, torch.nn.Module | dict], objects: dict[str, Any],
         state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` under `root`; keep the newest `keep` complete ones."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (got {keep}): the newest checkpoint is what resume needs")
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, module in models.items():
        save_file(_state_dict(module), str(tmp / f"{name}.safetensors"))
    torch.save({**objects, "rng": rng_state()}, tmp / "objects.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, sort_keys=True))
    for f in tmp.iterdir():
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    (final / MARKER).write_text("ok\n")
    _fsync_dir(final)
    _fsync_dir(root)
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / MARKER).is_file())


def latest(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def load(path: Path, *, models: dict[str, torch.nn.Module | dict]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore weights in place (modules, or plain state dicts) and the global RNG;
    return (objects, state)."""
    for name, target in models.items():
        weights = load_file(str(path / f"{name}.safetensors"))
        if isinstance(target, dict):
            target.clear()
            target.update(weights)
        else:
            target.load_state_dict(weights)
    objects = torch.load(path / "objects.pt", weights_only=True)
    set_rng_state(objects.pop("rng"))
    state = json.loads((path / "state.json").read_text())
    return objects, state
