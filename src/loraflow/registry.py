"""The registry contract: one home for what loraflow writes into the MLflow registry and onto its
runs, and for reading it back; writers and readers import it from here.

- The tag names: one namespace, `loraflow.` (docs/architecture.md "Registry contract" lists each,
  and a test checks that the table and this module agree).
- The stages, and the aliases kept in step with them (promote moves both).
- The adapter id of a version, `<registered model>-v<version>`: its folder in a LoRA store and its
  model id when served.
- Finding the version a user means: a number, an alias, a stage, a `models:/` reference or a train
  run id; a miss is a UserError that says what exists and what to run.
- Registering an adapter, the SHA-256 of its files, and the checks of a copy before an engine loads it.
- The base-model check: was the adapter trained on the base model an engine runs here?
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode

from loraflow.errors import UserError

# -- tags ---------------------------------------------------------------------------------------
# On runs
JOB_TAG = "loraflow.job"  # train, evaluate, promote, rollback, serve, pipeline, export_traces
REGISTERED_MODEL_TAG = "loraflow.registered_model"  # train run: the registered model its version joins
REGISTERED_VERSION_TAG = "loraflow.registered_version"  # train run: NAME/N, once registered
LLAMAFACTORY_VERSION_TAG = "loraflow.llamafactory_version"  # train run
GIT_COMMIT_TAG = "loraflow.git_commit"  # train run: the project's commit
DRIVER_TAG = "loraflow.driver"  # train run: processes.identity() of the process that trains
RESUMED_FROM_TAG = "loraflow.resumed_from"  # train run: the run it continues
RESUMED_BY_TAG = "loraflow.resumed_by"  # train run: the run that continues it
RAY_RUN_TAG = "loraflow.ray_run"  # train run: the Ray Train run (checkpoints) it and its continuations share
RESUMED_FROM_STEP_TAG = "loraflow.resumed_from_step"  # train run: the checkpoint a restarted worker continued
MODEL_REF_TAG = "loraflow.model_ref"  # evaluate run: the reference it was given
TRAIN_RUN_TAG = "loraflow.train_run"  # evaluate run: the train run of the adapter it scored
EXPORTED_MODEL_TAG = "loraflow.export.registered_model"  # export_traces run: whose served traces it wrote
EXPORTED_VERSIONS_TAG = "loraflow.export.versions"  # export_traces run: JSON list of the versions that answered them
EXPORTED_SHA256_TAG = "loraflow.export.sha256"  # export_traces run: the written data file's SHA-256 (a train run's dataset digest)
# On train runs and versions
BASE_MODEL_TAG = "loraflow.base_model"  # base_models.portable_base_model: where the base model is
BASE_MODEL_ID_TAG = "loraflow.base_model_id"  # base_models.base_model_identity: what it is, on any machine
DATA_DIGEST_TAG = "loraflow.data_digest"  # SHA-256 over the training data files
# On versions
ADAPTER_SHA256_TAG = "loraflow.adapter_sha256"  # JSON {relative path: SHA-256} of the adapter files
LORA_RANK_TAG = "loraflow.lora_rank"
TEMPLATE_TAG = "loraflow.template"  # LLaMA-Factory's chat template name
TRAIN_LOSS_TAG = "loraflow.train_loss"
TASK_TAG = "loraflow.task"  # on a train run, its version and an evaluate run: the task's name (tasks.py)
PROMPT_TAG = "loraflow.prompt"  # the same: prompts:/<task>-instruction/<n>, the instruction it was trained with
EVAL_TAG_PREFIX = "loraflow.eval."  # + a metric the task records (tasks.Task.recorded): the latest evaluation's figure
EVAL_RUN_TAG = "loraflow.eval.run_id"  # the evaluate run those figures come from
PROMOTION_TAG_PREFIX = "loraflow.promotion."  # + stage, by, at, reason, gate, metrics, previous_production, live
CANARY_TAG_PREFIX = "loraflow.canary."  # + result (promoted, rolled back, stopped), reason, live, at: a rollout's end
DELIVERY_TAG_PREFIX = "loraflow.delivery."  # + state, record (JSON), claim (JSON): a version's delivery (delivery.py)
# On registered models
PRODUCTION_HISTORY_TAG = "loraflow.production_history"  # JSON list of the versions promoted to Production
ROLLOUT_TAG = "loraflow.rollout"  # JSON: the canary rollout under way (canary.py), absent when none
PENDING_TAG = "loraflow.pending"  # JSON: a change of several writes begun and not yet complete (registry_changes.py)
LOCK_OWNER_TAG = "loraflow.lock.owner"  # on `<name>.lock`: the holder's token
LOCK_HEARTBEAT_TAG = "loraflow.lock.heartbeat"  # on `<name>.lock`: the holder's last sign of life
# On traces of served requests (traces.py)
TRACE_MODEL_TAG = "loraflow.trace.registered_model"  # the registered model of the version that answered
TRACE_VERSION_TAG = "loraflow.trace.version"  # the version that answered
TRACE_ADAPTER_TAG = "loraflow.trace.adapter"  # its adapter id
TRACE_ROUTE_TAG = "loraflow.trace.route"  # how the request reached it: production (stable name), canary, id
TRACE_VALID_TAG = "loraflow.trace.valid"  # whether the task's grammar accepts the answer: true, false, error


# -- stages, aliases, adapter ids --------------------------------------------------------------
STAGES = ("Staging", "Production", "Archived")  # where promote moves versions (a new one is in "None")
STAGE_ALIASES = {"Staging": "staging", "Production": "production"}
CANARY_ALIAS = "canary"  # the candidate of a rollout; it keeps its stage until it is promoted
ADAPTER_ARTIFACT_PATH = "adapter"  # where every train run logs its adapter
ADAPTER_CONFIG = "adapter_config.json"  # what makes a folder a LoRA adapter
_RUN_ID = re.compile(r"[0-9a-f]{32}")


def stage_named(text: str) -> str:
    for stage in STAGES:
        if text.strip().lower() == stage.lower():
            return stage
    raise UserError(f"Unknown stage {text!r}: use one of {', '.join(STAGES)}.")


def adapter_id(version: ModelVersion) -> str:
    """The name a version's adapter is served and stored under (a request's `model`, a store folder)."""
    return f"{version.name}-v{version.version}"


_ADAPTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def is_valid_adapter_id(text: str) -> bool:
    """A folder name, nothing more: no slashes, no `..`, no scheme."""
    return bool(_ADAPTER_ID.fullmatch(text)) and ".." not in text


def parse_adapter_id(adapter: str) -> tuple[str, str]:
    """The registered model and version number of an adapter id (`<registered model>-v<version>`)."""
    name, _, number = adapter.rpartition("-v")
    return name, number


def eval_metrics(version: ModelVersion) -> dict[str, float]:
    """The figures of a version's latest evaluation, by metric name; none unless its run tag, written
    last (evaluate.record_evaluation), says that they are complete."""
    if EVAL_RUN_TAG not in version.tags:
        return {}
    from loraflow import tasks  # which imports this module's tag names

    recorded = tasks.recordable_metrics()
    return {key[len(EVAL_TAG_PREFIX):]: float(value) for key, value in version.tags.items()
            if key.startswith(EVAL_TAG_PREFIX) and key[len(EVAL_TAG_PREFIX):] in recorded}


# -- finding the version meant ------------------------------------------------------------------
def rollout(client: MlflowClient, name: str) -> dict | None:
    """The canary rollout under way on `name`: {version, weight, started_at, policy, gates}, or None."""
    text = registered_model(client, name).tags.get(ROLLOUT_TAG)
    return json.loads(text) if text else None


def _store_shown() -> str:
    from loraflow.tracking import display_uri  # tracking imports this module

    return display_uri(mlflow.get_tracking_uri())


def _not_found(exc: MlflowException, *codes: int) -> bool:
    """Whether the store said the thing asked for does not exist, as opposed to failing to answer (a
    locked database, a timeout): only the first may be reported as "there is none" (a server would
    withdraw a model it still serves)."""
    return exc.error_code in {ErrorCode.Name(code) for code in (RESOURCE_DOES_NOT_EXIST, *codes)}


def registered_model(client: MlflowClient, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if not _not_found(exc):
            raise
        names = sorted(m.name for m in client.search_registered_models() if not m.name.endswith(".lock"))
        raise UserError(
            f"There is no registered model {name!r} in {_store_shown()}; registered models: "
            f"{', '.join(names) or 'none'}. Train one with `mlflow run . -e train`."
        ) from None


def find_version(name: str, number: str | None = None, alias: str | None = None, stage: str | None = None,
                 client: MlflowClient | None = None) -> ModelVersion:
    """The version of `name` with that number; without one, the one with that alias, else the latest in that stage."""
    client = client or MlflowClient()
    registered_model(client, name)
    if number is not None:
        if not str(number).strip().isdigit():
            raise UserError(f"Version must be a number, not {number!r}.")
        try:
            return client.get_model_version(name, str(int(number)))
        except MlflowException as exc:
            if not _not_found(exc):
                raise
            versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
            raise UserError(f"{name} has no version {number}; it has versions "
                            f"{', '.join(map(str, versions)) or 'none'}.") from None
    if alias is not None:
        try:
            return client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            if not _not_found(exc, INVALID_PARAMETER_VALUE):  # how the store says "no such alias"
                raise
            stage = next((s for s, a in STAGE_ALIASES.items() if a == alias), "Production")
            raise UserError(f"{name} has no version with the alias {alias!r} yet: promote one first, e.g. "
                            f"`mlflow run . -e promote -P name={name} -P version=N -P stage={stage}`.") from None
    versions = [v for v in client.search_model_versions(f"name='{name}'") if v.current_stage == stage]
    if not versions:
        raise UserError(f"{name} has no version in stage {stage} yet: promote one first, e.g. "
                        f"`mlflow run . -e promote -P name={name} -P version=N -P stage={stage}`.")
    return max(versions, key=lambda v: int(v.version))


@dataclass
class AdapterRef:
    """What a user named an adapter by, resolved."""

    text: str  # what the user wrote
    run_id: str  # the train run that produced the adapter
    artifact_uri: str  # where its files are
    base_model: str  # BASE_MODEL_TAG
    base_model_id: str | None  # BASE_MODEL_ID_TAG; None for a run of an older loraflow
    version: ModelVersion | None  # None when named by run id
    tags: dict[str, str]  # the train run's, and the version's over them

    @property
    def label(self) -> str:
        return f"run-{self.run_id[:8]}" if self.version is None else adapter_id(self.version)


def resolve(text: str) -> AdapterRef:
    """`models:/NAME/VERSION`, `models:/NAME@ALIAS`, `models:/NAME/STAGE` or a train run id."""
    client = MlflowClient()
    if _RUN_ID.fullmatch(text):
        try:
            run = client.get_run(text)
        except MlflowException as exc:
            if not _not_found(exc):
                raise
            raise UserError(f"Model reference {text!r}: there is no run with that id in "
                            f"{_store_shown()}.") from None
        return AdapterRef(text, text, f"runs:/{text}/{ADAPTER_ARTIFACT_PATH}", base_model(run.data.tags, text),
                          run.data.tags.get(BASE_MODEL_ID_TAG), None, run.data.tags)
    version = find_version(*_parse_models_uri(text), client=client)
    tags = {**client.get_run(version.run_id).data.tags, **version.tags}
    return AdapterRef(text, version.run_id, version.source, base_model(tags, text), tags.get(BASE_MODEL_ID_TAG),
                      version, tags)


def _parse_models_uri(text: str) -> tuple[str, str | None, str | None, str | None]:
    """(name, number, alias, stage) of a models:/ URI."""
    if not text.startswith("models:/"):
        raise UserError(f"Model reference {text!r} is not understood: use models:/NAME/VERSION, "
                        f"models:/NAME@ALIAS, models:/NAME/STAGE ({', '.join(STAGES)}) or a run id.")
    body = text[len("models:/"):]
    if "@" in body:
        name, alias = body.split("@", 1)
        return name, None, alias, None
    name, _, selector = body.rpartition("/")
    if selector.isdigit():
        return name, selector, None, None
    if selector in STAGES:
        return name, None, None, selector
    raise UserError(f"Model reference {text!r}: {selector!r} is neither a version number nor a stage.")


def base_model(tags: dict[str, str], what: str) -> str:
    """Where the base model of a train run's adapter (a version's or run's `tags`) is."""
    if not tags.get(BASE_MODEL_TAG):
        raise UserError(f"{what} does not come from a loraflow train run (it has no {BASE_MODEL_TAG} tag).")
    return tags[BASE_MODEL_TAG]


def check_base_model(recorded: str | None, here: str, what: str,
                     fix: str = "give it the base model it was trained on (those files)") -> None:
    """Refuse an adapter unless it was trained on `here` (a base_model_identity), the model an engine runs."""
    if recorded is None:
        raise UserError(f"{what} has no {BASE_MODEL_ID_TAG} tag, so its base model cannot be checked (it was "
                        "registered by hand or by an older loraflow): train a new version.")
    if recorded != here:
        raise UserError(f"{what} was trained on {recorded}, but the base model here is {here}; {fix}.")


# -- registering and checking adapters ----------------------------------------------------------
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
    if (folder / "adapter_model.bin").is_file():  # a pickle: loading it can run any code it carries
        raise UserError(f"{label} holds adapter_model.bin, a pickle, which loraflow does not load (it can run "
                        "code); save the adapter as safetensors (LLaMA-Factory's default, save_safetensors: true).")
    if not weights.is_file():
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
