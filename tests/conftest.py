import os

# Keep tests deterministic and within the 2-core budget.
os.environ.setdefault("RLHF_QUIET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
