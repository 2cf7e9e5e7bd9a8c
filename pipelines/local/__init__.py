"""`rlhf run`: the Kubeflow DAG on one machine through `kfp.local.SubprocessRunner`.

Every step runs as a subprocess of this Python, exactly the component code a cluster
runs in the training image. Settings reach the steps through the environment (as on
a cluster, where they come from Secrets and ConfigMaps), never through pipeline
parameters: the tracking URI of the embedded default is set here when none is.

The local runner lives here with its warm-step server (`warm.py`: each step forks
from a preloaded process), apart from the DAG (`rlhf.pipelines.dag`), which a cluster
compiles without either.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import time
from pathlib import Path

from rlhf.config import PipelineConfig
from rlhf.adapters.settings import Settings
from rlhf.adapters.tracking import embedded_tracking_uri
from rlhf.redaction import display_uri


class PipelineFailed(RuntimeError):
    pass


def split_output(output: str) -> tuple[str, str]:
    """'runs/demo-1' -> (absolute 'runs', 'demo-1'); 's3://b/p/x' -> ('s3://b/p', 'x')."""
    if output.startswith("s3://"):
        root, _, name = output.rstrip("/").rpartition("/")
        if not name or root in ("s3:", "s3:/"):
            raise PipelineFailed(f"{output}: give a run folder under a bucket, e.g. s3://bucket/runs/my-run")
        return root, name
    p = Path(output).expanduser().resolve()
    return str(p.parent), p.name


def default_output(cfg_name: str, settings: Settings) -> str:
    root = settings.artifact_root or str(settings.home)
    return f"{root.rstrip('/')}/{cfg_name}-{time.strftime('%Y%m%d-%H%M%S')}"


STEP_LOG = "pipeline.log"
"""Every step's log (kfp.local's executor output, the steps' own lines), in the run folder."""


def step_log_path(output: str, settings: Settings) -> Path:
    """Where `rlhf run` writes the steps' log while it runs: in a local run folder itself;
    for an s3:// run folder under RLHF_HOME, copied to the run folder at the end."""
    artifact_root, run_name = split_output(output)
    if artifact_root.startswith("s3://"):
        return settings.home.resolve() / ".kfp" / "logs" / f"{run_name}-{os.getpid()}.log"
    return Path(artifact_root) / run_name / STEP_LOG


def run_local(cfg: PipelineConfig, output: str, settings: Settings, env: dict[str, str] | None = None,
              output_mode: str = "verbose") -> dict:
    """Run the whole DAG; return the run's summary. Raises PipelineFailed with the failing
    step's own error when a step fails (after the exit handler has run).

    `output_mode`: "verbose" streams every step's log here; "progress" writes it to
    `step_log_path` and prints a line per finished step; "quiet" only writes it."""
    from rlhf.adapters.store import open_store

    artifact_root, run_name = split_output(output)
    store = open_store(f"{artifact_root}/{run_name}", settings)
    if store.exists("pipeline.json"):
        raise PipelineFailed(f"{store.uri('')} already holds a pipeline run; choose a new --output")
    if output_mode == "verbose":
        return _run_dag(cfg, store, artifact_root, run_name, settings, env)
    from rlhf.pipelines.local.steplog import step_log

    log = step_log_path(output, settings)
    try:
        with step_log(log, progress=output_mode == "progress"):
            return _run_dag(cfg, store, artifact_root, run_name, settings, env)
    finally:
        if artifact_root.startswith("s3://") and log.is_file():
            with contextlib.suppress(Exception):  # the run's own outcome matters more than its log's copy
                store.write_bytes(STEP_LOG, log.read_bytes())


def _run_dag(cfg: PipelineConfig, store, artifact_root: str, run_name: str, settings: Settings,
             env: dict[str, str] | None) -> dict:
    from rlhf.pipelines import rlhf_pipeline

    with local_runner(cfg, settings, env) as error_file:
        try:
            rlhf_pipeline(preset="", config_json=cfg.model_dump_json(), artifact_root=artifact_root,
                          run_name=run_name)
        except KeyboardInterrupt:  # the exit handler never runs: do its work, then stop
            if store.exists("pipeline.json"):
                from rlhf import runs

                runs.finish("", cfg.model_dump_json(), {}, artifact_root, run_name,
                            store.read_json("pipeline.json")["kfp_run_id"], "CANCELLED", "interrupted (Ctrl-C)")
            raise
    if not store.exists("promote/result.json"):
        raise PipelineFailed(f"the pipeline did not finish: {_step_error(error_file)}")
    return store.read_json("summary.json")


def _step_error(error_file: Path) -> str:
    err = json.loads(error_file.read_text()) if error_file.is_file() else {}
    where = f"step {err['step']!r} failed: " if err.get("step") else ""
    return f"{where}{err.get('message', 'see the step logs above')}"


@contextlib.contextmanager
def local_runner(cfg: PipelineConfig, settings: Settings, env: dict[str, str] | None = None):
    """kfp.local set up for one pipeline run on this machine: the steps' environment
    (tracking URI, quiet progress, the error file, which it yields), warm steps."""
    from kfp import local

    from rlhf.pipelines.local.warm import available as warm_available, warm_steps

    child_env = dict(env or {})
    if not (cfg.tracking.tracking_uri or settings.mlflow_tracking_uri or child_env.get("MLFLOW_TRACKING_URI")):
        child_env["MLFLOW_TRACKING_URI"] = embedded_tracking_uri(settings.home)
    child_env.setdefault("RLHF_QUIET", "1")
    kfp_dir = settings.home.resolve() / ".kfp"
    kfp_dir.mkdir(parents=True, exist_ok=True)
    error_file = kfp_dir / f"error-{os.getpid()}.json"
    error_file.unlink(missing_ok=True)
    child_env["RLHF_ERROR_FILE"] = str(error_file)
    saved = {k: os.environ.get(k) for k in child_env}
    os.environ.update(child_env)  # kfp.local passes its environment to every step
    steps = warm_steps() if settings.warm_steps and warm_available() else contextlib.nullcontext()
    # kfp.local indents each step's log by swapping builtins.print and putting back the one it
    # found; ParallelFor iterations run in threads, so one can put back another's indenting
    # print and leave every later print of this process indented: put back the real one
    real_print = builtins.print
    try:
        with steps:
            local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(kfp_dir / "outputs"),
                       enable_caching=True, cache_root=str(kfp_dir / "cache"), raise_on_error=False)
            yield error_file
    finally:
        builtins.print = real_print
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_experiment_local(kind: str, *, preset: str, quick: bool, seeds: list[int], sets: list[str], output: str,
                         settings: Settings, config_dict: dict | None = None, results: str | None = None) -> dict:
    """`rlhf experiment --kfp`: the experiment pipeline through kfp.local (the DAG a
    cluster runs, seeds and arms as ParallelFor loops); its report."""
    import shlex

    from rlhf import runs
    from rlhf.config import load_config
    from rlhf.pipelines.experiment import build_experiment_pipeline
    from rlhf.adapters.store import open_store

    artifact_root, run_name = split_output(output)
    root = f"{artifact_root}/{run_name}"
    store = open_store(root, settings)
    if runs.experiment_exists(root, settings):
        from rlhf.config import ConfigError

        raise ConfigError(f"{store.uri('')} already holds an experiment; choose a new --output")
    cfg = load_config(preset or None, None, sets, config_dict=config_dict)
    with local_runner(cfg, settings) as error_file:
        build_experiment_pipeline()(kind=kind, preset=preset, quick=quick, seeds=",".join(map(str, seeds)),
                                    overrides=" ".join(shlex.quote(s) for s in sets),
                                    config_json=json.dumps(config_dict) if config_dict else "",
                                    artifact_root=artifact_root, run_name=run_name)
    if not store.exists(f"{kind}.json"):
        raise PipelineFailed(f"the experiment did not finish: {_step_error(error_file)}")
    if results:
        runs.experiment_results(root, settings, results)
    return store.read_json(f"{kind}.json")


def summary_lines(summary: dict, output: str, tracking_uri: str) -> list[str]:
    keys = ["rm/accuracy", "rm/judge_accuracy", "eval/judge", "eval/decisive_win_rate_vs_sft",
            "eval/decisive_win_rate_lower_vs_sft", "eval/tie_rate_vs_sft", "eval/rm_decisive_win_rate_vs_sft",
            "eval/judge_delta", "eval/judge_delta_ci95", "eval/kl_vs_sft", "eval/alignment_tax_rel",
            "ppo/selected_update", "champion/decisive_win_rate", "promoted", "registered_model", "policy_model_uri",
            "registered_versions"]
    lines = [f"{k}: {json.dumps(summary[k])}" for k in keys if summary.get(k) is not None]
    if summary.get("gate_reasons"):
        lines.append("gate: " + "; ".join(summary["gate_reasons"]))
    lines.append(f"summary: {output.rstrip('/')}/summary.json")
    if tracking_uri.startswith("sqlite:///"):
        lines.append(f"MLflow UI: mlflow ui --backend-store-uri {tracking_uri}")
    else:  # never print credentials embedded in the URI (http://user:token@host)
        lines.append(f"MLflow UI: {display_uri(tracking_uri)}")
    return lines
