"""Registering trained adapters as versions of an MLflow registered model."""

from __future__ import annotations

import json
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
    _check_adapter_files(local, label)
    return local


def _check_adapter_files(folder: Path, label: str) -> None:
    """A damaged adapter is refused here, with its name, rather than deep inside a vLLM engine."""
    fix = "restore the artifacts or train a new version"
    try:
        json.loads((folder / ADAPTER_CONFIG).read_text())
    except ValueError as exc:
        raise UserError(f"{label}: {ADAPTER_CONFIG} is not valid JSON ({exc}); {fix}.") from None
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            return
        raise UserError(f"{label} has no adapter_model.safetensors (no LoRA weights); {fix}.")
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="numpy") as tensors:
            list(tensors.keys())
    except Exception as exc:  # noqa: BLE001 - the library raises several kinds for a damaged file
        raise UserError(f"{label}: adapter_model.safetensors is damaged ({exc}); {fix}.") from None


def check_adapter_present(version: ModelVersion) -> None:
    """Refuse a version whose adapter artifacts are gone (deleted run or artifact store
    cleanup): it could be promoted, but never evaluated or served."""
    label = f"{version.name} v{version.version}"
    try:
        names = {Path(item.path).name for item in mlflow.artifacts.list_artifacts(artifact_uri=version.source)}
    except Exception as exc:  # noqa: BLE001 - every failure to list means the same to the user
        names, why = set(), f": {str(exc).splitlines()[0][:200]}"
    else:
        why = ""
    if ADAPTER_CONFIG not in names:
        raise UserError(f"{label}'s adapter artifacts are missing from {version.source}{why}. It cannot be "
                        "promoted, because it could not be served: restore the artifacts, or train a new version.")
