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
import json
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse


from rlhf import __version__
from rlhf.config import ConfigError, PipelineConfig, load_config
from rlhf.adapters.settings import Settings
from rlhf.redaction import guard_streams, redact
from rlhf.adapters.store import open_store
from rlhf.dispatch import StageRequest, dispatch
from rlhf.params import UI_PARAMS

PREP_SECTIONS = ("seed", "task", "data", "model")


def step_entry(step: str):
    """A pipeline step's process entry: read the settings (the environment) once and
    pass them in; on failure, write the step's error where `rlhf run` looks for it
    (RLHF_ERROR_FILE), so the command ends with the cause, not just "a task failed"."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            name = kwargs.get("name") or (args[0] if step == "stage" and args else step)
            guard_streams()  # the step's log (prints, log lines, the traceback) passes through redact
            settings = Settings.from_env()
            path = settings.error_file
            try:
                out = fn(*args, settings=settings, **kwargs)
            except Exception as e:
                message = redact(e)
                if path and not Path(path).exists():  # the first failure is the cause
                    Path(path).write_text(json.dumps({"step": name, "type": type(e).__name__, "message": message}))
                if message != str(e):  # the exception itself goes to KFP's log and UI: without the secret
                    raise RuntimeError(f"{type(e).__name__}: {message}") from None
                raise
            if path and Path(path).exists() and json.loads(Path(path).read_text()).get("step") == name:
                Path(path).unlink()  # a retry of this step succeeded: its earlier error is not the cause
            return out
        return inner
    return wrap


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts if p)])


def config_from_json(config_json: str) -> dict | None:
    """The config_json pipeline parameter: empty, or a JSON object of sections."""
    try:
        return json.loads(config_json) if config_json and config_json.strip() else None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config_json is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def resolve_config(preset: str, config_json: str = "", overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """preset -> config JSON -> the typed pipeline parameters that are set.

    A typed parameter is "not set" when it is empty ("") or negative (-1): then the
    preset / JSON value stands. This is how the Kubeflow UI form and the JSON
    parameter combine."""
    cfg_dict = config_from_json(config_json)
    unknown = set(overrides or {}) - set(UI_PARAMS)
    if unknown:
        raise ConfigError(f"unknown pipeline parameters {sorted(unknown)}; known: {sorted(UI_PARAMS)}")
    sets = [f"{UI_PARAMS[k]}={json.dumps(v)}" for k, v in (overrides or {}).items()
            if v is not None and v != "" and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0)]
    return load_config(preset or None, None, sets, config_dict=cfg_dict)


def git_sha(settings: Settings) -> str:
    sha = settings.git_sha  # RLHF_GIT_SHA, baked into images
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
    for src in (cfg.data.sft_path, cfg.data.preference_path, cfg.data.prompt_path, cfg.data.ptx_path):
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


@step_entry("start")
def start(preset: str, config_json: str, overrides: dict[str, Any], artifact_root: str, run_name: str,
          kfp_run_id: str, settings: Settings) -> dict:
    from rlhf.adapters.tracking import start_pipeline_run, tracking_uri_for

    cfg = resolve_config(preset, config_json, overrides)
    run_root = join(artifact_root, run_name or kfp_run_id)
    store = open_store(run_root, settings)
    owner = store.read_json("pipeline.json").get("kfp_run_id") if store.exists("pipeline.json") else None
    if owner not in (None, kfp_run_id):  # a KFP retry of this step has the same id
        raise ConfigError(f"{store.uri('')} already holds pipeline run {owner}; give this run its own folder "
                          "(a new run_name / --output, or an empty run_name to use the KFP run id)")
    key = data_key(cfg, store)
    sha = git_sha(settings)
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


PREP_WAIT_S = 6 * 3600.0
"""How long a run waits while another run (renewing its claim) prepares the same data."""


@step_entry("prep")
def prep(prep_config_json: str, artifact_root: str, key: str, settings: Settings, dataset=None,
         metrics=None) -> dict:
    """Data prep into the content-addressed dataset folder, unless it is committed there.

    Once per dataset, however many runs start at once: the preparing run holds the
    dataset's lease (`prep.lease`, store compare-and-swap), builds the data in a local
    staging folder and commits it whole (`put_dir`, marker last); the others wait and
    use the committed data. A preparer that dies stops renewing its lease, and the next
    waiter takes over after its expiry. `dataset` and `metrics`: the KFP step's outputs
    (`publish_outputs`)."""
    from rlhf.adapters.lease import Lease, owner_id

    cfg = PipelineConfig.model_validate_json(prep_config_json)
    root = join(artifact_root, "_datasets", key)
    store = open_store(root, settings)
    prepared = False
    if not store.is_committed("prep"):
        done = functools.partial(store.is_committed, "prep")
        with Lease(store, "prep.lease", owner_id()).held(PREP_WAIT_S, done=done) as mine:
            if mine and not done():
                dispatch(StageRequest("prep", root, root, tracking=False), cfg, settings)
                prepared = True
    report = json.loads(store.read_artifact_file("prep", "report.json"))
    manifest = store.read_artifact_file("prep", "MANIFEST.json")
    out = {"uri": store.uri("prep"), "root": store.uri(""), "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
           "sizes": report["sizes"], "hashes": report["hashes"], "data_key": key, "prepared_here": prepared,
           "rejected": {kind: r.get("rejected") for kind, r in report.get("reports", {}).items()}}
    publish_outputs("prep", out, manifest=dataset, metrics=metrics)
    return out


@step_entry("stage")
def stage(name: str, config_json: str, run_root: str, parent_run_id: str, dataset_root: str,
          promote: bool = True, settings: Settings | None = None, manifest=None, metrics=None, report=None,
          heldout_pairs=None) -> dict:
    """One stage of a pipeline run (a KFP step), through the one dispatcher; returns its
    result plus where its model lives. `promote` is promote's `move_alias`. The other
    keywords are the KFP step's output artifacts, filled by `publish_outputs`."""
    cfg = PipelineConfig.model_validate_json(config_json)
    options = {"move_alias": promote} if name == "promote" else {}
    result = dispatch(StageRequest(name, run_root, dataset_root, parent_run_id, options), cfg, settings)
    publish_outputs(name, result, manifest=manifest, metrics=metrics, heldout_pairs=heldout_pairs,
                    report=report, store=open_store(run_root, settings) if report is not None else None)
    return result


@step_entry("finish")
def finish(preset: str, config_json: str, overrides: dict[str, Any], artifact_root: str, run_name: str,
           kfp_run_id: str, state: str, error: str = "", settings: Settings | None = None) -> dict:
    from rlhf.adapters.registry import CHAMPION, KINDS, Registry, model_name
    from rlhf.stages.promote import PREVIOUS_CHAMPION, RUN_TAG
    from rlhf.adapters.tracking import finish_pipeline_run, log_pipeline_plots, tracking_uri_for

    try:
        cfg = resolve_config(preset, config_json, overrides)
    except ConfigError:  # start failed on it: no parent run, nothing registered
        return {"parent_run_id": None, "state": state, "removed_versions": []}
    from rlhf.train.faults import Faults

    Faults.from_settings(settings).hold()  # outage tests take MLflow down here
    uri = tracking_uri_for(cfg, settings)
    store = open_store(join(artifact_root, run_name or kfp_run_id), settings)
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


def publish_outputs(name: str, result: dict, manifest=None, metrics=None, heldout_pairs=None, report=None,
                    store=None) -> None:
    """A step's KFP output artifacts from its result (each one optional):

    - `manifest` (Dataset / Model): the result as a small JSON manifest (`publish`);
    - `metrics` (`dsl.Metrics`): the step's headline numbers (`rlhf.stages.report.headline_metrics`);
    - `heldout_pairs` (`dsl.ClassificationMetrics`): the reward model's held-out pairs, a
      confusion matrix (truth: the judge, or the labels) and the ROC curve of its margins;
    - `report` (`dsl.Markdown`): eval's report, copied from the run's `store`.
    """
    from rlhf.stages.report import REPORT_KEY, headline_metrics

    if manifest is not None:
        publish(manifest, result)
    if metrics is not None:
        for key, value in headline_metrics(name, result).items():
            metrics.log_metric(key, value)
    pairs = result.get("rm/classification")
    if heldout_pairs is not None and pairs:
        heldout_pairs.log_confusion_matrix(pairs["categories"], pairs["matrix"])
        if pairs.get("roc"):
            heldout_pairs.log_roc_curve(pairs["roc"]["fpr"], pairs["roc"]["tpr"], pairs["roc"]["threshold"])
        heldout_pairs.metadata.update({"truth": pairs["truth"], "pairs": pairs["pairs"], "auc": pairs.get("auc")})
    if report is not None:
        Path(report.path).parent.mkdir(parents=True, exist_ok=True)
        Path(report.path).write_bytes(store.read_bytes(REPORT_KEY))


def publish(artifact, result: dict) -> None:
    """Write a stage's result as a KFP output artifact: a small JSON manifest (store
    URIs, sha256, MLflow ids) in the file, and its scalars as artifact metadata, shown
    in the Kubeflow UI. The bytes stay in the artifact store."""
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(json.dumps(result, indent=2, default=str))
    for k, v in result.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            artifact.metadata[k] = v


# ----------------------------------------------------------------------------- rlhf experiment as a pipeline
# The steps of `rlhf.pipelines.experiment` (the same functions `rlhf experiment` calls in
# one process). The experiment lives in <artifact_root>/<run_name or KFP run id>.


def experiment_command(kind: str, preset: str, quick: bool, seeds: str, overrides: str) -> str:
    """The command line that runs the same experiment in one process (for the report)."""
    import shlex

    sets = " ".join(f"--set {shlex.quote(s)}" for s in shlex.split(overrides or ""))
    return " ".join(p for p in (f"rlhf experiment {kind}", f"--preset {preset}" if preset else "",
                                "--quick" if quick else "", f"--seeds {seeds}", sets) if p)


def experiment_exists(output: str, settings: Settings) -> bool:
    from rlhf.ops.experiment import RECORD

    return open_store(output, settings).exists(RECORD)


def experiment_results(output: str, settings: Settings, results: str) -> None:
    """The finished experiment's report into a RESULTS.md section."""
    from rlhf.ops.experiment import results_from_store

    results_from_store(output, settings, results)


@step_entry("experiment-start")
def experiment_start(kind: str, preset: str, quick: bool, seeds: str, overrides: str, config_json: str,
                     artifact_root: str, run_name: str, kfp_run_id: str, settings: Settings) -> list[dict]:
    """Validate and record the experiment, open its MLflow parent run: one spec per seed."""
    import shlex

    from rlhf.ops import experiment

    seed_list, config = experiment.parse_seeds(seeds), config_from_json(config_json)
    command = experiment_command(kind, preset, quick, ",".join(map(str, seed_list)), overrides)
    return experiment.start(kind, preset=preset, quick=quick, seeds=seed_list, sets=shlex.split(overrides or ""),
                            output=join(artifact_root, run_name or kfp_run_id), settings=settings,
                            command=f"{command}  # KFP pipeline rlhf-experiment, run {kfp_run_id}",
                            config_dict=config, run_id=f"experiment-{kfp_run_id}")


@step_entry("experiment-bases")
def experiment_bases(spec: dict, settings: Settings) -> list[dict]:
    """One seed's bases (prep, SFT, reward model); the specs of its arms."""
    from rlhf.ops import experiment

    return experiment.train_bases(spec, settings)


@step_entry("experiment-arm")
def experiment_arm(spec: dict, settings: Settings) -> dict:
    from rlhf.ops import experiment

    return experiment.train_arm(spec, settings)


@step_entry("experiment-report")
def experiment_finish(artifact_root: str, run_name: str, kfp_run_id: str, state: str, error: str = "",
                      settings: Settings | None = None) -> dict:
    """The exit step: after success the report (table, plot, claims) into the store and
    the parent run, closed FINISHED; otherwise the parent run closed FAILED."""
    from rlhf.ops import experiment

    output = join(artifact_root, run_name or kfp_run_id)
    if not open_store(output, settings).exists(experiment.RECORD):  # start failed: nothing opened
        return {"state": state}
    if state != "SUCCEEDED":
        experiment.fail(output, settings, error or state)
        return {"state": state}
    try:
        return {k: v for k, v in experiment.report(output, settings).items() if k != "rows"}
    except Exception as e:
        experiment.fail(output, settings, f"report: {type(e).__name__}: {e}")
        raise
