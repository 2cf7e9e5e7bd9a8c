"""One pipeline run around the stages: what each KFP component calls.

A component maps its KFP inputs to one function here and its return value to KFP
outputs; the logic lives here so it is testable without KFP:

- `start`: resolve and validate the config, fingerprint the data, open the MLflow
  parent run (idempotent per KFP run), record the run in the store.
- `prep`: data prep into a content-addressed folder `<artifact_root>/_datasets/<key>`,
  where `key` hashes the data's bytes and every setting prep reads. Same key, same
  output: the KFP task is cacheable and a re-run with committed output is a no-op.
- `stage`: sft / reward / ppo / eval / promote in the run's store, as a run nested under
  the parent. Retried tasks resume from the checkpoints in the store.
- `finish`: the exit handler. Marks the parent run (and any stage run left RUNNING)
  FINISHED or FAILED; after a failure it puts `@champion` back where promote found it
  and removes every model version this run registered, so a failed run leaves the
  registry as it found it.
  After success it logs the curves (reward, KL, gold, win rates) as images.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml

from rlhf import __version__
from rlhf.config import ConfigError, PipelineConfig, load_config
from rlhf.adapters.settings import Settings
from rlhf.adapters.store import StoreError, open_store

STAGES = {"sft": "sft", "reward": "reward", "ppo": "ppo", "eval": "evaluate", "promote": "promote"}
PREP_SECTIONS = ("seed", "task", "data", "model")

UI_PARAMS = {
    # typed pipeline parameter -> config field (see pipelines/ for their descriptions)
    "base_model": "model.name_or_path", "sft_data": "data.sft_path", "preference_data": "data.preference_path",
    "prompt_data": "data.prompt_path", "seed": "seed", "sft_max_steps": "sft.max_steps",
    "reward_epochs": "reward.epochs", "ppo_updates": "ppo.updates", "kl_coef": "ppo.kl.init_coef",
    "min_win_rate": "gate.min_win_rate", "max_kl": "gate.max_kl", "champion_margin": "gate.champion_margin",
    "experiment_name": "tracking.experiment", "registered_model_name": "tracking.registered_model",
}


def records_errors(step: str):
    """On failure, write the step's error where `rlhf run` looks for it (RLHF_ERROR_FILE),
    so the command ends with the cause, not just "a task failed"."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            name = kwargs.get("name") or (args[0] if step == "stage" and args else step)
            path = Settings.from_env().error_file
            try:
                out = fn(*args, **kwargs)
            except Exception as e:
                if path and not Path(path).exists():  # the first failure is the cause
                    Path(path).write_text(json.dumps({"step": name, "type": type(e).__name__, "message": str(e)}))
                raise
            if path and Path(path).exists() and json.loads(Path(path).read_text()).get("step") == name:
                Path(path).unlink()  # a retry of this step succeeded: its earlier error is not the cause
            return out
        return inner
    return wrap


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts if p)])


def resolve_config(preset: str, config_json: str = "", overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """preset -> config JSON -> the typed pipeline parameters that are set.

    A typed parameter is "not set" when it is empty ("") or negative (-1): then the
    preset / JSON value stands. This is how the Kubeflow UI form and the JSON
    parameter combine."""
    try:
        cfg_dict = json.loads(config_json) if config_json and config_json.strip() else None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config_json is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    unknown = set(overrides or {}) - set(UI_PARAMS)
    if unknown:
        raise ConfigError(f"unknown pipeline parameters {sorted(unknown)}; known: {sorted(UI_PARAMS)}")
    sets = [f"{UI_PARAMS[k]}={json.dumps(v)}" for k, v in (overrides or {}).items()
            if v is not None and v != "" and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0)]
    return load_config(preset or None, None, sets, config_dict=cfg_dict)


def git_sha() -> str:
    sha = Settings.from_env().git_sha  # RLHF_GIT_SHA, baked into images
    if sha:
        return sha
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def data_key(cfg: PipelineConfig, store) -> str:
    """Hash of everything prep's output depends on: the source bytes (HF datasets by
    name and split), the prep-relevant config and the engine version."""
    h = hashlib.sha256()
    h.update(json.dumps(cfg.model_dump(include=set(PREP_SECTIONS)), sort_keys=True).encode())
    h.update(__version__.encode())
    for src in (cfg.data.sft_path, cfg.data.preference_path, cfg.data.prompt_path):
        if not src:
            continue
        local = Path(unquote(urlparse(src).path)) if src.startswith("file://") else Path(src).expanduser()
        if src.startswith("s3://"):
            h.update(hashlib.sha256(store.read_bytes(src)).digest())
        elif local.is_file():
            h.update(hashlib.sha256(local.read_bytes()).digest())
        elif "://" in src and not src.startswith("hf://"):
            raise ConfigError(f"{src}: cannot read this data source (not a file, s3:// URI or hf:// dataset)")
        else:  # a hub dataset: its name and split (pin a revision in the name to make this exact)
            h.update(f"hf:{src}:{cfg.data.hf_split}".encode())
    return h.hexdigest()[:20]


@records_errors("start")
def start(preset: str, config_json: str, overrides: dict[str, Any], artifact_root: str, run_name: str,
          kfp_run_id: str) -> dict:
    from rlhf.adapters.tracking import start_pipeline_run, tracking_uri_for

    cfg = resolve_config(preset, config_json, overrides)
    settings = Settings.from_env()
    run_root = join(artifact_root, run_name or kfp_run_id)
    store = open_store(run_root)
    owner = store.read_json("pipeline.json").get("kfp_run_id") if store.exists("pipeline.json") else None
    if owner not in (None, kfp_run_id):  # a KFP retry of this step has the same id
        raise ConfigError(f"{store.uri('')} already holds pipeline run {owner}; give this run its own folder "
                          "(a new run_name / --output, or an empty run_name to use the KFP run id)")
    key = data_key(cfg, store)
    sha = git_sha()
    parent = start_pipeline_run(
        tracking_uri_for(cfg, settings), cfg.tracking.experiment, kfp_run_id, run_name or f"pipeline-{kfp_run_id}",
        params=cfg.model_dump(),
        tags={"rlhf.run": store.uri(""), "rlhf.data_key": key, "rlhf.git_sha": sha, "mlflow.source.git.commit": sha,
              "rlhf.version": __version__, "rlhf.registered_model": cfg.tracking.registered_model})
    store.write_json("pipeline.json", {"kfp_run_id": kfp_run_id, "parent_run_id": parent, "data_key": key,
                                       "git_sha": sha, "config": cfg.model_dump()})
    prep_cfg = cfg.model_dump(include=set(PREP_SECTIONS))
    return {"config_json": cfg.model_dump_json(), "prep_config_json": json.dumps(prep_cfg, sort_keys=True),
            "run_root": run_root, "parent_run_id": parent, "data_key": key}


@records_errors("prep")
def prep(prep_config_json: str, artifact_root: str, key: str) -> dict:
    from rlhf.stages import prep as prep_stage
    from rlhf.adapters.tracking import NullTracker

    cfg = PipelineConfig.model_validate_json(prep_config_json)
    store = open_store(join(artifact_root, "_datasets", key))
    if not store.is_committed("prep"):
        prep_stage.run(cfg, store, NullTracker(), quiet=True)
    report = json.loads(store.read_bytes("prep/report.json"))
    manifest = store.read_bytes("prep/MANIFEST.json")
    return {"uri": store.uri("prep"), "root": store.uri(""), "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
            "sizes": report["sizes"], "hashes": report["hashes"], "data_key": key}


@records_errors("stage")
def stage(name: str, config_json: str, run_root: str, parent_run_id: str, dataset_root: str,
          promote: bool = True) -> dict:
    """Run one stage of a pipeline run; returns its result plus where its model lives."""
    from rlhf.adapters.tracking import make_tracker

    from rlhf.train import distributed

    cfg = PipelineConfig.model_validate_json(config_json)
    settings = Settings.from_env()
    store, prep_store = open_store(run_root), open_store(dataset_root)
    launcher = distributed.launcher_for(name, cfg, settings)
    if launcher:  # this step only starts the stage's processes; rank 0 leaves the result in the store
        request = {"kind": "pipeline", "args": {"name": name, "config_json": config_json, "run_root": run_root,
                                                "parent_run_id": parent_run_id, "dataset_root": dataset_root}}
        if launcher == "trainjob":
            from rlhf.ops.trainjob import run_trainjob

            run_trainjob(request, json.loads(settings.trainjob), settings)
        else:
            distributed.launch(request, distributed.world_size(cfg), settings)
        return _with_artifact(name, store, store.read_json(f"{name}/result.json"))
    if not prep_store.is_committed("prep"):
        raise StoreError(f"the dataset {prep_store.uri('prep')} is gone (deleted, or a cached prep step from "
                         "another store): rerun with caching off for the data prep step")
    report = json.loads(prep_store.read_bytes("prep/report.json"))
    tags = {"rlhf.run": store.uri(""), "rlhf.data_hashes": json.dumps(report["hashes"], sort_keys=True)[:5000]}
    tracker = make_tracker(cfg, settings, parent_run_id=parent_run_id, tags=tags)
    if settings.rank == 0:
        store.write_bytes(f"{name}/config.yaml", yaml.safe_dump(cfg.model_dump(), sort_keys=False).encode())
    module = importlib.import_module(f"rlhf.stages.{STAGES[name]}")
    if name == "promote":
        pipeline = store.read_json("pipeline.json")
        lineage = {"rlhf.parent_run_id": parent_run_id, "rlhf.kfp_run_id": pipeline["kfp_run_id"],
                   "rlhf.data_key": pipeline["data_key"], "rlhf.git_sha": pipeline["git_sha"]}
        result = module.run(cfg, store, tracker, quiet=True, promote=promote, lineage=lineage)
    else:
        if name == "sft" and settings.rank == 0:
            tracker.log_parent_dict(parent_run_id, report, "prep_report.json")
        result = module.run(cfg, store, tracker, quiet=True, prep_store=prep_store)
    if settings.rank != 0:
        return result
    return _with_artifact(name, store, result)


def _with_artifact(name: str, store, result: dict) -> dict:
    """The stage's result plus where its model lives (URI and manifest hash)."""
    model_key = {"sft": "sft/model", "reward": "reward/model", "ppo": "ppo/model"}.get(name)
    if model_key:
        result["artifact_uri"] = store.uri(model_key)
        result["manifest_sha256"] = hashlib.sha256(store.read_bytes(f"{model_key}/MANIFEST.json")).hexdigest()
    return result


@records_errors("finish")
def finish(preset: str, config_json: str, overrides: dict[str, Any], artifact_root: str, run_name: str,
           kfp_run_id: str, state: str, error: str = "") -> dict:
    from rlhf.adapters.registry import CHAMPION, KINDS, Registry, model_name
    from rlhf.stages.promote import PREVIOUS_CHAMPION, RUN_TAG
    from rlhf.adapters.tracking import finish_pipeline_run, log_pipeline_plots, tracking_uri_for

    try:
        cfg = resolve_config(preset, config_json, overrides)
    except ConfigError:  # start failed on it: no parent run, nothing registered
        return {"parent_run_id": None, "state": state, "removed_versions": []}
    uri = tracking_uri_for(cfg, Settings.from_env())
    store = open_store(join(artifact_root, run_name or kfp_run_id))
    succeeded = state == "SUCCEEDED"
    removed = []
    owner = store.read_json("pipeline.json").get("kfp_run_id") if store.exists("pipeline.json") else None
    if not succeeded and owner == kfp_run_id:  # leave the registry as this run found it: alias back, versions gone
        reg = Registry(uri)
        mine = {kind: reg.find(model_name(cfg.tracking.registered_model, kind), RUN_TAG, store.uri(""))
                for kind in KINDS}
        policy_name = model_name(cfg.tracking.registered_model, "policy")
        champion = reg.by_alias(policy_name, CHAMPION)
        if champion is not None and champion.version in {v.version for v in mine["policy"]}:
            previous = store.read_json(PREVIOUS_CHAMPION).get("version") if store.exists(PREVIOUS_CHAMPION) else None
            if previous:
                reg.client.set_registered_model_alias(policy_name, CHAMPION, previous)
            else:
                reg.client.delete_registered_model_alias(policy_name, CHAMPION)
        for versions in mine.values():
            for v in versions:
                reg.delete(v)
                removed.append(f"{v.name}/{v.version}")
    parent = finish_pipeline_run(uri, cfg.tracking.experiment, kfp_run_id, succeeded, error)
    if succeeded and parent and store.exists("summary.json"):
        log_pipeline_plots(uri, parent, store.read_json("summary.json"))
    return {"parent_run_id": parent, "state": state, "removed_versions": removed}


def publish(artifact, result: dict) -> None:
    """Write a stage's result as a KFP output artifact: a small JSON manifest (store
    URIs, sha256, MLflow ids) in the file, and its scalars as artifact metadata, shown
    in the Kubeflow UI. The bytes stay in the artifact store."""
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(json.dumps(result, indent=2, default=str))
    for k, v in result.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            artifact.metadata[k] = v
