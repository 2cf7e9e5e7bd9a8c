"""Adapters to the outside world: the artifact store (local folder or S3), MLflow
tracking, the MLflow Model Registry, and the process settings (the one module that
reads environment variables).

May import: `rlhf.config` and third-party clients (boto3, mlflow). Never the stages,
the training layer or kfp. Stages receive these objects; they never build them.
"""
