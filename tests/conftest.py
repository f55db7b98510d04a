"""Shared fixtures. The suite runs in the train environment (./setup.sh makes it); jobs are
started the way users start them, as real processes against a real MLflow store and real Ray."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VIGGO = ROOT / "data" / "viggo"
TINY_CONFIG = ROOT / "configs" / "train" / "tiny.yaml"


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh SQLite MLflow store for one test, exported to the processes it starts."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for chosen in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):  # a job run in-process sets one: unset after
        monkeypatch.setenv(chosen, "")
        monkeypatch.delenv(chosen)
    import mlflow

    mlflow.set_tracking_uri(uri)
    # Make the store's tables now: a test's own client and the job it starts would otherwise both
    # create them on first use, and the loser fails with "table ... already exists".
    mlflow.MlflowClient().search_experiments()
    return uri


def task_tags(run_id: str) -> dict[str, str]:
    """The task and prompt tags train records on a version (the bundled ViGGO rows' instruction,
    in the Prompt Registry, linked to `run_id`), for versions a test registers itself."""
    import json

    from loraflow import registry, tasks

    instruction = json.loads((VIGGO / "test.jsonl").open().readline())["instruction"]
    prompt = tasks.register_prompt(tasks.get("viggo-mr"), instruction, run_id)
    return {registry.TASK_TAG: "viggo-mr", registry.PROMPT_TAG: prompt.uri}


@pytest.fixture
def viggo_copy(tmp_path) -> Path:
    """A writable copy of the bundled ViGGO folder, for tests that damage it."""
    dest = tmp_path / "viggo"
    shutil.copytree(VIGGO, dest)
    return dest


@pytest.fixture(scope="session")
def tiny_trainings(tmp_path_factory) -> Path:
    """viggo-tiny-lora v1 and v2, trained once per test session by the train entry point (v2 with
    another seed and learning rate: different weights), in a SQLite store that no test changes:
    a module that needs trained versions works on its own copy (copy_store)."""
    folder = tmp_path_factory.mktemp("tiny-trainings")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    for overrides in ("{}", "{seed: 7, learning_rate: 3.0e-2}"):
        proc = subprocess.run([*entry_point("train"), "--config", str(TINY_CONFIG),
                               "--overrides", overrides], cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return folder / "mlflow.db"


def copy_store(database: Path, folder: Path) -> str:
    """A copy of a SQLite store's database in `folder`, as a tracking URI (the artifacts it points
    at are shared, and read only)."""
    shutil.copy(database, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


def config_with(source: str | Path, folder: Path, drop: tuple[str, ...] = (), **changes) -> Path:
    """A shipped config with `changes` (top-level keys replaced) and without the keys in `drop`, as a
    new file in `folder`. `source`: train, evaluate, serve or promote (configs/<source>/default.yaml),
    or a config's path (TINY_CONFIG)."""
    path = ROOT / "configs" / source / "default.yaml" if isinstance(source, str) and "/" not in source else Path(source)
    raw = {key: value for key, value in yaml.safe_load(path.read_text()).items() if key not in drop}
    raw.update(changes)
    written = folder / f"{path.parent.name}-{path.stem}-{uuid.uuid4().hex[:8]}.yaml"
    written.write_text(yaml.safe_dump(raw))
    return written


def entry_point(name: str) -> list[str]:
    """The command that starts entry point `name` as `mlflow run . -e NAME` does, without its run."""
    return [sys.executable, str(ROOT / "mlproject" / "run.py"), name]


def run_train(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the train entry point's script as a process, with the caller's environment."""
    return subprocess.run(
        [*entry_point("train"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=os.environ.copy(),
    )


def registered_versions() -> list:
    from mlflow import MlflowClient

    return MlflowClient().search_model_versions()
