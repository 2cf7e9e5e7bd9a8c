"""Issue 14, acceptances 2 and 4: the MLflow server killed for 10 minutes mid-SFT, then
restarted; later in the same run, SeaweedFS (the S3 server) killed mid-PPO and restarted.

    python tests/faults/outage_scenario.py WORKDIR [OUTAGE_S]

Starts its own local stack (SeaweedFS + MLflow server on free ports, in WORKDIR/stack,
so no other test's server is touched), runs `rlhf run --stack`-style (the stack's
environment, artifacts in its S3) the tiny preset with SFT stretched to a few hundred
steps, paced by RLHF_FAULT_PACE_DIR (each step sleeps while WORKDIR/pace/slow exists,
logging "stage step time"). At SFT step 3 the MLflow server is killed with SIGKILL; it
is started again on the same port and database OUTAGE_S seconds later (default 600),
and the pace drops to S3_PACE_S. At PPO update 1 SeaweedFS is killed (SIGKILL, as a
crashed pod) and started again S3_DOWN_S later on its port and data; then the pacing
ends. The report (WORKDIR/report.json) holds the run's exit code and output tail, the
kill and restart times, every paced step, what the MLflow server holds afterwards (the
sft run's `sft/loss` history, the champion's files) and the verification of every
committed artifact of the run and its dataset.

Run by tests/faults/test_service_outages.py: the suite starts it in the background at
the beginning of the session (tests/conftest.py), because it spends ten minutes
waiting, and the tests read the report at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

PACE_S = 3.0
"""Seconds per SFT step while the outage lasts (about 200 steps in 10 minutes)."""
KILL_AT_STEP = 3
S3_PACE_S = 0.5
"""Seconds per step after the MLflow outage, until SeaweedFS is back."""
S3_DOWN_S = 10.0
SETS = ["num_threads=1", "gate.min_decisive_win_rate=0.0", "tracking.registered_model=outage",
        "tracking.experiment=outage", "sft.max_epochs=20", "sft.patience=1000", "sft.checkpoint_every=20",
        "sft.eval_every=20", "ppo.updates=6"]


def _steps(pace: Path) -> list[tuple[str, int, float]]:
    log = pace / "steps.log"
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.append((parts[0], int(parts[1]), float(parts[2])))
    return out


def _wait_for(pace: Path, run, stage: str, step: int, timeout_s: float) -> None:
    """Until the paced `stage` has logged `step` (or the run ended: an error)."""
    deadline = time.monotonic() + timeout_s
    while not any(s == stage and n >= step for s, n, _ in _steps(pace)):
        if run.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{stage} never reached step {step} (run exit {run.poll()})")
        time.sleep(0.2)


def _outage(stack, service: str, seconds: float, report: dict, key: str) -> None:
    """SIGKILL one service of the stack, and start it again on its port and data later."""
    stack.stop_service(service, kill=True)
    report[f"{key}killed_at"] = time.time()
    time.sleep(seconds)
    stack.start_service(service)
    report[f"{key}restarted_at"] = time.time()


def _verify_all(root, into: Path) -> dict[str, str]:
    """Every committed artifact under `root` (the run and its dataset): "ok" when it
    downloads and every file matches its manifest, else the error."""
    out = {}
    committed = sorted({k.rsplit("/", 1)[0] for k, _, _ in root.walk("") if k.endswith("/_COMMITTED")})
    for i, prefix in enumerate(committed):
        try:
            root.get_dir(prefix, into / str(i))
            out[prefix] = "ok"
        except Exception as e:  # noqa: BLE001 - reported, the test shows it
            out[prefix] = f"{type(e).__name__}: {e}"
    return out


def _champion_files(uri: str, into: Path) -> list[str]:
    """The files of `models:/outage-policy@champion`, downloaded through the MLflow server."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts("models:/outage-policy@champion", dst_path=str(into)))
    return sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())


def scenario(work: Path, outage_s: float) -> dict:
    import mlflow

    from rlhf.ops.stack import Stack

    report: dict = {"outage_s": outage_s, "pace_s": PACE_S}
    stack = Stack(work / "stack", ports="free", startup_timeout=180,
                  admin_password=os.environ["RLHF_STACK_ADMIN_PASSWORD"])
    stack.up()
    try:
        pace = work / "pace"
        pace.mkdir(parents=True, exist_ok=True)
        (pace / "slow").write_text(str(PACE_S))
        env = {**os.environ, **stack.env(), "RLHF_HOME": str(work / "home"), "RLHF_QUIET": "1",
               "RLHF_RETRY_BACKOFF": "1s", "RLHF_FAULT_PACE_DIR": str(pace)}
        output = "s3://rlhf/runs/outage"
        cmd = [sys.executable, "-m", "rlhf.cli", "run", "--preset", "tiny", *[x for s in SETS for x in ("--set", s)],
               "--output", output]
        with open(work / "run.log", "w") as log:
            run = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            report["started_at"] = time.time()
            _wait_for(pace, run, "sft", KILL_AT_STEP, timeout_s=900)
            _outage(stack, "mlflow", outage_s, report, "")
            (pace / "slow").write_text(str(S3_PACE_S))
            _wait_for(pace, run, "ppo", 1, timeout_s=1800)
            _outage(stack, "s3", S3_DOWN_S, report, "s3_")
            (pace / "slow").unlink()
            report["returncode"] = run.wait(timeout=1800)
        from rlhf.adapters.store import S3Store

        store = S3Store(output, stack.settings())
        # the command's output, then every step's log (`rlhf run` keeps those in the run folder)
        text = (work / "run.log").read_text(errors="replace")
        if store.exists("pipeline.log"):
            text += store.read_bytes("pipeline.log").decode(errors="replace")
        report["run_log_tail"] = text[-6000:]
        report["tracking_messages"] = [line.strip() for line in text.splitlines() if "tracking: " in line][:50]
        report["store_messages"] = [line.strip() for line in text.splitlines() if "store: S3 at" in line][:50]
        report["steps"] = _steps(pace)
        uri = stack.env()["MLFLOW_TRACKING_URI"]
        client = mlflow.MlflowClient(uri)
        exp = client.get_experiment_by_name("outage")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        sft = [r for r in runs if r.data.tags.get("rlhf.stage") == "sft"]
        report["sft_runs"] = len(sft)
        if sft:
            history = client.get_metric_history(sft[0].info.run_id, "sft/loss")
            report["sft_loss_history"] = [[m.step, m.timestamp, m.value] for m in history]
            report["sft_status"] = sft[0].info.status
        report["summary"] = store.read_json("summary.json") if store.exists("summary.json") else None
        report["sft_result"] = store.read_json("sft/result.json") if store.exists("sft/result.json") else None
        report["artifacts"] = _verify_all(S3Store("s3://rlhf/runs", stack.settings()), work / "verify")
        report["champion_files"] = _champion_files(uri, work / "champion")
    finally:
        if "run" in locals() and run.poll() is None:  # interrupted: leave no pipeline running
            os.killpg(run.pid, signal.SIGTERM)
            run.wait(timeout=60)
        stack.down()
    return report


def main() -> int:
    work = Path(sys.argv[1])
    outage_s = float(sys.argv[2]) if len(sys.argv) > 2 else 600.0
    work.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped by the suite: clean up (finally)
    try:
        report = scenario(work, outage_s)
    except Exception:  # noqa: BLE001 - the test shows it
        report = {"error": traceback.format_exc()}
    tmp = work / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.rename(work / "report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
