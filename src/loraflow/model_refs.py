"""Resolving what users name an adapter by: `models:/NAME/VERSION`, `models:/NAME@ALIAS`,
`models:/NAME/STAGE` or a train run id."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from loraflow.envs import PROJECT_ROOT
from loraflow.errors import UserError
from loraflow.registry import ADAPTER_ARTIFACT_PATH

_RUN_ID = re.compile(r"[0-9a-f]{32}")
_STAGES = ("None", "Staging", "Production", "Archived")


@dataclass
class AdapterRef:
    text: str  # what the user wrote
    run_id: str  # the train run that produced the adapter
    artifact_uri: str  # where its files are
    base_model: str
    version: ModelVersion | None  # None when named by run id

    @property
    def label(self) -> str:
        if self.version is None:
            return f"run-{self.run_id[:8]}"
        return f"{self.version.name}-v{self.version.version}"


def resolve(text: str) -> AdapterRef:
    client = MlflowClient()
    try:
        if _RUN_ID.fullmatch(text):
            run = client.get_run(text)
            return AdapterRef(text, text, f"runs:/{text}/{ADAPTER_ARTIFACT_PATH}",
                              _base_model(run.data.tags, text), None)
        version = _model_version(client, text)
    except MlflowException as exc:
        raise UserError(f"Model reference {text!r} does not exist: {exc.message}") from exc
    run = client.get_run(version.run_id)
    return AdapterRef(text, version.run_id, version.source,
                      version.tags.get("base_model") or _base_model(run.data.tags, text), version)


def _model_version(client: MlflowClient, text: str) -> ModelVersion:
    if not text.startswith("models:/"):
        raise UserError(
            f"Model reference {text!r} is not understood: use models:/NAME/VERSION, "
            f"models:/NAME@ALIAS, models:/NAME/STAGE ({', '.join(_STAGES[1:])}) or a run id."
        )
    body = text[len("models:/"):]
    if "@" in body:
        name, alias = body.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, selector = body.rpartition("/")
    if selector.isdigit():
        return client.get_model_version(name, selector)
    if selector in _STAGES:
        versions = client.get_latest_versions(name, stages=[selector])
        if not versions:
            raise UserError(f"Registered model {name!r} has no version in stage {selector}.")
        return versions[0]
    raise UserError(f"Model reference {text!r}: {selector!r} is neither a version number nor a stage.")


def base_model_source(model: str) -> str:
    """A recorded base model as something an engine can load: relative paths are the project's
    (as shipped), hub ids stay as they are; a local model that is missing is an error."""
    if model.startswith(".") and (PROJECT_ROOT / model).exists():
        return str(PROJECT_ROOT / model)
    if model.startswith((".", "/")) and not Path(model).exists():
        raise UserError(f"Base model {model} is not on this machine; run ./setup.sh.")
    return model


def _base_model(tags: dict[str, str], text: str) -> str:
    if "base_model" not in tags:
        raise UserError(f"{text!r} does not name a loraflow train run (its run has no base_model tag).")
    return tags["base_model"]
