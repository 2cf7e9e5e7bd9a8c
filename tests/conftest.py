import os

# Keep tests deterministic and within the 2-core budget.
os.environ.setdefault("RLHF_QUIET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _rlhf_home(tmp_path, monkeypatch):
    """Each test gets its own RLHF_HOME: the embedded MLflow database and registry live
    there, so tests never see each other's runs or models."""
    monkeypatch.setenv("RLHF_HOME", str(tmp_path))
