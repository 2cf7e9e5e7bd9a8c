"""The metric outbox: steps never wait for the tracking server; metrics wait in order,
spooled, through an outage and are delivered when it ends (issue 14, item 2). The
server here is a function that fails while `down` is set; the real server is killed for
10 minutes in tests/faults/test_mlflow_outage.py."""

from __future__ import annotations

import threading
import time

import pytest

from rlhf.adapters import outbox as ob
from rlhf.adapters.outbox import Outbox, TrackingOutage, tolerant


class Server:
    def __init__(self):
        self.down = threading.Event()
        self.got: list = []
        self.calls = 0
        self.reject: set = set()

    def send(self, batch):
        self.calls += 1
        if self.down.is_set():
            raise ConnectionError("refused")
        if any(m in self.reject for m in batch):
            raise ValueError("bad metric")
        self.got += batch


@pytest.fixture
def server(monkeypatch):
    s = Server()
    monkeypatch.setattr(ob, "answers", lambda uri, timeout_s=5.0: not s.down.is_set())
    return s


def test_metrics_wait_in_order_through_an_outage_and_are_spooled(server):
    spooled: list[list] = []

    def spool(pending):  # a slow store: drain() must wait for the spool's removal, writes must stay in order
        time.sleep(0.05)
        spooled.append(list(pending))

    box = Outbox(server.send, spool, "http://mlflow:5000", 60, retry_s=0.02)
    box.put([0, 1])
    assert box.drain(5) and server.got == [0, 1]
    server.down.set()
    t = time.monotonic()
    for step in range(2, 12):
        box.put([step])  # never blocks while the server is away
    assert time.monotonic() - t < 1.0
    deadline = time.monotonic() + 5
    while box.outage is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert box.outage is not None
    box.put([12])
    assert spooled and spooled[-1] == list(range(2, 13))  # the store holds every undelivered metric, in order
    assert not box.drain(0.2)
    server.down.clear()
    assert box.drain(5)
    assert server.got == list(range(13)) and box.outage is None
    assert spooled[-1] == []  # delivered: the spool is removed
    box.close()


def test_an_outage_longer_than_the_tolerance_fails_clearly(server):
    box = Outbox(server.send, lambda pending: None, "http://user:pw@mlflow:5000", 0.2, retry_s=0.02)
    server.down.set()
    box.put([1])
    time.sleep(0.5)
    with pytest.raises(TrackingOutage) as e:
        box.put([2])
    message = str(e.value)
    assert "tracking.outage_tolerance_s=0.2" in message and "2 metrics are undelivered" in message
    assert "pw" not in message  # the URI is shown without its password
    box.close()


def test_a_batch_the_answering_server_refuses_twice_is_dropped_and_later_ones_arrive(server, capsys):
    server.reject = {"bad"}
    box = Outbox(server.send, lambda pending: None, "http://mlflow:5000", 60, retry_s=0.02)
    box.put(["bad"])
    box.put(["good"])
    assert box.drain(10)
    assert server.got == ["good"] and server.calls >= 3  # retried once before dropping
    box.close()
    assert "MLflow refused 1 metric(s) (ValueError: bad metric); dropped" in capsys.readouterr().err


def test_tolerant_retries_while_the_server_is_away_and_raises_real_errors_at_once(server, monkeypatch):
    monkeypatch.setattr(ob, "RETRY_SECONDS", 0.0)
    server.down.set()
    calls = []

    def call():
        calls.append(1)
        if len(calls) == 3:
            server.down.clear()
        if server.down.is_set():
            raise ConnectionError("refused")
        return "ok"

    assert tolerant(call, "http://mlflow:5000", 60, "starting the sft run", sleep=lambda s: None) == "ok"
    assert len(calls) == 3

    def rejected():
        raise ValueError("RESOURCE_DOES_NOT_EXIST")

    with pytest.raises(ValueError):  # the server answered: not an outage, no waiting
        tolerant(rejected, "http://mlflow:5000", 60, "x", sleep=lambda s: pytest.fail("slept"))
    server.down.set()
    with pytest.raises(TrackingOutage, match="gave up on: logging the sft model"):
        tolerant(rejected, "http://mlflow:5000", 0.0, "logging the sft model", sleep=lambda s: time.sleep(0.01))
