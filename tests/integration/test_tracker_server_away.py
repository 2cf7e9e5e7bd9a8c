"""A failing stage does not wait for an MLflow server that is away (issue 14: a preempted
pod has a grace period of seconds, the MLflow client retries for minutes).

Against the session's real server: the stage's run starts, the server is killed, the
stage fails; leaving the run must take seconds, leave this process without an active
run (MLflow's own exit handler would otherwise retry for minutes at interpreter exit)
and say that the run stays RUNNING. The server is started again afterwards.
"""

from __future__ import annotations

import time

import mlflow
import pytest

from rlhf.adapters.tracking import MLflowTracker


def test_a_failing_stage_leaves_its_run_in_seconds_when_the_server_is_away(local_stack, capsys):
    uri = local_stack.env()["MLFLOW_TRACKING_URI"]
    tracker = MLflowTracker("server-away", uri, log_models=False, outage_tolerance_s=60)
    try:
        with pytest.raises(RuntimeError, match="preempted"):
            with tracker.stage_run("sft", {"lr": 1e-3}):
                tracker.log_metrics({"sft/loss": 1.0}, step=1)
                local_stack.stop_service("mlflow", kill=True)
                t0 = time.monotonic()
                raise RuntimeError("preempted")
        left_after = time.monotonic() - t0
    finally:
        local_stack.start_service("mlflow")
    assert left_after < 30, left_after
    assert mlflow.active_run() is None  # nothing left for MLflow's exit handler to end
    assert "the sft run stays RUNNING" in capsys.readouterr().err
    run = mlflow.MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.status == "RUNNING"  # the retry resumes it, or the exit task marks it FAILED
