"""The typed pipeline parameters (the Kubeflow UI form), written once.

`PARAMS` is the one table. Everything else is derived from it:

- `UI_PARAMS` (parameter -> dotted config key): how `rlhf.runs.resolve_config` lays the
  parameters that are set over the preset and `config_json`;
- `signature()` and `docstring()`: the pipeline function's signature (names, annotations,
  defaults) and its docstring `Args:`, which is where KFP reads the form's descriptions
  (rlhf.pipelines builds its `rlhf_pipeline` from them);
- `overrides()`: what the `start_run` / `finish_run` components hand to `rlhf.runs`.

A value "not set" is "" (str) or -1 / -1.0 (numbers): a Kubeflow form field cannot be
left empty otherwise, so the preset / `config_json` value stands (see resolve_config).

Why the components still spell their parameters out: a KFP lightweight component is
built from its function's source text and run in the step's container by introspecting
that text, so its signature must be literal Python; generating it would need `exec`.
The alternative, one JSON parameter of the overrides built inside the DAG, would change
the `start-run` component's inputs and cannot be assembled from pipeline channels at
compile time. So `start_run` keeps its literal typed signature (its compiled inputs stay
as they were) and its body passes `overrides(locals())` instead of a hand-written dict.
The DAG passes `start_run` the whole form, so KFP refuses to compile when a row is
missing from its signature or a parameter there has no row (or the wrong type);
`finish_run` gets the part of the form its signature names. tests/pipeline/test_params.py
checks the signature against the table row by row (names, order, types) as well.

This module imports no kfp: the engine (rlhf.runs) reads it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Param:
    """One typed pipeline parameter."""

    name: str
    type: type  # str, int or float: what KFP types the form field as
    default: str | int | float  # "", -1 and -1.0 mean "not set" for config-mapped parameters
    config_key: str | None  # dotted PipelineConfig field it overrides; None: read by the run itself
    description: str  # shown under the field in the Kubeflow UI


PARAMS: tuple[Param, ...] = (
    Param("preset", str, "demo", None,
          "Config preset: demo (tiny model, built-in task), instructgpt (the paper's PPO settings), "
          "tiny (smoke test)."),
    Param("config_json", str, "", None,
          "The full config as JSON (sections task, data, model, sft, reward, ppo, eval, tracking, gate), "
          "merged over the preset; `rlhf config show` lists every field."),
    Param("base_model", str, "", "model.name_or_path",
          "Base model: Hugging Face hub id, s3:// folder or local path (safetensors only). "
          "Empty builds the preset's small model from config."),
    Param("sft_data", str, "", "data.sft_path",
          "SFT demonstrations, JSONL {prompt, completion} or {messages}: local path, s3:// URI or HF dataset name. "
          "Empty uses the built-in task."),
    Param("preference_data", str, "", "data.preference_path",
          "Preference pairs, JSONL {prompt, chosen, rejected}, conversational or Anthropic HH. "
          "Set together with sft_data."),
    Param("prompt_data", str, "", "data.prompt_path",
          "PPO prompts, JSONL {prompt} or {messages}. Empty uses the SFT prompts."),
    Param("seed", int, -1, "seed", "Seed for data generation, initialisation and training."),
    Param("sft_max_steps", int, -1, "sft.max_steps", "Hard cap on SFT optimizer steps."),
    Param("reward_epochs", int, -1, "reward.epochs", "Passes over the preference pairs for the reward model."),
    Param("ppo_updates", int, -1, "ppo.updates", "PPO updates (each one rollout batch)."),
    Param("kl_coef", float, -1.0, "ppo.kl.init_coef",
          "KL penalty coefficient beta against the SFT model (the initial value when adaptive)."),
    Param("min_decisive_win_rate", float, -1.0, "gate.min_decisive_win_rate",
          "Gate: least lower bound (95% Wilson interval) of the policy's decisive win rate against SFT."),
    Param("max_kl", float, -1.0, "gate.max_kl", "Gate: most KL(policy || SFT) per response, in nats."),
    Param("champion_margin", float, -1.0, "gate.champion_margin",
          "Gate: the policy must win more than 0.5 + margin against the current @champion."),
    Param("experiment_name", str, "", "tracking.experiment", "MLflow experiment for the parent and stage runs."),
    Param("registered_model_name", str, "", "tracking.registered_model",
          "Base name of the registered models: <name>-sft, <name>-reward, <name>-policy."),
    Param("artifact_root", str, "s3://rlhf/runs", None,
          "Where runs keep datasets, checkpoints and models: s3://bucket/prefix "
          "(or a local folder for local runs)."),
    Param("run_name", str, "", None,
          "Folder of this run under artifact_root and MLflow parent run name. Empty uses the KFP run id."),
)

UI_PARAMS: dict[str, str] = {p.name: p.config_key for p in PARAMS if p.config_key}
"""Typed pipeline parameter -> the config field it overrides (for rlhf.runs.resolve_config)."""

SUMMARY = "Train, evaluate and (through the gate) promote an RLHF policy."
NOT_SET = "Empty strings and -1 leave the value from the preset / config_json."


def signature() -> inspect.Signature:
    """The pipeline function's signature: every parameter keyword-or-positional (KFP
    calls the function positionally), annotated with its type, with its default."""
    return inspect.Signature([inspect.Parameter(p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                default=p.default, annotation=p.type) for p in PARAMS])


def docstring() -> str:
    """The pipeline function's docstring, in the Google style KFP parses: its `Args:`
    become the descriptions of the form's fields."""
    args = "\n".join(f"    {p.name}: {p.description}" for p in PARAMS)
    return f"{SUMMARY}\n\n{NOT_SET}\n\nArgs:\n{args}\n"


def overrides(values: Mapping[str, Any]) -> dict[str, Any]:
    """The config-mapped parameters among `values` (a component's `locals()`), by name,
    as `rlhf.runs.start` / `finish` take them."""
    return {name: values[name] for name in UI_PARAMS if name in values}
