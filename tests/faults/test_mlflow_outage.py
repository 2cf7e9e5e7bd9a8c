"""Issue 14, acceptance 2: the MLflow server killed for 10 minutes mid-SFT, then restarted.

The scenario (tests/faults/outage_scenario.py: its own stack, the tiny preset with SFT
paced to outlast the outage) starts in the background when the session begins and this
test, run last, reads its report: training went on while the server was away, the run
completed and promoted, and every SFT step's metrics are in the server once, in order.
RLHF_TEST_OUTAGE_S shortens the outage for a quick local try (default 600).

Marked slow for now (`pytest -m slow tests/faults/test_mlflow_outage.py`): the background
start is built so that it can join the default run, but the whole suite with it has not
been timed yet."""

from __future__ import annotations

import json
import time

import pytest


pytestmark = pytest.mark.slow  # not yet in the default run: see the module docstring


@pytest.fixture(scope="module")
def report(outage_scenario) -> dict:
    proc, work = outage_scenario["proc"], outage_scenario["work"]
    deadline = time.monotonic() + 1800
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(2)
    log = (work / "scenario.log").read_text(errors="replace") if (work / "scenario.log").exists() else ""
    assert (work / "report.json").exists(), f"the scenario left no report ({work}):\n{log[-3000:]}"
    out = json.loads((work / "report.json").read_text())
    assert "error" not in out, out["error"]
    return out


def test_training_goes_on_through_a_10_minute_mlflow_outage_and_every_metric_arrives_in_order(report):
    tail = report["run_log_tail"]
    assert report["returncode"] == 0, tail
    down_s = report["restarted_at"] - report["killed_at"]
    assert down_s >= report["outage_s"]

    # steps kept advancing while the server was away: no stall waiting for it
    during = [t for stage, _, t in report["steps"] if stage == "sft" and report["killed_at"] < t < report["restarted_at"]]
    assert len(during) >= 0.6 * report["outage_s"] / report["pace_s"], (len(during), down_s)
    gaps = [b - a for a, b in zip(during, during[1:])]
    assert max(gaps) < report["pace_s"] + 30, max(gaps)

    # the run completed and promoted
    summary = report["summary"]
    assert summary is not None and summary["promoted"] is True, tail
    assert report["sft_runs"] == 1 and report["sft_status"] == "FINISHED"

    # every step's metrics in the server, once each, in order (those logged in the outage too)
    steps = [s for s, _, _ in report["sft_loss_history"]]
    assert steps == list(range(1, report["sft_result"]["steps"] + 1))
    logged_in_outage = {n for stage, n, t in report["steps"]
                        if stage == "sft" and report["killed_at"] < t < report["restarted_at"]}
    assert logged_in_outage <= set(steps)
    times = [ts for _, ts, _ in report["sft_loss_history"]]
    assert times == sorted(times)  # each metric kept the time it was logged at
    if report["outage_s"] >= 300:  # longer than the MLflow client's own retries: the outbox held them
        said = "\n".join(report["tracking_messages"])
        assert "does not answer; training goes on" in said and "is back after" in said, said
