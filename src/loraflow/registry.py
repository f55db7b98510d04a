"""Registering trained adapters as versions of an MLflow registered model."""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from loraflow.errors import UserError

ADAPTER_ARTIFACT_PATH = "adapter"  # where every train run logs its adapter
ADAPTER_CONFIG = "adapter_config.json"  # what makes a folder a LoRA adapter


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


def download_adapter(artifact_uri: str, dst_path: str, label: str) -> Path:
    """Download an adapter's artifacts and check that they are a LoRA adapter folder."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=dst_path))
    if not (local / ADAPTER_CONFIG).is_file():
        raise UserError(f"{label} ({artifact_uri}) has no {ADAPTER_CONFIG}: it is not a LoRA adapter folder.")
    return local
