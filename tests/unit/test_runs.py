"""Pipeline-run helpers: how the Kubeflow form, the JSON config and presets combine;
run folders; what `rlhf run` prints."""

from __future__ import annotations

import json

import pytest

from rlhf.config import ConfigError
from rlhf.pipelines.local import PipelineFailed, split_output, summary_lines
from rlhf.runs import UI_PARAMS, data_key, resolve_config
from rlhf.adapters.store import LocalStore


def test_unset_ui_parameters_keep_preset_values():
    cfg = resolve_config("tiny", "", {"ppo_updates": -1, "kl_coef": -1.0, "base_model": "", "experiment_name": ""})
    assert cfg.ppo.updates == 3 and cfg.ppo.kl.init_coef == 0.1 and cfg.model.name_or_path is None


def test_order_is_preset_then_json_then_set_ui_parameters():
    js = json.dumps({"ppo": {"updates": 7, "lr": 1e-4}, "gate": {"max_kl": 3.0}})
    cfg = resolve_config("tiny", js, {"ppo_updates": 9, "min_decisive_win_rate": 0.6, "registered_model_name": "m"})
    assert cfg.ppo.updates == 9 and cfg.ppo.lr == 1e-4 and cfg.gate.max_kl == 3.0
    assert cfg.gate.min_decisive_win_rate == 0.6 and cfg.tracking.registered_model == "m"
    assert cfg.sft.batch_size == 16  # from the preset


def test_every_ui_parameter_maps_to_a_real_field():
    from rlhf.config import PipelineConfig, flatten

    fields = set(flatten(PipelineConfig().model_dump()))
    assert set(UI_PARAMS.values()) <= fields


@pytest.mark.parametrize("js,words", [("{not json", "config_json is not valid JSON"), ('["a"]', "must be an object"),
                                      ('{"ppo": {"updatez": 3}}', "ppo.updatez")])
def test_bad_config_json_is_a_clear_config_error(js, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        resolve_config("tiny", js, {})


def test_invalid_ui_value_names_the_field():
    with pytest.raises(ConfigError, match="gate.min_decisive_win_rate"):
        resolve_config("tiny", "", {"min_decisive_win_rate": 1.5})


def test_data_key_follows_data_bytes_and_prep_settings_only(tmp_path):
    sft, prefs = tmp_path / "sft.jsonl", tmp_path / "p.jsonl"
    sft.write_text('{"prompt": "a", "completion": "b"}\n')
    prefs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    store = LocalStore(tmp_path / "store")
    base = [f"data.sft_path={sft}", f"data.preference_path={prefs}"]
    from rlhf.config import load_config

    k1 = data_key(load_config("tiny", overrides=base), store)
    assert k1 == data_key(load_config("tiny", overrides=[*base, "ppo.updates=50"]), store)  # not a prep setting
    assert k1 != data_key(load_config("tiny", overrides=[*base, "data.eval_fraction=0.3"]), store)
    sft.write_text('{"prompt": "a", "completion": "c"}\n')
    assert k1 != data_key(load_config("tiny", overrides=base), store)


def test_split_output(tmp_path):
    assert split_output("s3://b/runs/x") == ("s3://b/runs", "x")
    assert split_output(str(tmp_path / "r" / "one")) == (str(tmp_path / "r"), "one")
    with pytest.raises(PipelineFailed, match="under a bucket"):
        split_output("s3://bucket")


def test_summary_lines_never_print_uri_credentials():
    lines = summary_lines({"promoted": True, "gate_reasons": []}, "s3://b/r/x", "https://bob:t0ken@mlflow.example")
    text = "\n".join(lines)
    assert "t0ken" not in text and "bob" not in text and "https://mlflow.example" in text
    assert "promoted: true" in text and "summary: s3://b/r/x/summary.json" in text


def test_file_uri_sources_are_hashed_by_content(tmp_path):
    from rlhf.config import load_config

    sft, prefs = tmp_path / "sft.jsonl", tmp_path / "p.jsonl"
    sft.write_text('{"prompt": "a", "completion": "b"}\n')
    prefs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    store = LocalStore(tmp_path / "store")
    cfg = lambda: load_config("tiny", overrides=[f"data.sft_path={sft.as_uri()}",  # noqa: E731
                                                  f"data.preference_path={prefs.as_uri()}"])
    k1 = data_key(cfg(), store)
    sft.write_text('{"prompt": "a", "completion": "changed"}\n')
    assert data_key(cfg(), store) != k1


def test_tracking_uri_with_credentials_is_refused():
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_PASSWORD"):
        resolve_config("tiny", json.dumps({"tracking": {"tracking_uri": "https://bob:pw@mlflow.example"}}), {})


def test_a_run_folder_belongs_to_one_pipeline_run(tmp_path, monkeypatch):
    from rlhf import runs

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = runs.start("tiny", "", {}, str(tmp_path / "runs"), "r1", "kfp-1")
    assert runs.start("tiny", "", {}, str(tmp_path / "runs"), "r1", "kfp-1")["parent_run_id"] == out["parent_run_id"]
    with pytest.raises(ConfigError, match="already holds pipeline run kfp-1"):
        runs.start("tiny", "", {}, str(tmp_path / "runs"), "r1", "kfp-2")


def test_failed_run_puts_the_previous_champion_back(tmp_path, monkeypatch):
    from rlhf import runs
    from rlhf.adapters.registry import Registry
    from rlhf.stages.promote import PREVIOUS_CHAMPION, RUN_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    reg = Registry(uri)
    old = reg.register("m-policy", "file:///old", None, {RUN_TAG: "file:///elsewhere"})
    reg.set_alias(old)
    store = LocalStore(tmp_path / "runs" / "r2")
    store.write_json("pipeline.json", {"kfp_run_id": "k2"})
    mine = {k: reg.register(f"m-{k}", f"file:///{k}", None, {RUN_TAG: store.uri("")}) for k in ("sft", "reward", "policy")}
    store.write_json(PREVIOUS_CHAMPION, {"name": "m-policy", "version": old.version})
    reg.set_alias(mine["policy"])  # promote moved it, then the run failed
    cfg = json.dumps({"tracking": {"registered_model": "m"}})
    out = runs.finish("tiny", cfg, {}, str(tmp_path / "runs"), "r2", "k2", "FAILED", "boom")
    assert sorted(out["removed_versions"]) == ["m-policy/2", "m-reward/1", "m-sft/1"]
    assert reg.aliases("m-policy") == {"champion": old.version}
    assert [v.version for v in reg.find("m-policy", RUN_TAG, "file:///elsewhere")] == [old.version]
    # another run's folder: the exit handler of a run that does not own it touches nothing
    reg.set_alias(old)
    theirs = reg.register("m-policy", "file:///x", None, {RUN_TAG: store.uri("")})
    assert runs.finish("tiny", cfg, {}, str(tmp_path / "runs"), "r2", "k3", "FAILED")["removed_versions"] == []
    assert reg.find("m-policy", RUN_TAG, store.uri(""))[0].version == theirs.version
