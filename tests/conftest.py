"""Shared fixtures. The suite runs in the train environment (./setup.sh makes it); jobs are
started the way users start them, as real processes against a real MLflow store and real Ray."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VIGGO = ROOT / "data" / "viggo"
TINY_CONFIG = ROOT / "configs" / "train" / "tiny.yaml"


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh SQLite MLflow store for one test, exported to the processes it starts."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture
def viggo_copy(tmp_path) -> Path:
    """A writable copy of the bundled ViGGO folder, for tests that damage it."""
    dest = tmp_path / "viggo"
    shutil.copytree(VIGGO, dest)
    return dest


def run_train(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the train entry point's script as a process, with the caller's environment."""
    return subprocess.run(
        [sys.executable, str(ROOT / "mlproject" / "train.py"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=os.environ.copy(),
    )


def registered_versions() -> list:
    from mlflow import MlflowClient

    return MlflowClient().search_model_versions()
