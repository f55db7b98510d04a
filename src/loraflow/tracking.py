"""MLflow plumbing shared by the entry points: where runs go, and what a run is tagged with."""

from __future__ import annotations

import os
import subprocess
from typing import Any
from urllib.parse import urlsplit

from loraflow.envs import PROJECT_ROOT
from loraflow.errors import UserError


def default_tracking_uri() -> str:
    # What MLflow itself defaults to when run from the project root, made independent of the cwd.
    return f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def configure() -> str:
    """Use $MLFLOW_TRACKING_URI when set, else the project's SQLite store; export it so that
    Ray workers and child processes log to the same place."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if urlsplit(uri).password:
        # The URI travels to Ray workers and into messages; a password in it would leak there.
        raise UserError("MLFLOW_TRACKING_URI contains a password. Leave it out of the URI and give it "
                        "through the environment instead: MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) "
                        "for a tracking server, PGPASSWORD or ~/.pgpass for PostgreSQL.")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    return uri


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
