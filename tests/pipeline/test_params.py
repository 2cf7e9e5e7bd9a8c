"""The typed pipeline parameters are written once (rlhf.params.PARAMS): the compiled
Kubeflow form, the pipeline function, the components and the config mapping all follow
that table, and a component signature that drifts from it fails here."""

from __future__ import annotations

import inspect
import json
from operator import attrgetter
from types import SimpleNamespace

import pytest
import yaml

from rlhf import params
from rlhf.params import PARAMS, UI_PARAMS

KFP_TYPES = {str: "STRING", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE"}


def _probe(p: params.Param):
    """A set (not "not set") value of the parameter's type that every mapped field accepts."""
    return {str: f"probe-{p.name}", int: 3, float: 0.25}[p.type]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    from rlhf.pipelines import compile_pipeline

    path = compile_pipeline(str(tmp_path_factory.mktemp("params") / "pipeline.yaml"))
    return next(yaml.safe_load_all(open(path)))  # the pipeline spec; the platform spec follows


def test_the_table_is_well_formed():
    names = [p.name for p in PARAMS]
    assert len(names) == len(set(names))
    assert len(set(UI_PARAMS.values())) == len(UI_PARAMS), "two parameters set one config field"
    for p in PARAMS:
        assert p.type in KFP_TYPES, p.name
        assert type(p.default) is p.type, f"{p.name}: default {p.default!r} is not a {p.type.__name__}"
        assert p.description.strip(), p.name
        if p.config_key:  # "not set" is what resolve_config skips
            assert p.default in ("", -1), f"{p.name}: default {p.default!r} would override the preset"
    assert [p.name for p in PARAMS if p.config_key is None] == ["preset", "config_json", "artifact_root", "run_name"]


def test_compiled_form_is_the_table(compiled):
    form = compiled["root"]["inputDefinitions"]["parameters"]
    assert form == {p.name: {"parameterType": KFP_TYPES[p.type], "defaultValue": p.default, "isOptional": True,
                             "description": p.description} for p in PARAMS}


def test_pipeline_function_is_built_from_the_table():
    from rlhf.pipelines import rlhf_pipeline

    sig = inspect.signature(rlhf_pipeline.pipeline_func)
    assert sig == params.signature()
    assert [(n, q.annotation, q.default) for n, q in sig.parameters.items()] == \
           [(p.name, p.type, p.default) for p in PARAMS]
    assert rlhf_pipeline.pipeline_func.__doc__ == params.docstring()


def test_start_run_signature_is_the_table():
    """KFP needs start_run's parameters literal in its source: they must stay the table's rows."""
    from rlhf.components import start_run

    sig = inspect.signature(start_run.python_func)
    assert [(n, q.annotation) for n, q in sig.parameters.items()] == \
           [(p.name, p.type) for p in PARAMS] + [("kfp_run_id", str)]


def test_component_parameters_named_like_the_table_have_its_types():
    from rlhf import components

    by_name = {p.name: p for p in PARAMS}
    found = [c for c in vars(components).values() if hasattr(c, "python_func")]
    assert {c.name for c in found} >= {"start-run", "finish-run", "prep-data"}
    for comp in found:
        for name, q in inspect.signature(comp.python_func).parameters.items():
            if name in by_name:
                assert q.annotation is by_name[name].type, f"{comp.name}.{name}"


def test_each_step_gets_the_pipeline_parameters_it_names(compiled):
    """start gets the whole form; finish the part of it that its signature names."""
    def fed_from_form(task: dict) -> dict:
        return {name: b["componentInputParameter"].removeprefix("pipelinechannel--")
                for name, b in task["inputs"]["parameters"].items() if "componentInputParameter" in b}

    start = compiled["components"]["comp-exit-handler-1"]["dag"]["tasks"]["start-run"]
    finish = compiled["root"]["dag"]["tasks"]["finish-run"]
    assert fed_from_form(start) == {p.name: p.name for p in PARAMS}
    finish_inputs = compiled["components"]["comp-finish-run"]["inputDefinitions"]["parameters"]
    assert fed_from_form(finish) == {p.name: p.name for p in PARAMS if p.name in finish_inputs}


def test_start_run_hands_every_config_parameter_to_the_engine(monkeypatch):
    from rlhf import runs
    from rlhf.components import start_run

    seen = {}

    def fake_start(preset, config_json, overrides, artifact_root, run_name, kfp_run_id):
        seen.update(preset=preset, overrides=overrides, artifact_root=artifact_root, run_name=run_name)
        return dict.fromkeys(("config_json", "prep_config_json", "run_root", "parent_run_id", "data_key"), "")

    monkeypatch.setattr(runs, "start", fake_start)
    start_run.python_func(**{p.name: _probe(p) for p in PARAMS}, kfp_run_id="k1")
    assert seen["overrides"] == {p.name: _probe(p) for p in PARAMS if p.config_key}
    assert (seen["preset"], seen["artifact_root"], seen["run_name"]) == ("probe-preset", "probe-artifact_root",
                                                                         "probe-run_name")


def test_finish_run_hands_its_config_parameters_to_the_engine(monkeypatch):
    from rlhf import runs
    from rlhf.components import finish_run

    seen = {}
    monkeypatch.setattr(runs, "finish", lambda preset, cfg, overrides, *rest: seen.update(overrides=overrides))
    taken = [p for p in PARAMS if p.name in inspect.signature(finish_run.python_func).parameters]
    finish_run.python_func(**{p.name: _probe(p) for p in taken}, kfp_run_id="k1",
                           status=SimpleNamespace(state="SUCCEEDED", error_message=None))
    assert seen["overrides"] == {p.name: _probe(p) for p in taken if p.config_key}
    assert seen["overrides"], "finish_run takes no config-mapped parameter (experiment_name, registered_model_name)"


def test_every_config_key_is_a_real_config_field():
    """Set every mapped field at once with --set (extra fields are forbidden) and read it back."""
    from rlhf.config import load_config

    mapped = [p for p in PARAMS if p.config_key]
    cfg = load_config("tiny", overrides=[f"{p.config_key}={json.dumps(_probe(p))}" for p in mapped])
    for p in mapped:
        assert attrgetter(p.config_key)(cfg) == _probe(p), p.config_key


def test_table_defaults_leave_the_preset_as_it_is():
    from rlhf.config import load_config
    from rlhf.runs import resolve_config

    unset = {p.name: p.default for p in PARAMS if p.config_key}
    assert resolve_config("tiny", "", unset) == load_config("tiny")


def test_set_parameters_reach_their_config_fields():
    from rlhf.runs import resolve_config

    mapped = [p for p in PARAMS if p.config_key]
    cfg = resolve_config("tiny", "", {p.name: _probe(p) for p in mapped})
    for p in mapped:
        assert attrgetter(p.config_key)(cfg) == _probe(p), p.name
