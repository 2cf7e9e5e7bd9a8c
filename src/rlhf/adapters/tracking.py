"""Tracking adapter: MLflow for real runs, a no-op recorder for unit tests.

Stages receive a `Tracker` (the protocol below) and only call its methods;
nothing else in the engine imports mlflow.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Protocol

from rlhf.adapters.outbox import Outbox, answers, outage_error, tolerant
from rlhf.config import flatten
from rlhf.redaction import display_uri, redact


FLUSH_SECONDS = 10.0
"""Metrics reach MLflow at most this long after they are logged."""


@contextlib.contextmanager
def _client_env(**values: str) -> Iterator[None]:
    """The MLflow client reads its HTTP retry settings from the environment per request."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _pip_requirements() -> list[str]:
    import torch
    import transformers

    return [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
            "safetensors", "tokenizers"]


class Tracker(Protocol):
    """What a stage may ask of tracking: one run per stage, metrics, tables, models, and
    the registered champion. `MLflowTracker` logs to MLflow; `NullTracker` records in
    memory (unit tests, and the ranks of a distributed stage other than 0)."""

    run_id: str | None
    tracking_uri: str | None
    seconds: float

    def stage_run(self, name: str, params: dict[str, Any], store=None) -> contextlib.AbstractContextManager: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def flush(self) -> None: ...
    def log_table(self, rows: list[dict], name: str) -> None: ...
    def log_dict(self, obj: dict, name: str) -> None: ...
    def log_text(self, text: str, name: str) -> None: ...
    def log_model(self, model_dir: Path, kind: str, name: str = "model") -> str | None: ...
    def log_parent_dict(self, parent_run_id: str | None, obj: dict, name: str) -> None: ...
    def load_registered(self, name: str, alias: str) -> dict | None: ...
    def load_components(self, model_uri: str) -> dict: ...


class NullTracker:
    """Records calls in memory; for unit tests and `--no-tracking` runs."""

    def __init__(self):
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.params: dict[str, Any] = {}
        self.tables: dict[str, list[dict]] = {}
        self.texts: dict[str, str] = {}
        self.models: dict[str, str] = {}
        self.run_id = None
        self.tracking_uri = None
        self.seconds = 0.0

    @contextlib.contextmanager
    def stage_run(self, name: str, params: dict[str, Any], store=None) -> Iterator[None]:
        self.params.update(params)
        yield

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def flush(self) -> None:
        pass

    def log_table(self, rows: list[dict], name: str) -> None:
        self.tables[name] = rows

    def log_dict(self, obj: dict, name: str) -> None:
        self.tables[name] = [obj]

    def log_text(self, text: str, name: str) -> None:
        self.texts[name] = text

    def log_model(self, model_dir: Path, kind: str, name: str = "model") -> str | None:
        self.models[kind] = str(model_dir)
        return None

    def load_registered(self, name: str, alias: str) -> dict | None:
        return None

    def load_components(self, model_uri: str) -> dict:
        raise RuntimeError(f"cannot load {model_uri}: this run has no tracking store")

    def log_parent_dict(self, parent_run_id: str | None, obj: dict, name: str) -> None:
        self.tables[name] = [obj]


def embedded_tracking_uri(home: Path) -> str:
    """The embedded default: one sqlite database under RLHF_HOME, shared by every run
    there, so the registry (and `@champion`) carries over from run to run."""
    return f"sqlite:///{Path(home).resolve() / 'mlflow.db'}"


class TrackingUnreachable(RuntimeError):
    """The tracking server does not answer."""


def check_reachable(tracking_uri: str, timeout_s: float = 10.0) -> None:
    """For an http(s) tracking server: one GET /health within `timeout_s`, else a clear
    error, instead of the MLflow client's minutes of silent retries (an interactive
    command waited over 2 minutes on a server that accepted and never answered)."""
    import urllib.error
    import urllib.request

    if not tracking_uri.startswith(("http://", "https://")):
        return
    url = tracking_uri.rstrip("/") + "/health"
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # it answered (a proxy or an auth page): the MLflow client reports what it means
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingUnreachable(
            f"the MLflow tracking server at {display_uri(tracking_uri)} did not answer within {timeout_s:.0f} s "
            f"({reason}); check MLFLOW_TRACKING_URI / --tracking-uri and that the server is up") from None


_READY: set[str] = set()


def ready_store(tracking_uri: str) -> str:
    """`tracking_uri`, its embedded sqlite database created or migrated first under a file
    lock (`<db>.lock`), once per process. Two runs started at once in a fresh RLHF_HOME
    otherwise both migrate the new database and one fails (`duplicate column name: step`,
    `table ... already exists`); with the lock the second finds it ready. Servers (http,
    https, databricks) migrate their own databases: nothing to do."""
    if tracking_uri.startswith(("http://", "https://")):
        from rlhf.adapters.settings import use_direct_artifact_transfers

        use_direct_artifact_transfers()  # large artifacts bypass the server's temporary disk
    if not tracking_uri.startswith("sqlite:///") or tracking_uri in _READY:
        return tracking_uri
    import fcntl

    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db = Path(tracking_uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            SqlAlchemyStore(tracking_uri, (db.parent / "mlartifacts").resolve().as_uri())
            RegistryStore(tracking_uri)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _READY.add(tracking_uri)
    return tracking_uri


def _timed(method):
    """Adds the call's duration to `self.seconds` (time spent talking to MLflow)."""

    @functools.wraps(method)
    def timed(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t

    return timed


class MLflowTracker:
    """One MLflow run per stage, in one experiment, optionally nested under a pipeline run.

    Embedded default: a sqlite database with an artifact folder next to it (no server).
    With `MLFLOW_TRACKING_URI` (or `tracking.tracking_uri`) set, the same code logs to a
    tracking server, which stores artifacts where it is configured to (S3 in the stack).
    """

    def __init__(self, experiment: str, tracking_uri: str, log_models: bool = True,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 outage_tolerance_s: float = 900.0):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(ready_store(tracking_uri))
        self.tracking_uri = tracking_uri
        self.tolerance_s = outage_tolerance_s
        self.experiment_id = self._tolerant(lambda: ensure_experiment(experiment, tracking_uri),
                                            f"experiment {experiment!r}")
        self._outbox: Outbox | None = None  # a server: metrics go through the outbox, never blocking a step
        self.log_models = log_models
        self.parent_run_id = parent_run_id
        self.tags = dict(tags or {})
        self.run_id: str | None = None
        self._buffer: list = []
        self._last_flush = time.monotonic()
        self.seconds = 0.0  # spent in MLflow calls (stage results report it: pipeline overhead)

    def _tolerant(self, fn, what: str):
        """`fn()`, retried through an outage of a tracking server (up to the tolerance)."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return fn()
        return tolerant(fn, self.tracking_uri, self.tolerance_s, what)

    @contextlib.contextmanager
    def stage_run(self, name: str, params: dict[str, Any], store=None) -> Iterator[None]:
        """Start the stage's run, or resume it when the store holds its id (a retried or
        restarted stage continues the same run). FAILED if the body raises.

        With a tracking server, starting waits through an outage (up to
        tracking.outage_tolerance_s) and metrics go through an `Outbox`: a step never
        waits for the server, and metrics an earlier attempt could not deliver
        (`<stage>/mlflow_spool.json`) are replayed first."""
        key = f"{name}/mlflow_run_id"
        resume_id = None
        if store is not None and store.exists(key):
            resume_id = store.read_bytes(key).decode().strip() or None
        parent = self.parent_run_id
        t_start = time.perf_counter()
        run = self._tolerant(lambda: self.mlflow.start_run(
            run_id=resume_id, run_name=None if resume_id else name,
            experiment_id=None if resume_id else self.experiment_id, nested=bool(parent),
            parent_run_id=parent if not resume_id else None, log_system_metrics=False), f"starting the {name} run")
        ended_ok = False
        try:
            self.run_id = run.info.run_id
            if store is not None and not resume_id:
                store.write_bytes(key, self.run_id.encode())
            self._tolerant(lambda: self._log_start(name, params, resumed=bool(resume_id)), f"the {name} run's params")
            self._open_outbox(store, f"{name}/mlflow_spool.json")
            self.seconds += time.perf_counter() - t_start
            ok = False
            try:
                yield
                ok = True
            finally:
                self._close_outbox(ok)
            ended_ok = True
        finally:
            self._end_run(name, ended_ok)

    def _end_run(self, name: str, ok: bool) -> None:
        """FINISHED or FAILED. A failing stage (a preempted pod within its grace period)
        does not wait for a server that does not answer: the run stays RUNNING, and the
        retry resumes it or the exit task marks it FAILED."""
        status = "FINISHED" if ok else "FAILED"
        if ok or not self.tracking_uri.startswith(("http://", "https://")) or answers(self.tracking_uri):
            self.mlflow.end_run(status)
            return
        # end_run leaves this process's active run first, then asks the server: with the
        # client's retries off that ask fails at once instead of after minutes
        with _client_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5"):
            try:
                self.mlflow.end_run(status)
            except Exception:  # noqa: BLE001 - the server is away; said below
                print(f"tracking: the MLflow server at {display_uri(self.tracking_uri)} does not answer; the {name} "
                      "run stays RUNNING (a retry resumes it, the exit task marks it FAILED)", file=sys.stderr,
                      flush=True)

    def _log_start(self, name: str, params: dict[str, Any], resumed: bool) -> None:
        if resumed:
            self.mlflow.set_tag("rlhf.resumed", "true")
            return
        flat = {k: redact("" if v is None else v)[:6000] for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 90):
            self.mlflow.log_params(dict(items[i:i + 90]))
        self.mlflow.set_tags({k: redact(v) for k, v in {"rlhf.stage": name, **self.tags}.items()})

    def _open_outbox(self, store, spool_key: str) -> None:
        """With a server: the outbox, first holding what an earlier attempt left spooled."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return
        from mlflow.entities import Metric

        run_id, client = self.run_id, self.mlflow.MlflowClient()

        def send(batch: list) -> None:
            client.log_batch(run_id, metrics=batch, synchronous=True)

        def spool(pending: list) -> None:
            if store is None:
                return
            if pending:
                store.write_bytes(spool_key, json.dumps([[m.key, m.value, m.timestamp, m.step] for m in pending]).encode())
            elif store.exists(spool_key):
                store.delete(spool_key)

        self._outbox = Outbox(send, spool, self.tracking_uri, self.tolerance_s)
        if store is not None and store.exists(spool_key):
            waiting = [Metric(k, v, ts, step) for k, v, ts, step in json.loads(store.read_bytes(spool_key))]
            print(f"tracking: replaying {len(waiting)} metrics an earlier attempt could not deliver", flush=True)
            self._outbox.replay(waiting)

    def _close_outbox(self, ok: bool) -> None:
        """Deliver what waits: through an outage up to the tolerance when the stage
        succeeded; a few seconds when it failed (the retry replays the spool)."""
        self.flush()
        box, self._outbox = self._outbox, None
        if box is None:
            return
        t = time.perf_counter()
        delivered = box.drain(None if ok else 5.0)
        box.close()
        self.seconds += time.perf_counter() - t
        if delivered:
            box.clear_spool()
        elif ok:
            raise outage_error(self.tracking_uri, box.tolerance_s, box.tolerance_s,
                               "the stage finished, but its metrics are undelivered (saved in the run's store)")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffered: one sqlite/HTTP round trip per flush, not per training step."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
        if len(self._buffer) >= 900 or time.monotonic() - self._last_flush > FLUSH_SECONDS:
            self.flush()

    @_timed
    def flush(self) -> None:
        if self._outbox is not None:  # never waits for the server; fails past the outage tolerance
            batch, self._buffer, self._last_flush = self._buffer, [], time.monotonic()
            self._outbox.put(batch)
            return
        if self._buffer and self.run_id:
            client = self.mlflow.MlflowClient()
            for i in range(0, len(self._buffer), 1000):
                client.log_batch(self.run_id, metrics=self._buffer[i:i + 1000], synchronous=True)
        self._buffer = []
        self._last_flush = time.monotonic()

    @_timed
    def log_table(self, rows: list[dict], name: str) -> None:
        if rows:
            import pandas as pd

            self._tolerant(lambda: self.mlflow.log_table(pd.DataFrame(rows), artifact_file=name), name)

    @_timed
    def log_dict(self, obj: dict, name: str) -> None:
        self._tolerant(lambda: self.mlflow.log_dict(obj, name), name)

    @_timed
    def log_text(self, text: str, name: str) -> None:
        """A text artifact of the stage's run (eval's Markdown report)."""
        self._tolerant(lambda: self.mlflow.log_text(text, name), name)

    @_timed
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
        info = self._tolerant(lambda: self.mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tok}, name=name, task=task,
            pip_requirements=_pip_requirements()), f"logging the {kind} model")
        return info.model_uri

    @_timed
    def log_parent_dict(self, parent_run_id: str | None, obj: dict, name: str) -> None:
        if parent_run_id:
            self._tolerant(lambda: self.mlflow.MlflowClient().log_dict(parent_run_id, obj, name), name)

    def load_registered(self, name: str, alias: str) -> dict | None:
        """{"version", "model", "tokenizer"} of a registered model's alias, or None when unset."""
        from rlhf.adapters.registry import Registry

        v = Registry(self.tracking_uri).by_alias(name, alias)
        if v is None:
            return None
        parts = self.load_components(f"models:/{name}@{alias}")
        return {"version": v.version, "tags": v.tags, **parts}

    def load_components(self, model_uri: str) -> dict:
        """{"model", "tokenizer"} of a logged or registered transformers model."""
        parts = self.mlflow.transformers.load_model(model_uri, return_type="components")
        return {"model": parts["model"], "tokenizer": parts["tokenizer"]}


def ensure_experiment(name: str, tracking_uri: str) -> str:
    """Experiment id by name, created if missing. With the embedded sqlite store the
    artifacts go to `mlartifacts/` beside the database (not ./mlruns in the cwd)."""
    import mlflow

    mlflow.set_tracking_uri(ready_store(tracking_uri))
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another stage
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def tracking_uri_for(cfg, settings) -> str:
    """The run's tracking URI: the config's, else MLFLOW_TRACKING_URI, else the embedded
    database; refused when it would carry credentials over plain http off the cluster."""
    uri = cfg.tracking.tracking_uri or settings.mlflow_tracking_uri or embedded_tracking_uri(settings.home)
    return settings.check_tracking_transport(uri)


def make_tracker(cfg, settings, parent_run_id: str | None = None, tags: dict[str, str] | None = None):
    if settings.rank != 0:  # one process of a distributed stage logs: rank 0
        return NullTracker()
    return MLflowTracker(cfg.tracking.experiment, tracking_uri_for(cfg, settings), cfg.tracking.log_models,
                         parent_run_id=parent_run_id, tags=tags, outage_tolerance_s=cfg.tracking.outage_tolerance_s)


# ----------------------------------------------------------------------------- pipeline runs

KFP_RUN_TAG = "rlhf.kfp_run_id"


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=ready_store(tracking_uri))


def find_pipeline_run(tracking_uri: str, experiment: str, kfp_run_id: str) -> str | None:
    import mlflow

    exp = _client(tracking_uri).get_experiment_by_name(experiment)
    if exp is None:
        return None
    mlflow.set_tracking_uri(tracking_uri)
    runs = _client(tracking_uri).search_runs([exp.experiment_id], f"tags.`{KFP_RUN_TAG}` = '{kfp_run_id}'",
                                            max_results=1)
    return runs[0].info.run_id if runs else None


def start_pipeline_run(tracking_uri: str, experiment: str, kfp_run_id: str, run_name: str,
                       params: dict[str, Any], tags: dict[str, str]) -> str:
    """The parent run of one pipeline run (found again, not duplicated, on a retry)."""
    from mlflow.entities import Param, RunTag

    existing = find_pipeline_run(tracking_uri, experiment, kfp_run_id)
    if existing:
        return existing
    client = _client(tracking_uri)
    exp_id = ensure_experiment(experiment, tracking_uri)
    tags = {k: redact(v) for k, v in {KFP_RUN_TAG: kfp_run_id, "rlhf.stage": "pipeline", **tags}.items()}
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    flat = [Param(k, redact("" if v is None else v)[:6000]) for k, v in flatten(params).items()]
    for i in range(0, len(flat), 90):
        client.log_batch(run.info.run_id, params=flat[i:i + 90], tags=[RunTag("rlhf.params", "config")] if i == 0 else [])
    return run.info.run_id


def finish_pipeline_run(tracking_uri: str, experiment: str, kfp_run_id: str, succeeded: bool,
                        error: str = "") -> str | None:
    """End the parent run FINISHED or FAILED, and any stage run a crash left RUNNING as FAILED."""
    parent = find_pipeline_run(tracking_uri, experiment, kfp_run_id)
    if parent is None:
        return None
    client = _client(tracking_uri)
    exp_id = client.get_run(parent).info.experiment_id
    for child in client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1000):
        if child.info.status == "RUNNING":
            client.set_terminated(child.info.run_id, "FAILED")
    if error:
        client.set_tag(parent, "rlhf.error", redact(error)[:5000])
    client.set_terminated(parent, "FINISHED" if succeeded else "FAILED")
    return parent


def log_pipeline_plots(tracking_uri: str, parent: str, summary: dict) -> None:
    """Images on the parent run: PPO reward/gold/KL/beta curves, the SFT loss curve and
    win rates; plus the summary's numbers as the parent's metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.entities import Metric

    client = _client(tracking_uri)
    exp_id = client.get_run(parent).info.experiment_id
    children = {r.data.tags.get("rlhf.stage"): r.info.run_id
                for r in client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=100)}

    def history(stage: str, key: str) -> tuple[list[int], list[float]]:
        if stage not in children:
            return [], []
        h = sorted(client.get_metric_history(children[stage], key), key=lambda m: m.step)
        return [m.step for m in h], [m.value for m in h]

    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    for key, label in (("ppo/reward", "reward model score (rollouts)"),
                       ("ppo/judge_proxy", "reward model score (judge prompts)"),
                       ("ppo/judge_score", f"independent judge: {summary.get('ppo/judge') or '-'}"),
                       ("ppo/gold_score", "gold score (rollouts)")):
        steps, values = history("ppo", key)
        if steps:
            ax[0, 0].plot(steps, values, label=label, marker="o" if key.startswith("ppo/judge") else None)
    if summary.get("ppo/selected_update") is not None:
        ax[0, 0].axvline(summary["ppo/selected_update"], color="grey", linestyle=":", label="selected policy")
    ax[0, 0].set(title="PPO: proxy reward vs independent judge", xlabel="update")
    ax[0, 0].legend(fontsize=8)
    ax[0, 1].plot(*history("ppo", "ppo/kl"), label="KL(policy || SFT)")
    ax[0, 1].plot(*history("ppo", "ppo/beta"), label="beta")
    ax[0, 1].set(title="PPO: KL penalty", xlabel="update")
    ax[0, 1].legend()
    ax[1, 0].plot(*history("sft", "sft/eval_loss"), marker="o")
    ax[1, 0].set(title="SFT held-out loss", xlabel="step")
    wins = {k: summary.get(f"eval/{k}_vs_sft") for k in ("decisive_win_rate", "decisive_win_rate_lower",
                                                           "tie_rate")}
    wins["proxy_decisive_win_rate"] = summary.get("eval/rm_decisive_win_rate_vs_sft")
    if summary.get("champion/decisive_win_rate") is not None:
        wins["decisive_win_rate_vs_champion"] = summary["champion/decisive_win_rate"]
    wins = {k: v for k, v in wins.items() if v is not None}
    ax[1, 1].bar(list(wins), list(wins.values()))
    ax[1, 1].axhline(0.5, color="grey", linestyle="--")
    ax[1, 1].set(title=f"Policy vs SFT (and champion), by {summary.get('eval/judge') or '-'}", ylim=(0, 1))
    ax[1, 1].tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    client.log_figure(parent, fig, "plots/pipeline.png")
    plt.close(fig)
    ts = int(time.time() * 1000)
    metrics = [Metric(k, float(v), ts, 0) for k, v in summary.items() if isinstance(v, (int, float))]
    for i in range(0, len(metrics), 900):
        client.log_batch(parent, metrics=metrics[i:i + 900])
