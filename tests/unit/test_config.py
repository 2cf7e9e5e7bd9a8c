"""Config: presets, YAML deep-merge, --set overrides, validation errors, the CLI."""

from __future__ import annotations

import typing

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from rlhf import cli
from rlhf.config import (
    PRESETS,
    ConfigError,
    PipelineConfig,
    apply_override,
    flatten,
    load_config,
)

# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize("preset", sorted({"demo", "instructgpt", "tiny"} | set(PRESETS)))
def test_presets_load(preset):
    assert preset in PRESETS
    cfg = load_config(preset)
    assert isinstance(cfg, PipelineConfig)


def test_demo_preset_is_the_defaults():
    assert load_config("demo") == PipelineConfig()


def test_instructgpt_preset_hyperparameters():
    cfg = load_config("instructgpt")
    assert cfg.ppo.kl.init_coef == 0.02
    assert cfg.ppo.kl.adaptive is False
    assert cfg.ppo.clip_eps == 0.2
    assert cfg.ppo.gamma == 1.0
    assert cfg.ppo.lam == 0.95
    assert cfg.ppo.value_init == "reward"
    # Differs from the defaults where InstructGPT differs.
    default = PipelineConfig()
    assert default.ppo.kl.init_coef != 0.02
    assert default.ppo.kl.adaptive is True


def test_tiny_preset_is_small():
    cfg = load_config("tiny")
    assert cfg.model.hidden_size == 32
    assert cfg.model.num_layers == 1
    assert cfg.task.num_demonstrations == 200
    assert cfg.ppo.rollout_batch_size % cfg.ppo.minibatch_size == 0
    # Untouched sections keep defaults.
    assert cfg.data == PipelineConfig().data


def test_no_preset_gives_defaults():
    assert load_config(None) == PipelineConfig()


# ----------------------------------------------------------------------------- merge and overrides


def _write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_file_deep_merges_over_preset(tmp_path):
    f = _write(tmp_path, "ppo:\n  kl:\n    init_coef: 0.5\n  lr: 0.001\nsft:\n  batch_size: 7\n")
    cfg = load_config("instructgpt", f)
    assert cfg.ppo.kl.init_coef == 0.5
    assert cfg.ppo.lr == 0.001
    assert cfg.sft.batch_size == 7
    # Siblings of the changed nested key keep the preset's values (not the defaults).
    assert cfg.ppo.kl.adaptive is False
    assert cfg.ppo.lam == 0.95
    # Other sections keep theirs.
    assert cfg.sft.lr == PipelineConfig().sft.lr


def test_yaml_merges_over_tiny_preset_nested(tmp_path):
    f = _write(tmp_path, "model:\n  num_layers: 2\n")
    cfg = load_config("tiny", f)
    assert cfg.model.num_layers == 2
    assert cfg.model.hidden_size == 32  # from the preset, not the default 128


def test_empty_yaml_file_is_allowed(tmp_path):
    f = _write(tmp_path, "")
    assert load_config("tiny", f) == load_config("tiny")


def test_set_overrides_apply_after_file(tmp_path):
    f = _write(tmp_path, "ppo:\n  kl:\n    init_coef: 0.5\n    target: 3.0\n")
    cfg = load_config("instructgpt", f, ["ppo.kl.init_coef=0.07"])
    assert cfg.ppo.kl.init_coef == 0.07  # --set wins over the file
    assert cfg.ppo.kl.target == 3.0  # file value kept
    assert cfg.ppo.kl.adaptive is False  # preset value kept


def test_later_set_wins():
    cfg = load_config("demo", None, ["sft.lr=0.1", "sft.lr=0.2"])
    assert cfg.sft.lr == 0.2


def test_set_values_are_yaml_scalars():
    cfg = load_config("demo", None, [
        "ppo.kl.adaptive=false", "sft.max_steps=5", "ppo.kl.init_coef=1e-2",
        "data.sft_path=foo.jsonl", "data.preference_path=bar.jsonl", "task.families=[sort]", "ppo.reward_clip=",
    ])
    assert cfg.ppo.kl.adaptive is False
    assert cfg.sft.max_steps == 5 and type(cfg.sft.max_steps) is int
    assert cfg.ppo.kl.init_coef == pytest.approx(0.01)
    assert cfg.data.sft_path == "foo.jsonl"
    assert cfg.task.families == ["sort"]
    assert cfg.ppo.reward_clip is None


def test_apply_override_parses_and_does_not_mutate_input():
    d = {"ppo": {"kl": {"adaptive": True}}}
    out = apply_override(d, "ppo.kl.adaptive=false")
    assert out["ppo"]["kl"]["adaptive"] is False
    assert d["ppo"]["kl"]["adaptive"] is True
    out = apply_override({}, "sft.max_steps=5")
    assert out == {"sft": {"max_steps": 5}}
    # Only the first "=" splits key from value.
    assert apply_override({}, "data.sft_path=a=b") == {"data": {"sft_path": "a=b"}}


def test_apply_override_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="seed"):
        apply_override({"seed": 3}, "seed.x=1")


# ----------------------------------------------------------------------------- errors


def _error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(*args, **kwargs)
    return str(ei.value)


def test_unknown_field_names_dotted_path():
    msg = _error("demo", None, ["sft.lrr=1"])
    assert "sft.lrr" in msg
    assert "unknown field" in msg


def test_unknown_field_in_yaml_names_dotted_path(tmp_path):
    f = _write(tmp_path, "ppo:\n  kl:\n    coef: 1\n")
    msg = _error("demo", f)
    assert "ppo.kl.coef" in msg
    assert str(f) in msg  # the origin is named


def test_unknown_section_is_error():
    assert "bogus" in _error("demo", None, ["bogus.x=1"])


def test_wrong_type_names_field():
    msg = _error("demo", None, ["sft.batch_size=abc"])
    assert "sft.batch_size" in msg
    assert "abc" in msg


def test_out_of_range_names_field():
    msg = _error("demo", None, ["task.demo_correct_rate=0.5"])
    assert "task.demo_correct_rate" in msg
    assert "0.7" in msg
    # The boundary itself is allowed.
    assert load_config("demo", None, ["task.demo_correct_rate=0.7"]).task.demo_correct_rate == 0.7


def test_literal_field_rejects_other_values():
    assert "ppo.kl.estimator" in _error("demo", None, ["ppo.kl.estimator=k2"])


def test_rollout_not_divisible_by_minibatch():
    msg = _error("demo", None, ["ppo.rollout_batch_size=64", "ppo.minibatch_size=10"])
    assert "rollout_batch_size" in msg
    assert "minibatch_size" in msg
    assert "64" in msg and "10" in msg
    # Divisible sizes are fine.
    cfg = load_config("demo", None, ["ppo.rollout_batch_size=60", "ppo.minibatch_size=10"])
    assert cfg.ppo.rollout_batch_size == 60


def test_judge_selection_needs_judge_evaluations():
    msg = _error("demo", None, ["ppo.judge_every=null"])
    assert "ppo.select=judge" in msg and "ppo.judge_every" in msg and "ppo.select=last" in msg
    cfg = load_config("demo", None, ["ppo.judge_every=null", "ppo.select=last"])
    assert cfg.ppo.judge_every is None


def test_min_items_above_max_items():
    msg = _error("demo", None, ["task.min_items=9", "task.max_items=3"])
    assert "min_items" in msg and "max_items" in msg


def test_hidden_not_divisible_by_heads():
    msg = _error("demo", None, ["model.hidden_size=30", "model.num_heads=4"])
    assert "hidden_size" in msg and "num_heads" in msg


def test_several_errors_are_all_reported():
    msg = _error("demo", None, ["sft.lrr=1", "reward.batch_size=abc"])
    assert "sft.lrr" in msg and "reward.batch_size" in msg


def test_unknown_preset():
    msg = _error("nope")
    assert "nope" in msg
    for name in PRESETS:
        assert name in msg


def test_missing_config_file(tmp_path):
    missing = tmp_path / "absent.yaml"
    msg = _error("demo", missing)
    assert "not found" in msg and str(missing) in msg


def test_yaml_top_level_not_a_mapping(tmp_path):
    f = _write(tmp_path, "- a\n- b\n")
    msg = _error("demo", f)
    assert "mapping" in msg and str(f) in msg


def test_invalid_yaml_file(tmp_path):
    f = _write(tmp_path, "sft: [unclosed\n")
    msg = _error("demo", f)
    assert "YAML" in msg


def test_set_without_equals():
    msg = _error("demo", None, ["sft.lr"])
    assert "sft.lr" in msg and "key=value" in msg


def test_set_with_empty_key():
    assert "empty key" in _error("demo", None, ["=3"])


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_validate_assignment_after_load():
    cfg = load_config("demo")
    with pytest.raises(ValidationError):
        cfg.sft.batch_size = "abc"


# ----------------------------------------------------------------------------- flatten


def test_flatten_dotted_keys():
    cfg = load_config("instructgpt")
    flat = flatten(cfg)
    assert flat["ppo.kl.init_coef"] == 0.02
    assert flat["ppo.kl.adaptive"] is False
    assert flat["sft.batch_size"] == cfg.sft.batch_size
    assert flat["seed"] == 0
    assert flat["model.lora.r"] == 8
    assert flat["task.families"] == ["reverse", "sort"]  # lists stay values
    assert all(not isinstance(v, dict) for v in flat.values())
    assert "ppo" not in flat and "ppo.kl" not in flat


def test_flatten_covers_every_leaf():
    cfg = PipelineConfig()
    flat = flatten(cfg)
    expected = set(_leaf_paths(PipelineConfig))
    assert set(flat) == expected


def test_flatten_plain_dict_with_prefix():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}, "x.") == {"x.a.b": 1, "x.a.c.d": 2, "x.e": 3}


# ----------------------------------------------------------------------------- house rule: descriptions


def _nested_models(annotation) -> list[type[BaseModel]]:
    """BaseModel classes inside an annotation (plain, Optional, list[...], unions)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out = []
    for arg in typing.get_args(annotation):
        out.extend(_nested_models(arg))
    return out


def _walk(model: type[BaseModel], prefix: str = "", seen=None):
    seen = set() if seen is None else seen
    if model in seen:
        return
    seen.add(model)
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        yield path, field
        for sub in _nested_models(field.annotation):
            yield from _walk(sub, path + ".", seen)


def _leaf_paths(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        subs = _nested_models(field.annotation)
        if subs:
            yield from _leaf_paths(subs[0], f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_walk_reaches_nested_models():
    paths = {p for p, _ in _walk(PipelineConfig)}
    # Sanity: the walk goes two levels deep, so the description test below is not vacuous.
    assert {"ppo", "ppo.kl", "ppo.kl.init_coef", "model.lora.target_modules", "tracking.experiment"} <= paths
    assert len(paths) > 80


def test_every_field_has_a_description():
    missing = [p for p, f in _walk(PipelineConfig) if not (f.description or "").strip()]
    assert missing == [], f"fields without a description: {missing}"


# ----------------------------------------------------------------------------- CLI


def test_cli_config_show_rejects_unknown_field(capsys):
    rc = cli.main(["config", "show", "--set", "sft.lrr=1"])
    captured = capsys.readouterr()
    assert rc == 2
    assert "sft.lrr" in captured.err
    assert captured.err.startswith("error:")
    assert captured.out == ""


def test_cli_config_show_round_trips(capsys):
    rc = cli.main(["config", "show"])
    captured = capsys.readouterr()
    assert rc == 0
    shown = yaml.safe_load(captured.out)
    assert isinstance(shown, dict)
    assert PipelineConfig.model_validate(shown) == load_config("demo")


def test_cli_config_show_with_preset_file_and_set(capsys, tmp_path):
    f = _write(tmp_path, "sft:\n  batch_size: 9\n")
    rc = cli.main(["config", "show", "--preset", "instructgpt", "--config", str(f),
                   "--set", "ppo.kl.target=2.5", "--set", "seed=7"])
    out = capsys.readouterr().out
    assert rc == 0
    cfg = PipelineConfig.model_validate(yaml.safe_load(out))
    assert cfg == load_config("instructgpt", f, ["ppo.kl.target=2.5", "seed=7"])
    assert cfg.sft.batch_size == 9 and cfg.ppo.kl.target == 2.5 and cfg.seed == 7
    assert cfg.ppo.kl.init_coef == 0.02


def test_cli_config_show_missing_file(capsys, tmp_path):
    rc = cli.main(["config", "show", "--config", str(tmp_path / "nope.yaml")])
    assert rc == 2
    assert "not found" in capsys.readouterr().err


def test_user_data_paths_must_come_together():
    with pytest.raises(ConfigError, match="data.sft_path and data.preference_path"):
        load_config("tiny", overrides=["data.sft_path=x.jsonl"])


def test_comparison_length_follows_ppo_unless_set():
    """Reward's labelled SFT samples are as long as PPO's responses, resolved at validation
    so the reward stage reads only its own section."""
    assert load_config("tiny").reward.comparison_max_new_tokens == 8
    assert load_config("demo", overrides=["ppo.max_new_tokens=12"]).reward.comparison_max_new_tokens == 12
    cfg = load_config("demo", overrides=["ppo.max_new_tokens=12", "reward.comparison_max_new_tokens=5"])
    assert cfg.reward.comparison_max_new_tokens == 5
    with pytest.raises(ConfigError, match="comparison_max_new_tokens"):
        load_config("demo", overrides=["reward.comparison_max_new_tokens=0"])


def test_optimiser_fields_come_from_one_model():
    from rlhf.config import OptimConfig, PPOConfig, RewardConfig, SFTConfig

    for section in (SFTConfig, RewardConfig, PPOConfig):
        assert issubclass(section, OptimConfig)
        assert set(OptimConfig.model_fields) <= set(section.model_fields)
    cfg = load_config("demo")
    assert (cfg.sft.lr, cfg.reward.lr, cfg.ppo.lr) == (1.5e-3, 5e-4, 5e-5)  # each stage keeps its own defaults
    assert cfg.ppo.warmup_steps == 0 and cfg.ppo.lr_schedule == "constant" and cfg.sft.lr_schedule == "cosine"
