"""Operations: how stages are started and where they run. The multi-process worker
entry point, Kubeflow Trainer jobs for several nodes, cluster profiles, the local
stack (SeaweedFS + mlflow server) and the Kubeflow Pipelines client (`rlhf submit`).

May import: the engine (through `rlhf.runs` and `rlhf.stages.table`) and the
adapters. The engine never imports this package.
"""
