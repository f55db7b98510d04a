"""Registering trained adapters as versions of an MLflow registered model."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from loraflow.errors import UserError

ADAPTER_ARTIFACT_PATH = "adapter"  # where every train run logs its adapter
ADAPTER_CONFIG = "adapter_config.json"  # what makes a folder a LoRA adapter
# The SHA-256 of every adapter file, recorded at registration (JSON: {relative path: hex digest}):
# what a copy in the LoRA store or the artifact store must still hold before an engine loads it.
ADAPTER_SHA256_TAG = "loraflow.adapter_sha256"


def file_digests(root: Path, items: Iterable[Path] | None = None) -> dict[str, str]:
    """SHA-256 of every file under `items` (default: all of `root`), keyed by path relative to root."""
    files = [f for item in (items if items is not None else [root])
             for f in ([item] if item.is_file() else sorted(item.rglob("*"))) if f.is_file()]
    digests = {}
    for path in files:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digests[path.relative_to(root).as_posix()] = digest.hexdigest()
    return dict(sorted(digests.items()))


def check_digests(version: ModelVersion, folder: Path, where: str) -> None:
    """Refuse an adapter copy whose files differ from what was registered."""
    label = f"{version.name} v{version.version}"
    recorded = version.tags.get(ADAPTER_SHA256_TAG)
    if not recorded:
        raise UserError(f"{label} has no {ADAPTER_SHA256_TAG} tag, so its adapter files cannot be verified "
                        "(it was registered by hand or by an older loraflow): train a new version.")
    expected, found = json.loads(recorded), file_digests(folder)
    differ = sorted(n for n in expected.keys() | found.keys() if expected.get(n) != found.get(n))
    if differ:
        raise UserError(f"{label}'s adapter in {where} differs from the files registered ({', '.join(differ)}): "
                        "it was changed after registration. Restore it, or train a new version.")


def register_adapter(name: str, run_id: str, tags: dict[str, str], description: str,
                     adapter_sha256: dict[str, str]) -> ModelVersion:
    """Create a new version of `name` pointing at the run's logged adapter, whose files had these digests."""
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
        tags={**tags, ADAPTER_SHA256_TAG: json.dumps(adapter_sha256, separators=(",", ":"))},
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
