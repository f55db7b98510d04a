"""Registering trained adapters as versions of an MLflow registered model."""

from __future__ import annotations

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

ADAPTER_ARTIFACT_PATH = "adapter"  # where every train run logs its adapter


def register_adapter(name: str, run_id: str, tags: dict[str, str], description: str) -> ModelVersion:
    """Create a new version of `name` pointing at the run's logged adapter."""
    client = MlflowClient()
    try:
        client.create_registered_model(
            name, description="LoRA adapters trained by loraflow (one version per train run)."
        )
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    return client.create_model_version(
        name,
        source=f"runs:/{run_id}/{ADAPTER_ARTIFACT_PATH}",
        run_id=run_id,
        tags=tags,
        description=description,
    )
