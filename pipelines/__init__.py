"""Kubeflow Pipelines: the DAG and its compiler (`dag.py`), and `rlhf run`, which runs
that DAG on one machine through kfp.local with warm step processes (`local/`).

    start -> prep -> SFT -> reward -> PPO -> eval -> If(gate) promote / Else register only
    all inside an ExitHandler whose exit task closes the MLflow parent run

Installed as the `rlhf.pipelines` package (see pyproject.toml).
"""

from rlhf.pipelines.dag import build_pipeline, compile_pipeline, rlhf_pipeline

__all__ = ["build_pipeline", "compile_pipeline", "rlhf_pipeline"]
