"""The loop driver beneath the training stages (rlhf.train.loop): what it owns is
tested here once, for every stage that uses it."""

from __future__ import annotations

import pytest
import torch

from rlhf.adapters.store import LocalStore
from rlhf.adapters.tracking import NullTracker
from rlhf.config import DistributedConfig, OptimConfig
from rlhf.train.distributed import Dist
from rlhf.train.faults import Faults
from rlhf.train.loop import Batches, Evaluation, Loop, StepLoss, fit
from rlhf.train.trainable import make_trainable

DATA = [(torch.tensor([float(i), 1.0]), torch.tensor([2.0 * i + 1.0])) for i in range(10)]


def run_loop(tmp_path, *, total=7, checkpoint_every=3, stop_at=None, faults=Faults(), seed=0, every_s=None,
             history=()):
    torch.manual_seed(0)
    model = make_trainable(torch.nn.Linear(2, 1), Dist(), DistributedConfig(),
                           OptimConfig(lr=0.05, warmup_steps=1, lr_schedule="cosine"), total_steps=total, batch_size=4)
    tracker, store = NullTracker(), LocalStore(tmp_path / "store")
    loop = Loop("sft", total=total, checkpoint_every=checkpoint_every, models={"model": model}, state={"evals": []},
                store=store, tracker=tracker, dist=Dist(), faults=faults, fingerprint="f" * 16, quiet=True,
                checkpoint_every_s=every_s, history=history)
    loop.resume()

    def loss(batch) -> StepLoss:
        x, y = torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
        return StepLoss(torch.nn.functional.mse_loss(model(x), y), len(batch), {"sft/extra": 1.0})

    def evaluate(step):
        loop.state["evals"].append(step)
        if stop_at and step >= stop_at:
            loop.state["stopped"] = True
        return {"sft/eval_loss": 0.5}

    batches = Batches(DATA, 4, seed, [1] * len(DATA), False, Dist())
    fit(loop, model, batches, loss, prefix="sft", log_epoch=True,
        evaluation=Evaluation(due=lambda s: s % 2 == 0, run=evaluate, unit="rows"))
    return loop, model, tracker, store


def checkpoints(store):
    return store.list_dirs("sft/checkpoints")


def test_fit_steps_logs_evaluates_and_checkpoints(tmp_path):
    loop, model, tracker, store = run_loop(tmp_path)
    assert loop.step == 7 and [s for s, _ in tracker.metrics] == list(range(1, 8))
    first = tracker.metrics[0][1]
    assert set(first) == {"sft/loss", "sft/extra", "sft/grad_norm", "sft/lr", "sft/epoch"}
    assert first["sft/epoch"] == pytest.approx(1 / 3)  # 10 rows, batches of 4: 3 steps an epoch
    assert "perf/rows_per_s" in tracker.metrics[1][1] and "sft/eval_loss" in tracker.metrics[1][1]
    assert loop.state["evals"] == [2, 4, 6]
    assert checkpoints(store) == ["step-00000003", "step-00000006"]  # the newest two are kept
    result = loop.result("rows")
    assert result["steps"] == 7 and result["resumed_from"] is None and result["throughput"]["timed_steps"] == 5


def test_a_stage_that_stops_early_is_checkpointed_at_its_last_step(tmp_path):
    loop, _, _, store = run_loop(tmp_path, total=20, checkpoint_every=100, stop_at=4)
    assert loop.step == 4 and checkpoints(store) == ["step-00000004"]


def test_time_based_checkpoints_beside_the_step_based_ones(tmp_path, monkeypatch):
    import rlhf.train.loop as loop_mod

    clock = iter(range(0, 10_000, 40))  # each reading 40 s later: every step is "slow"
    monkeypatch.setattr(loop_mod.time, "monotonic", lambda: float(next(clock)))
    _, _, _, store = run_loop(tmp_path / "timed", total=5, checkpoint_every=100, every_s=60.0)
    assert checkpoints(store)  # by time (each step reads as 40 s or more)
    _, _, _, store = run_loop(tmp_path / "steps", total=5, checkpoint_every=100)
    assert checkpoints(store) == []  # by steps alone: none in 5 steps


def test_sigterm_checkpoints_the_step_and_exits_143_then_resumes_there(tmp_path):
    """A real SIGTERM (the preemption fault sends it as step 4 ends): step 4 is
    checkpointed though it is no multiple of checkpoint_every, the loop raises Preempted
    (exit code 143), and the next run resumes at 4 and ends where an uninterrupted one does."""
    from rlhf.train.preemption import PREEMPTED_EXIT_CODE, Preempted

    _, straight, _, _ = run_loop(tmp_path / "a", total=7, checkpoint_every=100)
    with pytest.raises(Preempted) as e:
        run_loop(tmp_path / "b", total=7, checkpoint_every=100, faults=Faults(term_at_step=4, term_stage="sft"))
    assert e.value.code == PREEMPTED_EXIT_CODE and "after step 4 of 7" in str(e.value)
    assert checkpoints(LocalStore(tmp_path / "b" / "store")) == ["step-00000004"]
    import signal
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the loop's handler is gone again
    loop, resumed, _, _ = run_loop(tmp_path / "b", total=7, checkpoint_every=100)
    assert loop.state["resumed_from"] == 4
    assert torch.equal(resumed.module.weight, straight.module.weight)


def test_resume_continues_exactly(tmp_path, monkeypatch):
    _, straight, _, _ = run_loop(tmp_path / "a")
    class Crash(Exception):
        pass

    def crash(self, step, stage):  # what the fault does, as an exception: stop right after step 3
        if step == 3:
            raise Crash

    monkeypatch.setattr(Faults, "after_step", crash)
    with pytest.raises(Crash):
        run_loop(tmp_path / "b")
    monkeypatch.undo()
    loop, resumed, tracker, _ = run_loop(tmp_path / "b")
    assert loop.state["resumed_from"] == 3 and [s for s, _ in tracker.metrics] == [4, 5, 6, 7]
    for a, b in zip(straight.module.parameters(), resumed.module.parameters()):
        assert torch.equal(a, b)


def test_history_survives_a_crash_and_is_written_when_the_loop_ends(tmp_path, monkeypatch):
    """`history`: the chosen metrics of every step, in the checkpointed state, so a run
    that crashed after step 5 (checkpoint at 3) and resumed writes each step once, with
    the values of an uninterrupted run; without `history` no file is written."""
    keys = ("sft/loss", "sft/eval_loss")
    run_loop(tmp_path / "a", history=keys)
    straight = LocalStore(tmp_path / "a" / "store").read_json("sft/history.json")
    assert [r["step"] for r in straight] == list(range(1, 8))
    assert all(set(r) == {"step", "sft/loss"} | ({"sft/eval_loss"} if r["step"] % 2 == 0 else set())
               for r in straight)

    class Crash(Exception):
        pass

    def crash(self, step, stage):
        if step == 5:
            raise Crash

    monkeypatch.setattr(Faults, "after_step", crash)
    with pytest.raises(Crash):
        run_loop(tmp_path / "b", history=keys)
    monkeypatch.undo()
    assert not LocalStore(tmp_path / "b" / "store").exists("sft/history.json")  # written when the loop ends
    loop, _, _, store = run_loop(tmp_path / "b", history=keys)
    assert loop.state["resumed_from"] == 3
    assert store.read_json("sft/history.json") == straight  # resume is exact (test_resume_continues_exactly)
    _, _, _, plain = run_loop(tmp_path / "c")
    assert not plain.exists("sft/history.json")


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    from rlhf.train.checkpoint import CheckpointMismatch

    run_loop(tmp_path)
    model = make_trainable(torch.nn.Linear(2, 1), Dist(), DistributedConfig(), OptimConfig(), total_steps=7,
                           batch_size=4)
    loop = Loop("sft", total=7, checkpoint_every=3, models={"model": model}, state={}, store=LocalStore(
        tmp_path / "store"), tracker=NullTracker(), dist=Dist(), faults=Faults(), fingerprint="g" * 16, quiet=True)
    with pytest.raises(CheckpointMismatch, match="different configuration"):
        loop.resume()


def test_faults_kill_only_at_their_step_and_stage(monkeypatch):
    killed = []
    monkeypatch.setattr("rlhf.train.faults.os.kill", lambda pid, sig: killed.append((pid, sig)))
    Faults(3, "ppo").after_step(3, "sft")
    Faults(3, "ppo").after_step(2, "ppo")
    assert not killed
    Faults(3, "ppo").after_step(3, "ppo")
    Faults(5).after_step(5, "reward")
    assert len(killed) == 2


def test_a_nan_loss_stops_the_stage_without_checkpointing_it(tmp_path):
    from rlhf.train.loop import TrainingDiverged

    store = LocalStore(tmp_path / "store")
    model = make_trainable(torch.nn.Linear(2, 1), Dist(), DistributedConfig(), OptimConfig(), total_steps=4,
                           batch_size=4)
    loop = Loop("ppo", total=4, checkpoint_every=1, models={"model": model}, state={}, store=store,
                tracker=NullTracker(), dist=Dist(), faults=Faults(), fingerprint="f" * 16, quiet=True)
    it = iter(loop)
    next(it)
    loop.advance(1)
    loop.end_step({"ppo/policy_loss": 0.5})
    next(it)
    loop.advance(1)
    with pytest.raises(TrainingDiverged, match=r"ppo: training diverged at step 2: ppo/value_loss = nan.*ppo.lr"):
        loop.end_step({"ppo/policy_loss": 0.4, "ppo/value_loss": float("nan")})
    assert store.list_dirs("ppo/checkpoints") == ["step-00000001"]
