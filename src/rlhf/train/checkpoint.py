"""Resumable checkpoints that are never half-written, for plain torch and DeepSpeed.

Two layers: a checkpoint folder on local disk (`save` / `load`, below), and a
stage's checkpoints in the artifact store (`save_checkpoint` / `resume_checkpoint`),
which every rank of a job calls and which handle DeepSpeed's ZeRO partitions.

A checkpoint is a folder `step-00000120/` holding model weights (safetensors), the
optimiser/scheduler states and RNG states (torch.save, loaded back with
`weights_only=True`: tensors and plain containers only), and `state.json` (data
position, controller state, anything JSON). It is written under a temporary name,
fsynced, renamed into place, and only then marked with `COMPLETE`. `latest()` ignores
folders without the marker, so a crash (even `kill -9`) mid-save leaves the previous
checkpoint as the newest complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlhf.adapters.store import StoreError
from rlhf.config import PipelineConfig
from rlhf.train.distributed import Dist
from rlhf.train.trainable import Trainable

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


# ----------------------------------------------------------------------------- a stage's checkpoints in the store


def config_fingerprint(cfg: PipelineConfig) -> str:
    """Hash of everything that shapes training (not tracking, threads or eval settings)."""
    # the process count is checked on its own (a clearer message); these two change no number
    d = cfg.model_dump(exclude={"tracking": True, "num_threads": True, "device": True, "eval": True, "gate": True,
                                "distributed": {"num_processes", "gradient_checkpointing", "zero3_generation"}})
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class CheckpointMismatch(RuntimeError):
    pass


KEEP_CHECKPOINTS = 2


def _checkpoints(store, stage: str) -> list[str]:
    """Committed checkpoint prefixes of a stage, oldest first."""
    base = f"{stage}/checkpoints"
    return [f"{base}/{d}" for d in store.list_dirs(base)
            if d.startswith("step-") and ".node-" not in d and store.is_committed(f"{base}/{d}")]


def _split(models: dict) -> tuple[dict, dict, dict]:
    """Trainables (with or without a DeepSpeed engine) and plain weights of a checkpoint."""
    engines = {k: m for k, m in models.items() if isinstance(m, Trainable) and m.engine is not None}
    plain = {k: (m.module if isinstance(m, Trainable) else m) for k, m in models.items() if k not in engines}
    objects_of = {k: m for k, m in models.items() if isinstance(m, Trainable) and m.engine is None}
    return engines, plain, objects_of


def save_checkpoint(store, stage: str, step: int, models: dict, state: dict, fingerprint: str,
                    dist: Dist | None = None) -> None:
    """Write a checkpoint, commit it to the store, prune old ones. Every rank calls it.

    `models` maps names to `Trainable`s (weights, optimiser and schedule), modules or
    plain state dicts. Checkpoints live in the artifact store, not on the worker's
    disk, so a retried pipeline task on another machine finds them; the store's commit
    marker is what makes one count, so a kill mid-upload leaves the previous one newest.

    One process: one folder (safetensors, objects.pt, state.json) written locally and
    moved into the store. DeepSpeed: each model's `engine.save_checkpoint` (every rank
    writes its ZeRO partition, plus its RNG state) into a folder shared by the node's
    ranks; each node but the first uploads its part as `step-N.node-K`, then rank 0
    uploads node 0's part with our own files as `step-N`, committed last."""
    engines, plain, objects_of = _split(models)
    state = {**state, "config_fingerprint": fingerprint, "world_size": dist.world if dist else 1}
    if not engines:
        objects = {f"{k}.{o}": v for k, t in objects_of.items() for o, v in t.objects().items()}
        with tempfile.TemporaryDirectory(prefix="rlhf-ckpt-") as tmp:
            path = save(Path(tmp), step, models=plain, objects=objects, state=state)
            store.put_dir(path, f"{stage}/checkpoints/{path.name}", move=True)
    else:
        name = f"step-{step:08d}"
        local = scratch_dir(store.uri(""), stage, dist) / name
        if dist.node_main:
            shutil.rmtree(local, ignore_errors=True)
            local.mkdir(parents=True)
        dist.barrier()
        for k, t in engines.items():
            t.engine.save_checkpoint(str(local / f"ds-{k}"), tag="ckpt", save_latest=False)
        torch.save(rng_state(), local / f"rng-rank-{dist.rank:05d}.pt")
        nodes = _nodes(dist)  # collective: every rank
        if dist.main:
            save(local / "main", step, models=plain, objects={}, state={**state, "nodes": nodes}, keep=1)
        dist.barrier()
        if dist.node_main and not dist.main:
            store.put_dir(local, f"{stage}/checkpoints/{name}.node-{dist.node}")
        dist.barrier()
        if dist.main:
            store.put_dir(local, f"{stage}/checkpoints/{name}")
        dist.barrier()
        if dist.node_main:
            shutil.rmtree(local, ignore_errors=True)
    if dist is None or dist.main:
        for old in _checkpoints(store, stage)[:-KEEP_CHECKPOINTS]:
            for part in [old, *(f"{old}.node-{n}" for n in range(1, 1 + _nodes_of(store, old)))]:
                store.delete(part)
    if dist is not None:
        dist.barrier()


def _nodes(dist) -> int:
    if dist.world == 1:
        return 1
    t = torch.tensor([dist.node], device=dist._comm_device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item()) + 1


def _nodes_of(store, prefix: str) -> int:
    """Node parts beside a checkpoint (DeepSpeed on several nodes), read from its state."""
    key = f"{prefix}/main/{prefix.rsplit('/', 1)[-1]}/state.json"
    return json.loads(store.read_bytes(key)).get("nodes", 1) - 1 if store.exists(key) else 0


DEEPSPEED_CHECKPOINT_GLOBALS = (
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
)
"""The plain data classes a DeepSpeed checkpoint holds beside tensors (read with
`torch.serialization.get_unsafe_globals_in_checkpoint` on ZeRO checkpoints): the only
globals its files may name when we load them."""


def load_weights_only(path, map_location=None):
    """`torch.load` of a DeepSpeed checkpoint file with `weights_only=True`: tensors, plain
    containers and `DEEPSPEED_CHECKPOINT_GLOBALS`, never arbitrary pickled code (DeepSpeed's
    own engine loads with `weights_only=False`, which runs whatever the file names)."""
    import importlib

    allowed = []
    for name in DEEPSPEED_CHECKPOINT_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # another DeepSpeed version: that class is not in its files
            pass
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location=map_location, weights_only=True)


class _Unusable(Exception):
    """A checkpoint that cannot be loaded (failed verification or a broken file)."""


def resume_checkpoint(store, stage: str, models: dict, fingerprint: str, dist: Dist | None = None) -> dict | None:
    """Load the stage's newest usable committed checkpoint into `models` (see
    save_checkpoint); return its state, or None when there is none. Every rank calls it.

    Each checkpoint is verified against its sha256 manifest before anything is loaded.
    One that fails (a file lost or changed after its marker was written: a power loss
    before the data reached the disk, a damaged object) is reported on stderr and skipped
    for the previous complete one, never silently; when none is usable the error names
    them all. Refuses checkpoints written under a different training config or process
    count: resuming them would silently mix two runs (ZeRO partitions depend on the count)."""
    engines, plain, objects_of = _split(models)
    found = _checkpoints(store, stage)
    if not found:
        return None
    world = dist.world if dist else 1
    bad = []
    for prefix in reversed(found):
        try:
            if not engines:
                state = _resume_plain(store, prefix, plain, objects_of, fingerprint, world)
            else:
                state = _resume_engines(store, stage, prefix, engines, plain, fingerprint, dist)
        except _Unusable as e:
            bad.append(f"{store.uri(prefix)} ({e})")
            if dist is None or dist.main:
                print(f"warning: {stage}: checkpoint {store.uri(prefix)} is unusable and is skipped: {e}",
                      file=sys.stderr, flush=True)
            continue
        if bad and (dist is None or dist.main):
            print(f"warning: {stage}: resuming from {store.uri(prefix)}, the newest usable checkpoint "
                  f"({len(bad)} newer skipped)", file=sys.stderr, flush=True)
        for key in ("config_fingerprint", "world_size", "nodes"):
            state.pop(key, None)
        state["resumed_from"] = state["step"]
        return state
    raise StoreError(f"{stage}: no usable checkpoint: {'; '.join(bad)}. To start the stage over, delete "
                     f"{store.uri(f'{stage}/checkpoints')}")


def _resume_plain(store, prefix: str, plain: dict, objects_of: dict, fingerprint: str, world: int) -> dict:
    try:
        path = store.get_dir(prefix)  # verified against its sha256 manifest before anything is read
    except StoreError as e:
        raise _Unusable(str(e)) from None
    _check_resumable(store, prefix, _written_state(path), fingerprint, world)
    try:
        objects, state = load(path, models=plain)
    except Exception as e:  # a file the manifest vouches for, yet unreadable: a checkpoint written broken
        raise _Unusable(f"{type(e).__name__}: {e}") from None
    for k, t in objects_of.items():
        t.load_objects({o.split(".", 1)[1]: v for o, v in objects.items() if o.startswith(f"{k}.")})
    return state


def _resume_engines(store, stage: str, prefix: str, engines: dict, plain: dict, fingerprint: str, dist: Dist) -> dict:
    """DeepSpeed: each node's first rank fetches (and verifies) the checkpoint and its other
    nodes' parts; all ranks agree before any of them loads, so one node's bad copy makes
    every rank skip it together."""
    local = scratch_dir(store.uri(""), stage, dist) / "resume"
    error = ""
    if dist.node_main:
        shutil.rmtree(local, ignore_errors=True)
        try:
            store.get_dir(prefix, local)
            for n in range(1, 1 + _nodes_of(store, prefix)):  # other nodes' ZeRO partitions
                store.get_dir(f"{prefix}.node-{n}", local)
        except StoreError as e:
            error = str(e)
    if dist.sum(1.0 if error else 0.0) > 0:  # collective: every rank learns that some node failed
        if dist.node_main:
            shutil.rmtree(local, ignore_errors=True)
        raise _Unusable(error or "another node could not fetch or verify its part")
    dist.barrier()
    _check_resumable(store, prefix, _written_state(local), fingerprint, dist.world)
    main = next((local / "main").glob("step-*"))
    objects, state = load(main, models=plain)
    for k, t in engines.items():
        t.engine.checkpoint_engine.load = load_weights_only  # no pickle from the store
        t.engine.load_checkpoint(str(local / f"ds-{k}"), tag="ckpt")
    set_rng_state(torch.load(local / f"rng-rank-{dist.rank:05d}.pt", weights_only=True))
    dist.barrier()
    if dist.node_main:
        shutil.rmtree(local, ignore_errors=True)
    return state


def _written_state(path: Path) -> dict:
    """state.json of a checkpoint folder, one-process or DeepSpeed layout (main/step-N/)."""
    found = [path / "state.json", *sorted((path / "main").glob("step-*/state.json"))]
    return next((json.loads(f.read_text()) for f in found if f.is_file()), {})


def _check_resumable(store, prefix: str, written: dict, fingerprint: str, world: int) -> None:
    if written.get("config_fingerprint") != fingerprint:
        raise CheckpointMismatch(
            f"{store.uri(prefix)} was written with a different configuration; to start this stage over, delete "
            f"{store.uri(prefix.rsplit('/', 1)[0])} (or use a new --output folder); to resume it, rerun with the "
            "original config")
    if written.get("world_size", 1) != world:
        raise CheckpointMismatch(
            f"{store.uri(prefix)} was written by {written.get('world_size', 1)} training processes and this run has "
            f"{world}; resume with the same distributed.num_processes / GPU count, or delete "
            f"{store.uri(prefix.rsplit('/', 1)[0])} to start the stage over")


def scratch_dir(store_uri: str, stage: str, dist: Dist) -> Path:
    """A folder every rank of this node agrees on (same path, no coordination), for
    DeepSpeed checkpoint files on their way to or from the store."""
    key = hashlib.sha256(f"{store_uri}|{stage}".encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"rlhf-dist-{key}-node{dist.node}"
