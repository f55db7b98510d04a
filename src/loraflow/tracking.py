"""MLflow plumbing shared by the entry points: where runs go, and what a run is tagged with."""

from __future__ import annotations

import os
import re
import subprocess
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from loraflow import compat
from loraflow.envs import PROJECT_ROOT
from loraflow.errors import UserError
from loraflow.registry import JOB_TAG

# Names of settings that hold credentials (hub_token, swanlab_api_key, HF_TOKEN, AWS_SECRET_ACCESS_KEY,
# PGPASSWORD, DB_PASS, DATABASE_URL, x-api-key, X-Amz-Signature, a URI's ?token=...): their values must never
# reach MLflow or a message. token, pass and the like only as a whole word (separated by _ . - or the
# name's ends), so that add_tokens, max_new_tokens, TOKENIZERS_PARALLELISM or passes are not taken for one,
# and not a tokenizer's special token (ignore_pad_token_for_loss, eos_token).
_SECRET_NAME = re.compile(
    r"password|passwd|passphrase|secret|credential|signature|(api|access|private)[_-]?key|(database|db)[_-]?ur[il]"
    r"|(^|[_.-])(?<!(?:pad|eos|bos|unk|sep|cls)_)(token|pass|auth|authorization|sig|dsn|cookie)([_.-]|$)",
    re.IGNORECASE)
_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]*://)[^/?#]*@", re.IGNORECASE)


def looks_secret(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def uri_credential(value: str) -> str | None:
    """What in a URI carries a credential, or None: a password in its user info, a user name
    before a web host (https://TOKEN@host; a database's user name is no secret), or a query
    parameter named like a credential (?api-key=...)."""
    try:
        parts = urlsplit(value)
        if parts.password:
            return "a password in its user info"
        if parts.username and parts.scheme in ("http", "https"):
            return "a user name in it (https://NAME@host), which web servers take as a token"
    except ValueError:  # not a URI (an unbalanced "[", a bad port)
        return None
    names = sorted({key for key, _ in parse_qsl(parts.query) if looks_secret(key)})
    return f"the query parameter {', '.join(names)}" if names else None


def credentials_in(values: dict[str, Any]) -> dict[str, str]:
    """The keys of a config (nested ones dotted, e.g. engine_env.HF_TOKEN) that hold a credential,
    each with why ("its name says so", or what its value's URI carries): what must reach neither
    MLflow nor Ray. Messages name the key, never the value."""
    found = {}
    for key, value in flatten(values).items():
        why = "its name says so" if looks_secret(key) else uri_credential(value)
        if why:
            found[key] = why
    return found


def display_uri(uri: str) -> str:
    """A URI as messages show it: without its user info and query, where credentials travel."""
    return _USERINFO.sub(r"\1", re.split(r"[?#]", uri, maxsplit=1)[0])


def default_tracking_uri() -> str:
    # What MLflow itself defaults to when run from the project root, made independent of the cwd.
    return f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def configure() -> str:
    """Use $MLFLOW_TRACKING_URI when set, else the project's SQLite store; export it so that
    Ray workers and child processes log to the same place."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    credential = uri_credential(uri)
    if credential:
        # The URI travels to Ray workers and into messages; a credential in it would leak there.
        raise UserError(f"MLFLOW_TRACKING_URI carries a credential ({credential}). Leave it out of the URI and "
                        "give it through the environment instead: MLFLOW_TRACKING_TOKEN (or "
                        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD) for a tracking server, "
                        "PGPASSWORD or ~/.pgpass for PostgreSQL.")
    _check_reachable(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    return uri


def use_model_experiment(model_name: str | None = None, train_run: str | None = None) -> None:
    """Where a job's runs go when nothing chose: the registered model's own experiment, named after
    it (an evaluation or a continuation: its train run's), so that each model's runs are compared
    among themselves, not among every model's in "Default". `mlflow run` has made the job's run
    already (MLFLOW_RUN_ID) in the experiment of its `--experiment-name`, and MLFLOW_EXPERIMENT_NAME /
    _ID are a choice too. Set as MLFLOW_EXPERIMENT_ID, which MLflow reads and subprocesses inherit."""
    if experiment_chosen():
        return
    from mlflow import MlflowClient

    if train_run:
        os.environ["MLFLOW_EXPERIMENT_ID"] = MlflowClient().get_run(train_run).info.experiment_id
    else:
        os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_named(model_name)


def experiment_chosen() -> bool:
    """Whether `mlflow run` (its run) or the environment chose where a job's runs go."""
    return any(os.environ.get(key) for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"))


def experiment_named(name: str) -> str:
    """The id of the experiment called `name`, made if there is none yet."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # another job made it first
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        raise UserError(f"The MLflow experiment {name!r}, where these runs go, is deleted: restore it (mlflow "
                        f"experiments restore --experiment-id {found.experiment_id}) or choose another with "
                        "MLFLOW_EXPERIMENT_NAME.")
    return found.experiment_id


def name_launch_run(name: str, job: str) -> str | None:
    """`mlflow run` makes a run for every entry point it starts (MLFLOW_RUN_ID). The jobs that log
    little or nothing into it (promote, rollback, serve) name it after what they did, so that the
    runs table reads `promote-viggo-smollm2-lora-v2-Production` rather than a random name; started
    without `mlflow run`, they make no run. Returns the run's id, if there is one."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        from mlflow import MlflowClient

        client = MlflowClient()
        client.set_tag(run_id, "mlflow.runName", name)
        client.set_tag(run_id, JOB_TAG, job)
    return run_id


def erase_launch_param(key: str) -> str | None:
    """Delete the parameter `key` of this job's `mlflow run` run (MLFLOW_RUN_ID), which `mlflow run`
    logged before the job started: for a credential the job refuses. MLflow has no API that changes
    or deletes a parameter, so it is deleted in the store's database (in SQLite its bytes are
    overwritten too). A tracking server's database is out of reach: returns what the user must do."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return None
    import mlflow

    if compat.delete_run_param(run_id, key):
        return None
    return (f"`mlflow run` has logged it as the parameter {key} of run {run_id} in "
            f"{display_uri(mlflow.get_tracking_uri())}, where MLflow cannot delete a parameter: delete that run "
            f"(mlflow runs delete --run-id {run_id}), have the store purged (mlflow gc on the server) and "
            "replace the credential.")


def _check_reachable(uri: str) -> None:
    """A tracking server that does not answer is named at once, rather than after MLflow's
    minutes of retries and a traceback."""
    if urlsplit(uri).scheme not in ("http", "https"):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10).close()
    except urllib.error.HTTPError:
        return  # it answered (an auth proxy may refuse /health itself)
    except OSError as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"The tracking server {display_uri(uri)} cannot be reached ({reason}): start it, or point "
                        "MLFLOW_TRACKING_URI at a running one.") from None


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings as dotted keys, e.g. {"ray": {"a": 1}} -> {"ray.a": "1"}."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None
