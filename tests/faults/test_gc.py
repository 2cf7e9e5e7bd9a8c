"""`rlhf gc` (issue 14 item 10): leftovers of interrupted writes go, committed artifacts,
loose run files, user folders and young writes in progress stay; local and S3."""

from __future__ import annotations

import os
import time

import pytest

from rlhf.adapters.store import COMMIT_MARKER, LocalStore
from rlhf.cli import main
from rlhf.ops.gc import leftovers, parse_age


def _artifact(tmp_path, name="x"):
    src = tmp_path / f"src-{name}"
    src.mkdir(exist_ok=True)
    (src / "model.safetensors").write_bytes(b"w" * 100)
    return src


def _fill(store, tmp_path):
    """A run root as crashes leave it."""
    store.put_dir(_artifact(tmp_path), "sft/model")  # committed
    store.put_dir(_artifact(tmp_path), "ppo/checkpoints/step-00000004")  # committed checkpoint
    store.put_dir(_artifact(tmp_path), "ppo/checkpoints/step-00000004.node-1")  # its node part (no marker)
    store.delete("ppo/checkpoints/step-00000004.node-1/" + COMMIT_MARKER)
    store.put_dir(_artifact(tmp_path), "ppo/checkpoints/step-00000006")  # killed before its marker
    store.delete("ppo/checkpoints/step-00000006/" + COMMIT_MARKER)
    store.put_dir(_artifact(tmp_path), "ppo/checkpoints/step-00000006.node-1")
    store.delete("ppo/checkpoints/step-00000006.node-1/" + COMMIT_MARKER)
    store.put_dir(_artifact(tmp_path), "reward/model")  # an upload that never reached its marker
    store.delete("reward/model/" + COMMIT_MARKER)
    store.write_json("summary.json", {"promoted": True})  # loose, atomic: kept
    store.write_bytes("user-model/config.json", b"{}")  # a folder a user uploaded: no manifest, kept


GONE = {"ppo/checkpoints/step-00000006", "ppo/checkpoints/step-00000006.node-1", "reward/model"}


def test_local_leftovers_old_enough_go_and_the_rest_stays(tmp_path, capsys):
    root = tmp_path / "run"
    store = LocalStore(root)
    _fill(store, tmp_path)
    staging = root / "eval" / ".model.staging-k3j9x2"
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"half")
    (root / "sft" / ".result.json.abc123.tmp").write_bytes(b"{")
    young = root / "ppo" / ".model.staging-a81bq0"  # another stage writing right now
    young.mkdir(parents=True)
    (young / "a.bin").write_bytes(b"new")
    old = time.time() - 3 * 3600
    for p in root.rglob("*"):
        if young not in (p, *p.parents):
            os.utime(p, (old, old))

    found = {x.prefix for x in leftovers(store, 3600)}
    assert found == GONE | {"eval/.model.staging-k3j9x2", "sft/.result.json.abc123.tmp"}

    assert main(["gc", str(root), "--older-than", "1h", "--dry-run"]) == 0
    assert "would remove" in capsys.readouterr().out and staging.exists()
    assert main(["gc", str(root), "--older-than", "1h"]) == 0
    out = capsys.readouterr().out
    assert "5 leftovers" in out and "checkpoint that was never committed" in out
    assert not staging.exists() and not (root / "sft" / ".result.json.abc123.tmp").exists()
    assert young.exists() and store.is_committed("sft/model") and store.is_committed("ppo/checkpoints/step-00000004")
    assert (root / "ppo/checkpoints/step-00000004.node-1/model.safetensors").exists()
    assert store.exists("summary.json") and store.exists("user-model/config.json")
    assert not any((root / g).exists() for g in GONE)
    store.get_dir("sft/model")  # still verifies
    assert leftovers(store, 3600) == []


def test_s3_leftovers_go_and_committed_artifacts_stay(s3_store, tmp_path):
    _fill(s3_store, tmp_path)
    assert {x.prefix for x in leftovers(s3_store, 3600)} == set()  # all of it is seconds old: a write in progress
    found = {x.prefix for x in leftovers(s3_store, 3600, now=time.time() + 7200)}
    assert found == GONE
    for x in found:
        s3_store.delete(x)
    assert s3_store.is_committed("sft/model") and s3_store.is_committed("ppo/checkpoints/step-00000004")
    assert s3_store.exists("ppo/checkpoints/step-00000004.node-1/model.safetensors")
    assert s3_store.exists("summary.json") and s3_store.exists("user-model/config.json")
    assert not any(s3_store.exists(f"{g}/model.safetensors") for g in GONE)
    s3_store.get_dir("sft/model")


def test_ages_parse_with_their_unit():
    assert [parse_age(x) for x in ("90", "90s", "30m", "24h", "7d")] == [90, 90, 1800, 86400, 604800]
    with pytest.raises(ValueError, match="e.g. 24h"):
        parse_age("yesterday")
