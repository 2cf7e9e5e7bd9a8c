"""Resumable checkpoints: round trip of weights, optimiser, RNG and state; crash safety."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch

from rlhf.train import checkpoint
from rlhf.train.checkpoint import MARKER, complete_checkpoints, latest


def _model_and_opt(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, opt


def _one_step(model, opt):
    loss = model(torch.randn(5, 4)).pow(2).sum()
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_round_trip(tmp_path):
    model, opt = _model_and_opt(0)
    _one_step(model, opt)
    table = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2, 3])}
    path = checkpoint.save(tmp_path, 7, models={"policy": model, "table": table},
                           objects={"opt": opt.state_dict(), "extra": {"n": 3}},
                           state={"data_pos": 42, "kl": {"beta": 0.05}})
    assert path == tmp_path / "step-00000007"
    assert (path / MARKER).is_file()
    assert (path / "policy.safetensors").is_file()

    # Values drawn right after save.
    t_after = torch.rand(3)
    r_after = random.random()
    n_after = np.random.rand()

    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = opt.state_dict()
    step_before = int(saved_opt["state"][0]["step"])
    assert step_before == 1

    # Fresh objects with different weights and no optimiser state.
    model2, opt2 = _model_and_opt(123)
    assert not torch.equal(model2.weight, saved_weights["weight"])
    table2 = {"stale": torch.zeros(1)}
    torch.rand(10)
    random.random()

    objects, state = checkpoint.load(path, models={"policy": model2, "table": table2})

    # RNG restored to the moment of save.
    assert torch.equal(torch.rand(3), t_after)
    assert random.random() == r_after
    assert np.random.rand() == n_after

    for k, v in saved_weights.items():
        assert torch.equal(model2.state_dict()[k], v)
    assert set(table2) == {"w", "b"}
    assert torch.equal(table2["w"], table["w"]) and torch.equal(table2["b"], table["b"])
    assert table2["b"].dtype == torch.int64

    assert "rng" not in objects
    assert objects["extra"] == {"n": 3}
    opt2.load_state_dict(objects["opt"])
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt2.state_dict()["state"][0][k], saved_opt["state"][0][k])
    assert int(opt2.state_dict()["state"][0]["step"]) == 1
    assert opt2.param_groups[0]["lr"] == 0.1

    assert state == {"step": 7, "data_pos": 42, "kl": {"beta": 0.05}}
    assert json.loads((path / "state.json").read_text()) == state


def test_resumed_training_matches_uninterrupted(tmp_path):
    # Reference: two steps in a row.
    model, opt = _model_and_opt(0)
    torch.manual_seed(1)
    _one_step(model, opt)
    _one_step(model, opt)
    ref = model.weight.detach().clone()

    # Interrupted: one step, checkpoint, then resume into fresh objects.
    model, opt = _model_and_opt(0)
    torch.manual_seed(1)
    _one_step(model, opt)
    path = checkpoint.save(tmp_path, 1, models={"m": model}, objects={"opt": opt.state_dict()}, state={})
    torch.manual_seed(999)  # the crash scrambles the RNG
    model2, opt2 = _model_and_opt(5)
    objects, _ = checkpoint.load(path, models={"m": model2})
    opt2.load_state_dict(objects["opt"])
    _one_step(model2, opt2)
    assert torch.equal(model2.weight, ref)


def _save(root, step, **kw):
    return checkpoint.save(root, step, models={"m": {"x": torch.tensor([float(step)])}}, objects={},
                           state={}, **kw)


def test_latest_ignores_half_written(tmp_path):
    _save(tmp_path, 10)
    _save(tmp_path, 20)
    # A save interrupted before the rename...
    tmp = tmp_path / ".tmp-step-00000030"
    tmp.mkdir()
    (tmp / "m.safetensors").write_bytes(b"partial")
    # ... and one renamed but not yet marked.
    unmarked = tmp_path / "step-00000040"
    unmarked.mkdir()
    (unmarked / "state.json").write_text("{}")
    assert latest(tmp_path) == tmp_path / "step-00000020"
    assert complete_checkpoints(tmp_path) == [tmp_path / "step-00000010", tmp_path / "step-00000020"]


def test_latest_none_when_empty(tmp_path):
    assert latest(tmp_path / "absent") is None
    assert latest(tmp_path) is None
    (tmp_path / "step-00000001").mkdir()
    assert latest(tmp_path) is None


def test_latest_orders_numerically(tmp_path):
    _save(tmp_path, 9, keep=10)
    _save(tmp_path, 100, keep=10)
    _save(tmp_path, 11, keep=10)
    assert latest(tmp_path) == tmp_path / "step-00000100"


def test_keep_prunes_old_complete(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    assert not (tmp_path / "step-00000001").exists()
    assert not (tmp_path / "step-00000002").exists()
    # No leftover temp folders.
    assert not list(tmp_path.glob(".tmp-*"))


def test_keep_does_not_count_incomplete(tmp_path):
    _save(tmp_path, 1, keep=2)
    (tmp_path / "step-00000002").mkdir()  # incomplete, must not push step 1 out
    _save(tmp_path, 3, keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000001", "step-00000003"]


def test_resave_same_step_overwrites(tmp_path):
    _save(tmp_path, 5)
    path = checkpoint.save(tmp_path, 5, models={"m": {"x": torch.tensor([42.0])}}, objects={}, state={"v": 2})
    target = {}
    _, state = checkpoint.load(path, models={"m": target})
    assert target["x"].item() == 42.0
    assert state == {"step": 5, "v": 2}


def test_stale_tmp_folder_is_replaced(tmp_path):
    tmp = tmp_path / ".tmp-step-00000003"
    tmp.mkdir()
    (tmp / "junk").write_text("x")
    path = _save(tmp_path, 3)
    assert not tmp.exists()
    assert not (path / "junk").exists()


class NotATensor:
    """An arbitrary class: torch.load(weights_only=True) must refuse to rebuild it."""


def test_load_is_weights_only(tmp_path):
    # Objects that are not tensors / plain containers cannot be smuggled into a checkpoint.
    path = checkpoint.save(tmp_path, 1, models={}, objects={"evil": NotATensor()}, state={})
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only"):
        checkpoint.load(path, models={})


class _Payload:
    """What a hostile checkpoint file carries: unpickling it runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file when unpickled


def test_deepspeed_files_load_without_pickle(tmp_path):
    """DeepSpeed checkpoint files are read with weights_only=True: their plain data classes
    load, a file that names any other global is refused before it runs."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    good = tmp_path / "optim_states.pt"
    torch.save({"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0), "w": torch.ones(2)}, good)
    loaded = checkpoint.load_weights_only(good)
    assert loaded["zero_stage"] == ZeroStageEnum.gradients and torch.equal(loaded["w"], torch.ones(2))

    marker = tmp_path / "pwned"
    bad = tmp_path / "hostile.pt"
    torch.save({"optimizer_state_dict": _Payload(str(marker))}, bad)
    with pytest.raises(pickle.UnpicklingError):
        checkpoint.load_weights_only(bad)
    assert not marker.exists()
