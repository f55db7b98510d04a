"""Resolving what users name an adapter by: `models:/NAME/VERSION`, `models:/NAME@ALIAS`,
`models:/NAME/STAGE` or a train run id."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from loraflow.envs import PROJECT_ROOT
from loraflow.errors import UserError
from loraflow.registry import ADAPTER_ARTIFACT_PATH, file_digests

_RUN_ID = re.compile(r"[0-9a-f]{32}")
_STAGES = ("None", "Staging", "Production", "Archived")
# What a base model is on any machine (tag of train runs and versions): see base_model_identity.
BASE_MODEL_ID_TAG = "loraflow.base_model_id"
_IDENTITIES = PROJECT_ROOT / ".cache" / "base-model-identities.json"


@dataclass
class AdapterRef:
    text: str  # what the user wrote
    run_id: str  # the train run that produced the adapter
    artifact_uri: str  # where its files are
    base_model: str
    base_model_id: str | None  # base_model_identity at training; None for a run of an older loraflow
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
                              _base_model(run.data.tags, text), run.data.tags.get(BASE_MODEL_ID_TAG), None)
        version = _model_version(client, text)
    except MlflowException as exc:
        raise UserError(f"Model reference {text!r} does not exist: {exc.message}") from exc
    run = client.get_run(version.run_id)
    return AdapterRef(text, version.run_id, version.source,
                      version.tags.get("base_model") or _base_model(run.data.tags, text),
                      version.tags.get(BASE_MODEL_ID_TAG, run.data.tags.get(BASE_MODEL_ID_TAG)), version)


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


def portable_base_model(path: str) -> str:
    """The base model as recorded on a train run: a folder inside the project relative to it
    (`./.cache/models/...`, found again on any machine set up by ./setup.sh), else as given."""
    folder, root = Path(path).resolve(), PROJECT_ROOT.resolve()
    if folder.is_relative_to(root):
        return f"./{folder.relative_to(root).as_posix()}"
    return path


def base_model_identity(model: str) -> str:
    """What a base model is, the same on every machine: a local folder's name plus a digest of its
    config and weight files (`SmolLM2-135M-Instruct@sha256:...`); a hub id as it stands (its files
    are not here to digest). Hashing reads the weights (16 s for a 7B model's 15 GB on the lent
    H200's disk), so each folder's identity is kept in .cache/ and recomputed when a file's size or
    modification time changes."""
    source = base_model_source(model)
    folder = Path(source).resolve()
    if not folder.is_dir():
        return source
    files = [p for p in sorted(folder.iterdir()) if p.name == "config.json" or p.suffix in (".safetensors", ".bin")]
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    try:
        known = json.loads(_IDENTITIES.read_text())
    except (OSError, ValueError):
        known = {}
    if known.get(str(folder), {}).get("files") == stamp:
        return known[str(folder)]["identity"]
    digest = hashlib.sha256(json.dumps(file_digests(folder, files), sort_keys=True).encode()).hexdigest()
    identity = f"{folder.name}@sha256:{digest[:16]}"
    with contextlib.suppress(OSError):  # a read-only project: hashed again next time
        _IDENTITIES.parent.mkdir(parents=True, exist_ok=True)
        _IDENTITIES.write_text(json.dumps({**known, str(folder): {"files": stamp, "identity": identity}}, indent=1))
    return identity


def check_base_model(recorded: str | None, base_model: str, what: str) -> str:
    """The identity of `base_model` as found here, refused unless it is the one `what` was trained on."""
    here = base_model_identity(base_model)
    if recorded is None:
        raise UserError(f"{what} has no {BASE_MODEL_ID_TAG} tag, so its base model cannot be checked (it was "
                        "registered by hand or by an older loraflow): train a new version.")
    if recorded != here:
        raise UserError(f"{what}: the adapter was trained on {recorded}, but the base model {base_model} here is "
                        f"{here}; give it its own base model (the files it was trained on).")
    return here


def _base_model(tags: dict[str, str], text: str) -> str:
    if "base_model" not in tags:
        raise UserError(f"{text!r} does not name a loraflow train run (its run has no base_model tag).")
    return tags["base_model"]
