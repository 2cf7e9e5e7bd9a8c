"""Tracking that survives an outage of the MLflow server.

A training step never waits for MLflow. `Outbox` holds a stage's metrics in order and a
sender thread delivers them (`log_batch`); while the server is away the batch stays at
the head of the queue and is retried, training goes on, and every flush also writes the
undelivered metrics to the run's store (`<stage>/mlflow_spool.json`), so a stage killed
during the outage replays them when its retry starts. Replays are safe: MLflow keeps one
copy of a metric logged twice with the same key, value, timestamp and step, and every
metric keeps the timestamp it was logged with.

`outage` is when the server stopped answering (None while it answers); past
`tolerance_s` of outage the stage fails with `TrackingOutage`, which says how long it
waited and where the undelivered metrics are. `tolerant` gives other calls (starting
the run, logging a model) the same patience: retried while the server does not answer
`/health`, until the tolerance runs out.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from rlhf.redaction import display_uri

RETRY_SECONDS = 15.0
"""Pause between delivery attempts while the server is away (the MLflow client itself
retries a refused connection for about 4 minutes before an attempt fails)."""


class TrackingOutage(RuntimeError):
    """The tracking server was away for longer than `tracking.outage_tolerance_s`."""


def answers(tracking_uri: str, timeout_s: float = 5.0) -> bool:
    """The server answers GET /health with 200 (an http(s) URI; anything else: True)."""
    import urllib.request

    if not tracking_uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout_s) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001 - refused, reset, timed out, 5xx from a proxy: not answering
        return False


def outage_error(tracking_uri: str, waited_s: float, tolerance_s: float, what: str) -> TrackingOutage:
    return TrackingOutage(
        f"the MLflow tracking server at {display_uri(tracking_uri)} has not answered for {waited_s:.0f} s, longer "
        f"than tracking.outage_tolerance_s={tolerance_s:g}; {what}. Bring the server back and retry the step (it "
        "resumes from its checkpoint and replays the metrics), or raise tracking.outage_tolerance_s")


def tolerant(fn: Callable[[], Any], tracking_uri: str, tolerance_s: float, what: str, sleep=time.sleep) -> Any:
    """`fn()`, retried while the server is away, for up to `tolerance_s` (an error from
    a server that answers is raised at once: it is not an outage)."""
    began = None
    while True:
        try:
            return fn()
        except Exception:
            if answers(tracking_uri):
                raise
            now = time.monotonic()
            began = began or now
            if now - began > tolerance_s:
                raise outage_error(tracking_uri, now - began, tolerance_s, f"gave up on: {what}") from None
            print(f"tracking: the MLflow server at {display_uri(tracking_uri)} does not answer ({what}); retrying for "
                  f"up to {tolerance_s - (now - began):.0f} s more", file=sys.stderr, flush=True)
            sleep(RETRY_SECONDS)


class Outbox:
    """Ordered, non-blocking metric delivery for one MLflow run.

    `send(batch)` delivers a list of `mlflow.entities.Metric` (raises on failure);
    `spool(pending)` saves undelivered metrics to the store (pending may be empty: then
    the spool is removed)."""

    def __init__(self, send: Callable[[list], None], spool: Callable[[list], None], tracking_uri: str,
                 tolerance_s: float, *, retry_s: float = RETRY_SECONDS):
        self._send, self._spool, self.tracking_uri = send, spool, tracking_uri
        self.tolerance_s, self.retry_s = tolerance_s, retry_s
        self._pending: list = []
        self._cond = threading.Condition()
        self._spool_lock = threading.Lock()  # spool writes in order: the last one holds the newest queue
        self._busy, self._spooled, self._refused, self._single, self._closed = False, False, 0, 0, False
        self.outage: float | None = None  # monotonic time of the first failed delivery
        self.delivered = 0
        self._thread = threading.Thread(target=self._run, name="rlhf-tracking-outbox", daemon=True)
        self._thread.start()

    def put(self, metrics: list) -> None:
        """Queue metrics for delivery, after those queued before; check the tolerance."""
        with self._cond:
            self._pending += metrics
            outage = self.outage
            self._cond.notify()
        if outage is not None:
            self._save()  # the server is away: keep them where a crash cannot lose them
            self.check()

    def replay(self, metrics: list) -> None:
        """Queue metrics an earlier attempt saved in the store: they stay there until
        delivered (a crash now loses nothing), then the spool is cleared."""
        self._spooled = True
        self.put(metrics)

    def check(self) -> None:
        with self._cond:
            outage, waiting = self.outage, len(self._pending)
        waited = time.monotonic() - outage if outage is not None else 0.0
        if waited > self.tolerance_s:
            raise outage_error(self.tracking_uri, waited, self.tolerance_s,
                               f"{waiting} metrics are undelivered and saved in the run's store")

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued is delivered (at most `timeout_s`, default: the
        outage tolerance); True when it was."""
        deadline = time.monotonic() + (self.tolerance_s if timeout_s is None else timeout_s)
        with self._cond:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 1.0))
        return True

    def close(self) -> None:
        """Stop the sender (what is still queued stays in the spool)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                # after a refused batch, its metrics go one at a time: only the bad one is dropped
                batch, self._busy = self._pending[:1 if self._single else 1000], True
            began = time.monotonic()
            try:
                self._send(batch)
            except Exception as e:  # noqa: BLE001 - an outage (retried) or a refused batch (reported)
                if not answers(self.tracking_uri):
                    self._failed(began, outage=True)
                    time.sleep(self.retry_s)
                elif len(batch) > 1 or not self._refused:  # once more, one metric at a time
                    self._failed(began, outage=False, single=len(batch) if len(batch) > 1 else self._single)
                    time.sleep(0.0 if len(batch) > 1 else 1.0)
                else:  # refused twice by a server that answers: drop it, say so
                    print(f"tracking: MLflow refused {len(batch)} metric(s) ({type(e).__name__}: {e}); dropped",
                          file=sys.stderr, flush=True)
                    self._delivered(batch, None)
                continue
            self._delivered(batch, self.outage)

    def _save(self) -> None:
        # the queue is read under the spool lock: of two threads saving, the later write has the newer queue
        with self._spool_lock:
            with self._cond:
                pending = list(self._pending)
            self._spooled = True
            self._spool(pending)

    def clear_spool(self) -> None:
        """After everything is delivered: the store's copy is not needed."""
        with self._spool_lock:
            with self._cond:
                empty = not self._pending
            if self._spooled and empty:
                self._spool([])
                self._spooled = False

    def _failed(self, began: float, outage: bool, single: int = 0) -> None:
        with self._cond:
            first = self.outage is None and outage
            if outage:
                self.outage = self.outage or began
            else:
                self._single = single
            self._refused = 0 if outage else self._refused + 1
            self._busy, waiting = False, len(self._pending)
            self._cond.notify_all()
        if not outage:
            return
        if first:
            print(f"tracking: the MLflow server at {display_uri(self.tracking_uri)} does not answer; training goes on, "
                  f"{waiting} metrics wait in order (saved in the run's store) for up to "
                  f"{self.tolerance_s:g} s", file=sys.stderr, flush=True)
        self._save()

    def _delivered(self, batch: list, outage: float | None) -> None:
        with self._cond:
            del self._pending[:len(batch)]
            self.delivered += len(batch)
            self._single = max(0, self._single - len(batch))
            self.outage, self._refused, empty = None, 0, not self._pending
        if outage is not None:
            print(f"tracking: the MLflow server is back after {time.monotonic() - outage:.0f} s; replaying the "
                  "waiting metrics in order", file=sys.stderr, flush=True)
        if empty:
            self.clear_spool()  # still busy: drain() returns once the store's copy is gone
        with self._cond:
            self._busy = False
            self._cond.notify_all()
