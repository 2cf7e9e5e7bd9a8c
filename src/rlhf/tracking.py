"""Tracking adapter: MLflow for real runs, a no-op recorder for unit tests.

Stages receive a tracker and only call `stage_run`, `log_metrics`, `log_table`,
`log_dict` and `log_model`; nothing else in the engine imports mlflow.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Iterator

from rlhf.config import flatten


FLUSH_SECONDS = 10.0
"""Metrics reach MLflow at most this long after they are logged."""


def _pip_requirements() -> list[str]:
    import torch
    import transformers

    return [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
            "safetensors", "tokenizers"]


class NullTracker:
    """Records calls in memory; for unit tests and `--no-tracking` runs."""

    def __init__(self):
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.params: dict[str, Any] = {}
        self.tables: dict[str, list[dict]] = {}
        self.models: dict[str, str] = {}
        self.run_id = None

    @contextlib.contextmanager
    def stage_run(self, name: str, params: dict[str, Any], run_id_file: Path | None = None) -> Iterator[None]:
        self.params.update(params)
        yield

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_table(self, rows: list[dict], name: str) -> None:
        self.tables[name] = rows

    def log_dict(self, obj: dict, name: str) -> None:
        self.tables[name] = [obj]

    def log_model(self, model_dir: Path, kind: str, name: str = "model") -> str | None:
        self.models[kind] = str(model_dir)
        return None


class MLflowTracker:
    """One MLflow run per stage, in one experiment.

    Embedded default: a sqlite database and an artifact folder inside the output folder
    (no server). With `MLFLOW_TRACKING_URI` (or `tracking.tracking_uri`) set, the same
    code logs to a tracking server.
    """

    def __init__(self, experiment: str, tracking_uri: str | None, output_dir: Path, log_models: bool = True):
        import mlflow

        self.mlflow = mlflow
        output_dir = Path(output_dir).resolve()
        uri = tracking_uri or f"sqlite:///{output_dir / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        self.tracking_uri = uri
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            artifact_location = (output_dir / "mlartifacts").as_uri() if uri.startswith("sqlite") else None
            exp_id = mlflow.create_experiment(experiment, artifact_location=artifact_location)
        else:
            exp_id = exp.experiment_id
        self.experiment_id = exp_id
        self.log_models = log_models
        self.run_id: str | None = None
        self._buffer: list = []
        self._last_flush = time.monotonic()

    @contextlib.contextmanager
    def stage_run(self, name: str, params: dict[str, Any], run_id_file: Path | None = None) -> Iterator[None]:
        """Start (or, after a crash, resume) the stage's run; FAILED if the body raises."""
        resume_id = None
        if run_id_file is not None and run_id_file.is_file():
            resume_id = run_id_file.read_text().strip() or None
        parent = os.environ.get("MLFLOW_PARENT_RUN_ID")
        with self.mlflow.start_run(run_id=resume_id, run_name=None if resume_id else name,
                                   experiment_id=None if resume_id else self.experiment_id,
                                   nested=bool(parent), parent_run_id=parent if not resume_id else None,
                                   log_system_metrics=False) as run:
            self.run_id = run.info.run_id
            if run_id_file is not None:
                run_id_file.parent.mkdir(parents=True, exist_ok=True)
                run_id_file.write_text(self.run_id)
            if not resume_id:
                flat = {k: ("" if v is None else str(v))[:6000] for k, v in flatten(params).items()}
                items = list(flat.items())
                for i in range(0, len(items), 90):
                    self.mlflow.log_params(dict(items[i:i + 90]))
                self.mlflow.set_tag("rlhf.stage", name)
            try:
                yield
            finally:
                self.flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffered: one sqlite/HTTP round trip per flush, not per training step."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
        if len(self._buffer) >= 900 or time.monotonic() - self._last_flush > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._buffer and self.run_id:
            client = self.mlflow.MlflowClient()
            for i in range(0, len(self._buffer), 1000):
                client.log_batch(self.run_id, metrics=self._buffer[i:i + 1000], synchronous=True)
        self._buffer = []
        self._last_flush = time.monotonic()

    def log_table(self, rows: list[dict], name: str) -> None:
        if rows:
            import pandas as pd

            self.mlflow.log_table(pd.DataFrame(rows), artifact_file=name)

    def log_dict(self, obj: dict, name: str) -> None:
        self.mlflow.log_dict(obj, name)

    def log_model(self, model_dir: Path, kind: str, name: str = "model") -> str | None:
        """Log a saved model folder. kind: 'policy' (text generation) or 'reward' (scoring)."""
        if not self.log_models:
            return None
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        if kind == "reward":
            model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True)
            task = "text-classification"  # problem_type "regression": raw scores, no sigmoid
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
            task = "text-generation"
        info = self.mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tok}, name=name, task=task,
            pip_requirements=_pip_requirements())
        return info.model_uri


def make_tracker(cfg, output_dir: Path, settings) -> MLflowTracker:
    uri = cfg.tracking.tracking_uri or settings.mlflow_tracking_uri
    return MLflowTracker(cfg.tracking.experiment, uri, output_dir, cfg.tracking.log_models)
