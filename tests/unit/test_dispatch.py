"""The one dispatcher: the CLI, a KFP step and a torchrun worker take the same path,
with one request shape, and validate the config once per process entry."""

from __future__ import annotations

import json

import pytest

from rlhf import cli, runs
from rlhf.config import PipelineConfig, load_config
from rlhf.dispatch import StageRequest, build_context, write_summary
from rlhf.stages.table import STAGES


@pytest.fixture
def validations(monkeypatch):
    """Every validation of a whole pipeline config in this process."""
    calls: list[str] = []
    plain, from_json = PipelineConfig.model_validate.__func__, PipelineConfig.model_validate_json.__func__

    def counted(fn, kind):
        def inner(cls, *args, **kwargs):
            calls.append(kind)
            return fn(cls, *args, **kwargs)
        return classmethod(inner)

    monkeypatch.setattr(PipelineConfig, "model_validate", counted(plain, "dict"))
    monkeypatch.setattr(PipelineConfig, "model_validate_json", counted(from_json, "json"))
    return calls


def test_rlhf_stage_validates_the_config_once(tmp_path, validations, capsys):
    out = tmp_path / "out"
    assert cli.main(["stage", "prep", "--preset", "tiny", "--set", "ppo.kl.init_coef=0.05", "--output", str(out),
                     "--quiet"]) == 0
    assert validations == ["dict"]
    assert json.loads((out / "prep" / "result.json").read_text())["sizes"]["sft_train"] > 0


def test_a_kfp_step_validates_the_config_once_and_takes_the_same_path(tmp_path, validations):
    cfg_json = load_config("tiny", overrides=["ppo.kl.init_coef=0.05"]).model_dump_json()
    validations.clear()
    root = str(tmp_path / "run")
    result = runs.stage("prep", cfg_json, root, "", root)
    assert validations == ["json"]
    assert result["sizes"]["sft_train"] > 0
    assert json.loads((tmp_path / "run" / "prep" / "result.json").read_text())["hashes"] == result["hashes"]


def test_workers_take_one_request_shape():
    cfg = load_config("tiny", overrides=["ppo.kl.init_coef=0.05"])
    req = StageRequest("ppo", "s3://b/runs/r1", "s3://b/runs/_datasets/k", "parent", {}, quiet=True)
    wire = json.loads(json.dumps(req.for_workers(cfg)))
    back, cfg2 = StageRequest.of_worker(wire)
    assert back == req and cfg2 == cfg and cfg2.ppo.kl.init_coef == 0.05
    assert set(wire) == {"name", "run_root", "dataset_root", "parent_run_id", "options", "quiet", "tracking",
                         "config_json"}


def test_the_context_carries_the_stage_section_and_declared_sections_only(tmp_path):
    from rlhf.adapters.settings import Settings
    from rlhf.adapters.store import open_store

    cfg = load_config("tiny", overrides=["ppo.kl.init_coef=0.05", "data.eval_fraction=0.2"])
    settings = Settings.from_env({"RLHF_HOME": str(tmp_path), "RLHF_FAULT_KILL_AT_STEP": "ppo:7"})
    store = open_store(tmp_path / "run", settings)
    ctx = build_context(STAGES["prep"], StageRequest("prep", str(tmp_path / "run"), str(tmp_path / "run"),
                                                     tracking=False), cfg, store, settings)
    assert ctx.config is cfg.data and ctx.config.eval_fraction == 0.2
    assert ctx.judge.name == "gold" and ctx.task is not None
    assert (ctx.faults.at_step, ctx.faults.stage) == (7, "ppo")
    with pytest.raises(KeyError, match="does not declare config section 'ppo'"):
        ctx.section("ppo")


def test_user_data_gets_no_judge_and_no_simulated_labelers():
    from rlhf.data.tasks.judge import build_judge, build_task

    cfg = PipelineConfig(data={"sft_path": "a.jsonl", "preference_path": "b.jsonl"})
    judge = build_judge(cfg)
    # even a prompt that looks like the built-in task's is not judged: user data has no gold
    assert judge.name == "none" and judge.score("reverse: a b c", " c b a") is None
    assert build_task(cfg) is None
    builtin = build_judge(PipelineConfig())
    assert builtin.score("reverse: a b c", " c b a") == 1.0 and builtin.score("not a task", "x") is None


def test_summary_is_composed_from_the_stage_results(tmp_path):
    from rlhf.adapters.store import LocalStore

    store = LocalStore(tmp_path / "run")
    cfg = load_config("tiny")
    store.write_json("prep/result.json", {"wall_s": 1.004, "tracking_s": 0.0})
    store.write_json("sft/result.json", {"wall_s": 2.0, "tracking_s": 0.5, "best_eval_loss": 0.7,
                                         "eval_curve": [[0, 1.0]]})
    store.write_json("reward/result.json", {"wall_s": 3.0, "rm/accuracy": 0.8, "rm/label_accuracy": 0.7})
    store.write_json("ppo/result.json", {"wall_s": 4.0})
    store.write_json("eval/result.json", {"eval/win_rate_vs_sft": 0.6, "eval/wall_s": 5.0, "tracking_s": 0.25,
                                          "eval/mlflow_run_id": "r"})
    s = write_summary(store, store, cfg)
    assert s["rm/accuracy"] == 0.8 and s["sft/eval_curve"] == [[0, 1.0]] and s["eval/win_rate_vs_sft"] == 0.6
    assert "eval/mlflow_run_id" not in s and s["tracking_s"]["eval"] == 0.25
    assert s["wall_s"] == {"prep": 1.0, "sft": 2.0, "reward": 3.0, "ppo": 4.0, "eval": 5.0, "total": 15.0}
    store.write_json("promote/result.json", {"wall_s": 0.5, "promoted": True, "mlflow_run_id": "p"})
    s = write_summary(store, store, cfg)
    assert s["promoted"] is True and s["wall_s"]["promote"] == 0.5 and s["wall_s"]["total"] == 15.5
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == s
