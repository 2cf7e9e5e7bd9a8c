import os
import sys
from pathlib import Path

import pytest

# Keep tests deterministic and within the 2-core budget.
os.environ.setdefault("RLHF_QUIET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# Every local stack runs MLflow with basic auth. Stacks started by the tests (in this
# process or by `rlhf stack up` / `rlhf run --stack` in a child) take this admin
# password, so MLflow clients in the tests themselves authenticate through the
# environment, as users' do. tests/pipeline/test_mlflow_auth.py runs without it.
TEST_MLFLOW_PASSWORD = "rlhf-test-admin-password"
os.environ["RLHF_STACK_ADMIN_PASSWORD"] = TEST_MLFLOW_PASSWORD
os.environ["MLFLOW_TRACKING_USERNAME"] = "admin"
os.environ["MLFLOW_TRACKING_PASSWORD"] = TEST_MLFLOW_PASSWORD

# The real local stack (SeaweedFS + mlflow server), started once per session for the
# integration and pipeline tests that need it. The test folders are not packages, so
# the fixture module is imported by location.
sys.path.insert(0, str(Path(__file__).parent))
from stack_fixtures import local_stack, s3_store  # noqa: E402,F401  (fixtures, found by name)


@pytest.fixture(autouse=True)
def _rlhf_home(tmp_path, monkeypatch):
    """Each test gets its own RLHF_HOME: the embedded MLflow database and registry live
    there, so tests never see each other's runs or models."""
    monkeypatch.setenv("RLHF_HOME", str(tmp_path))
    yield
    # mlflow.set_tracking_uri() (a test pointing MLflow at its database, or a tracker in this process) also
    # exports MLFLOW_TRACKING_URI for subprocesses; the next test's runs must not go there
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory) -> dict:
    """Hub-shaped checkpoints built offline (`rlhf.models.stand_in`): a Qwen2 and a
    Llama 3 architecture, each with its chat template, special tokens and stop ids."""
    from rlhf.models.stand_in import build_stand_in

    root = tmp_path_factory.mktemp("stand_ins")
    return {arch: build_stand_in(root / arch, arch) for arch in ("qwen2", "llama")}


# ----------------------------------------------------------------------------- the service outage scenario
# tests/faults/test_service_outages.py kills the MLflow server of its own stack for ten
# minutes mid-SFT, and SeaweedFS later (issue 14, acceptances 2 and 4). It spends those
# minutes waiting, so it starts in the background as the session begins (when that test
# is selected), the other tests run meanwhile, and the test itself runs last and reads
# the scenario's report. Under pytest-xdist every worker collects it: the first one to
# claim the run's folder starts it, and the test (on whichever worker) waits for the
# report there.

OUTAGE_TEST = "test_service_outages.py"
_outage: dict = {}


def _outage_dir(config) -> Path:
    import tempfile
    import uuid

    uid = getattr(config, "workerinput", {}).get("testrunuid")
    if uid is None:  # no xdist: this process is the whole session
        uid = _outage.setdefault("uid", uuid.uuid4().hex)
    return Path(tempfile.gettempdir()) / f"rlhf-outage-{uid}"


@pytest.hookimpl(tryfirst=True)  # before xdist's hook reports this worker's order to the scheduler
def pytest_collection_finish(session):
    selected = [item for item in session.items if item.path.name == OUTAGE_TEST]
    if not selected:
        return
    session.items[:] = [item for item in session.items if item.path.name != OUTAGE_TEST] + selected
    work = _outage_dir(session.config)
    _outage["work"] = work
    try:
        work.mkdir()  # the first process of the session to get here starts the scenario
    except FileExistsError:
        return
    import subprocess

    seconds = os.environ.get("RLHF_TEST_OUTAGE_S", "600")
    log = open(work / "scenario.log", "w")
    _outage.update(log=log, proc=subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "faults" / "outage_scenario.py"), str(work), seconds],
        stdout=log, stderr=subprocess.STDOUT))


def pytest_sessionfinish(session, exitstatus):
    proc = _outage.get("proc")
    if proc is None or proc.poll() is not None:
        return
    if exitstatus != pytest.ExitCode.INTERRUPTED:  # another worker may still wait for its report
        try:
            proc.wait(timeout=1800)
            return
        except Exception:  # noqa: BLE001
            pass
    proc.terminate()  # interrupted: stop it (it stops its stack)
    try:
        proc.wait(timeout=120)
    except Exception:  # noqa: BLE001
        proc.kill()


@pytest.fixture(scope="session")
def outage_scenario() -> dict:
    """The background scenario: {"work": its folder (report.json appears there when it ends)}."""
    if "work" not in _outage:
        pytest.fail("the outage scenario was not started (tests/conftest.py starts it at collection)")
    return _outage
