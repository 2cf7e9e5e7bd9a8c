"""The one dispatcher: every way of running a stage ends in `dispatch`.

    rlhf stage X        cli ------------------\
    KFP step X          components -> runs.stage -> dispatch(request, cfg, settings) -> stage.run(ctx)
    torchrun rank k     ops.worker -----------/        (or launches the processes that call it)

`dispatch` looks the stage up in the table (`rlhf.stages.table`), starts it in
several processes when it trains on several GPUs or nodes (each process comes back
here through `rlhf.ops.worker` with the same `StageRequest`), otherwise builds the
`StageContext` once and calls `run(ctx)`. Rank 0 writes `<stage>/result.json` and,
after eval and promote, the run's `summary.json` (written nowhere else).
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import asdict, dataclass, field

import yaml

from rlhf.adapters.settings import Settings
from rlhf.adapters.store import StoreError, open_store
from rlhf.config import PipelineConfig
from rlhf.stages.contract import Runtime, StageContext
from rlhf.stages.table import STAGES, StageSpec


@dataclass
class StageRequest:
    """Where a stage runs: the only request shape, for the CLI, KFP steps and workers."""

    name: str
    run_root: str
    """The run's artifact store (a folder or s3:// prefix)."""
    dataset_root: str
    """The store holding the committed data prep output (the run's own for `rlhf stage`)."""
    parent_run_id: str = ""
    """The MLflow pipeline run the stage's run nests under (empty: none)."""
    options: dict = field(default_factory=dict)
    quiet: bool = True
    tracking: bool = True
    """Log to MLflow (off for the pipeline's cached data prep)."""

    def for_workers(self, cfg: PipelineConfig) -> dict:
        """What each worker process gets as RLHF_STAGE_REQUEST (JSON): this request and the config."""
        return {**asdict(self), "config_json": cfg.model_dump_json()}

    @classmethod
    def of_worker(cls, d: dict) -> tuple["StageRequest", PipelineConfig]:
        """A worker's request; its config is validated here, once for this process."""
        req = cls(**{k: v for k, v in d.items() if k != "config_json"})
        return req, PipelineConfig.model_validate_json(d["config_json"])


def dispatch(req: StageRequest, cfg: PipelineConfig, settings: Settings) -> dict:
    """Run stage `req.name` (in this process or, for multi-GPU training, in several);
    return its result, plus where its model lives."""
    from rlhf.ops.launch import launch, launcher_for

    spec = STAGES[req.name]
    store = open_store(req.run_root, settings)
    launcher = launcher_for(req.name, cfg, settings)
    if launcher == "trainjob":  # several nodes: a Kubeflow Trainer job; rank 0 leaves the result in the store
        from rlhf.ops.trainjob import run_trainjob

        run_trainjob(req.for_workers(cfg), json.loads(settings.trainjob), settings)
        return _with_artifact(spec, store, store.read_json(f"{req.name}/result.json"))
    if launcher == "torchrun":  # several processes here
        from rlhf.train.distributed import world_size

        launch(req.for_workers(cfg), world_size(cfg), settings)
        return _with_artifact(spec, store, store.read_json(f"{req.name}/result.json"))
    ctx = build_context(spec, req, cfg, store, settings)
    if settings.rank == 0:  # the exact config the stage ran with, next to its outputs
        store.write_bytes(f"{req.name}/config.yaml", yaml.safe_dump(cfg.model_dump(), sort_keys=False).encode())
    result = importlib.import_module(spec.module).run(ctx).values
    if settings.rank != 0:
        return result
    store.write_json(f"{req.name}/result.json", result)
    if spec.updates_summary:
        write_summary(store, ctx.prep_store, cfg)
    return _with_artifact(spec, store, result)


def build_context(spec: StageSpec, req: StageRequest, cfg: PipelineConfig, store, settings: Settings) -> StageContext:
    """Everything a stage may use, built once: its section, stores, tracker, judge, task."""
    from rlhf.adapters.tracking import NullTracker, make_tracker
    from rlhf.data.tasks.judge import build_judge, build_task
    from rlhf.train.checkpoint import config_fingerprint
    from rlhf.train.faults import Faults

    prep_store = open_store(req.dataset_root, settings)
    tags = {"rlhf.run": store.uri("")}
    if spec.reads_prep:
        if not prep_store.is_committed("prep"):
            raise StoreError(f"the dataset {prep_store.uri('prep')} is gone (deleted, or a cached prep step from "
                             "another store): rerun with caching off for the data prep step")
        report = json.loads(prep_store.read_artifact_file("prep", "report.json"))
        tags["rlhf.data_hashes"] = json.dumps(report.get("hashes", {}), sort_keys=True)[:5000]
    tracker = (make_tracker(cfg, settings, parent_run_id=req.parent_run_id or None, tags=tags) if req.tracking
               else NullTracker())
    if spec.logs_data_report and req.parent_run_id and settings.rank == 0:  # the data behind the pipeline run
        tracker.log_parent_dict(req.parent_run_id, report, "prep_report.json")
    return StageContext(
        name=spec.name, config=getattr(cfg, spec.section), model=cfg.model, seed=cfg.seed,
        runtime=Runtime(cfg.device, cfg.num_threads, cfg.distributed, cfg.train.precision), store=store,
        prep_store=prep_store,
        tracker=tracker, judge=build_judge(cfg), task=build_task(cfg), settings=settings,
        faults=Faults.from_settings(settings), fingerprint=config_fingerprint(cfg), params=cfg.model_dump(),
        registered_model=cfg.tracking.registered_model, parent_run_id=req.parent_run_id or None, quiet=req.quiet,
        options=dict(req.options), sections={s: getattr(cfg, s) for s in spec.also_reads})


def _with_artifact(spec: StageSpec, store, result: dict) -> dict:
    """The stage's result plus where its model lives (URI and manifest hash)."""
    if spec.model_key:
        result["artifact_uri"] = store.uri(spec.model_key)
        result["manifest_sha256"] = hashlib.sha256(store.read_artifact_file(spec.model_key, "MANIFEST.json")).hexdigest()
    return result


def write_summary(store, prep_store, cfg: PipelineConfig) -> dict:
    """The run's summary.json, from the stages' results: key results, eval's numbers and
    gate, the registry outcome once promote ran, and every stage's wall time."""
    where = {name: (store if spec.reads_prep else prep_store) for name, spec in STAGES.items()
             if spec.trains or not spec.reads_prep and not spec.updates_summary}  # prep and the trainers
    stages = {name: s.read_json(f"{name}/result.json") for name, s in where.items() if s.exists(f"{name}/result.json")}
    ev = store.read_json("eval/result.json")
    summary = {
        "rm/accuracy": stages.get("reward", {}).get("rm/accuracy"),
        "rm/label_accuracy": stages.get("reward", {}).get("rm/label_accuracy"),
        "rm/judge_accuracy": stages.get("reward", {}).get("rm/judge_accuracy"),
        **{f"ppo/{k}": stages.get("ppo", {}).get(k) for k in ("judge", "select", "selected_update", "updates",
                                                              "early_stopped", "judge_best_score")},
        "sft/best_eval_loss": stages.get("sft", {}).get("best_eval_loss"),
        "sft/eval_curve": stages.get("sft", {}).get("eval_curve"),
        **{k: v for k, v in ev.items() if k not in ("eval/mlflow_run_id", "tracking_s")},
        "wall_s": {**{k: round(v["wall_s"], 2) for k, v in stages.items()}, "eval": round(ev["eval/wall_s"], 2)},
        # of which in MLflow calls (pipeline overhead inside the stages; benchmarks/overhead.py)
        "tracking_s": {**{k: round(v.get("tracking_s", 0.0), 2) for k, v in stages.items()},
                       "eval": round(ev.get("tracking_s", 0.0), 2)},
        "config": cfg.model_dump(),
    }
    if store.exists("promote/result.json"):
        promoted = store.read_json("promote/result.json")
        summary.update({k: v for k, v in promoted.items() if k not in ("wall_s", "mlflow_run_id")})
        summary["wall_s"]["promote"] = round(promoted["wall_s"], 2)
    summary["wall_s"]["total"] = round(sum(v for k, v in summary["wall_s"].items() if k != "total"), 2)
    store.write_json("summary.json", summary)
    return summary
