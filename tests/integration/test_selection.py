"""PPO's over-optimisation control: the policy it saves (and the pipeline registers) is
the one the independent judge scored best, and it stops early when the judge falls
while the proxy rises.

The judge's opinion is scripted per evaluation (what a judge would say of a policy that
peaks and then hacks the proxy); everything else is the real PPO stage: the weights kept
at the peak, checkpointed, put back and saved.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import rlhf.stages.selection as selection
from rlhf.cli import main

TINY = ["--preset", "tiny", "--set", "num_threads=1", "--set", "tracking.log_models=false",
        "--set", "ppo.judge_every=1", "--set", "ppo.checkpoint_every=2", "--set", "ppo.judge_prompts=16"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("sel-base")
    for stage in ("prep", "sft", "reward"):
        assert main(["stage", stage, *TINY, "--output", str(root), "--quiet"]) == 0
    return root


def scripted(monkeypatch, judge: list[float], proxy: list[float], se: float = 0.0) -> list[int]:
    """The judge says judge[k] (and the proxy proxy[k]) at its k-th evaluation, with the
    standard error `se`."""
    calls = []

    def judge_policy(models, judge_, rows, ids, pcfg, dist, seed):
        k = len(calls)
        calls.append(k)
        return {"ppo/judge_score": judge[k], "ppo/judge_proxy": proxy[k], "ppo/judge_sqrt_kl": 0.1 * k,
                "ppo/judge_se": se}

    monkeypatch.setattr(selection, "judge_policy", judge_policy)
    return calls


def ppo(base, out, *sets: str) -> dict:
    for prev in ("prep", "sft", "reward"):
        shutil.copytree(base / prev, out / prev, ignore=shutil.ignore_patterns("checkpoints"))
    args = [a for s in sets for a in ("--set", s)]
    assert main(["stage", "ppo", *TINY, *args, "--output", str(out), "--quiet"]) == 0
    return json.loads((out / "ppo/result.json").read_text())


def weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "ppo/model/model.safetensors"))


def test_the_peak_checkpoint_is_saved_not_the_last(base, tmp_path, monkeypatch):
    # evaluations at updates 0 (SFT), 1, ..., 6: the judge peaks at update 3, the proxy keeps rising
    scripted(monkeypatch, judge=[0.1, 0.2, 0.4, 0.9, 0.6, 0.5, 0.3], proxy=[0, 1, 2, 3, 4, 5, 6])
    res = ppo(base, tmp_path / "judge", "ppo.updates=6", "ppo.patience=null")
    assert res["updates"] == 6 and res["selected_update"] == 3 and not res["early_stopped"]
    assert [c[0] for c in res["judge_curve"]] == [0, 1, 2, 3, 4, 5, 6]

    # the policy after exactly 3 updates (the same run, stopped there) is what was saved
    scripted(monkeypatch, judge=[0.0] * 4, proxy=[0.0] * 4)
    ppo(base, tmp_path / "three", "ppo.updates=3", "ppo.select=last")
    peak, three, sft = weights(tmp_path / "judge"), weights(tmp_path / "three"), load_file(
        str(base / "sft/model/model.safetensors"))
    assert all(torch.equal(peak[k], three[k]) for k in peak)
    assert any(not torch.equal(peak[k], sft[k]) for k in peak), "the selected policy is a trained one"

    # select=last keeps the last policy
    scripted(monkeypatch, judge=[0.1, 0.2, 0.4, 0.9, 0.6, 0.5, 0.3], proxy=[0, 1, 2, 3, 4, 5, 6])
    res = ppo(base, tmp_path / "last", "ppo.updates=6", "ppo.patience=null", "ppo.select=last")
    assert res["selected_update"] == 6
    assert any(not torch.equal(weights(tmp_path / "last")[k], peak[k]) for k in peak)


def test_early_stop_when_the_judge_falls_while_the_proxy_rises(base, tmp_path, monkeypatch):
    calls = scripted(monkeypatch, judge=[0.1, 0.5, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2],
                     proxy=[0, 1, 2, 3, 4, 5, 6, 7, 8])
    res = ppo(base, tmp_path / "stop", "ppo.updates=8", "ppo.patience=3")
    assert res["early_stopped"] and res["updates"] == 5 and res["selected_update"] == 2
    assert len(calls) == 6  # updates 0..5


def test_no_early_stop_when_the_proxy_falls_with_the_judge(base, tmp_path, monkeypatch):
    """A judge below its best with the proxy also below its value there is noise, not hacking."""
    scripted(monkeypatch, judge=[0.1, 0.5, 0.8, 0.7, 0.6, 0.5, 0.4], proxy=[0, 1, 2, 1.5, 1.0, 0.5, 0.2])
    res = ppo(base, tmp_path / "nostop", "ppo.updates=6", "ppo.patience=2")
    assert not res["early_stopped"] and res["updates"] == 6 and res["selected_update"] == 2


def test_no_early_stop_on_a_plateau_within_the_judges_noise(base, tmp_path, monkeypatch):
    """Below the best by less than a standard error: a plateau, not a fall (the proxy rising
    all along); the best is still the selected policy."""
    scripted(monkeypatch, judge=[0.1, 0.5, 0.8, 0.78, 0.77, 0.79, 0.76], proxy=[0, 1, 2, 3, 4, 5, 6], se=0.05)
    res = ppo(base, tmp_path / "plateau", "ppo.updates=6", "ppo.patience=2")
    assert not res["early_stopped"] and res["updates"] == 6 and res["selected_update"] == 2


def test_no_judge_evaluations_when_judge_every_is_empty(base, tmp_path, monkeypatch):
    """`ppo.judge_every` empty (as TRL with num_sample_generations=0): the judge never runs,
    and the saved policy is the one a judged run with `select: last` saves (judging draws
    from its own forked RNG, so it never changes training)."""
    scripted(monkeypatch, judge=[0.0] * 4, proxy=[0.0] * 4)
    judged = ppo(base, tmp_path / "judged", "ppo.updates=3", "ppo.select=last")
    calls = scripted(monkeypatch, judge=[], proxy=[])
    res = ppo(base, tmp_path / "unjudged", "ppo.updates=3", "ppo.select=last", "ppo.judge_every=null")
    assert calls == [] and res["judge_curve"] == [] and res["selected_update"] == 3 and judged["selected_update"] == 3
    a, b = weights(tmp_path / "judged"), weights(tmp_path / "unjudged")
    assert all(torch.equal(a[k], b[k]) for k in a)
