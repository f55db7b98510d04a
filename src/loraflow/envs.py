"""Which Python environment runs which job, and moving a process into it.

LLaMA-Factory 0.9.5 needs transformers<=5.6 while vLLM needs transformers>=5.16, so the project
keeps two environments with the same ray and mlflow versions (see docs/usage.md, "What the set-up makes"):
  train  - LLaMA-Factory, torch, Ray Train
  infer  - vLLM, Ray Data LLM, Ray Serve LLM
An entry point calls `enter(kind)` first: if the running interpreter lacks what the job needs,
the process re-executes itself under that environment's interpreter, so users never choose.
This module uses the standard library only: it runs before any dependency can be imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# The module whose presence marks an interpreter as able to run each kind of job.
_MARKER_MODULE = {"train": "llamafactory", "infer": "vllm"}


class EnvironmentMissing(RuntimeError):
    pass


def python_for(kind: str) -> Path:
    """The interpreter of environment `kind`: $LORAFLOW_<KIND>_PYTHON, else .venvs/<kind>."""
    override = os.environ.get(f"LORAFLOW_{kind.upper()}_PYTHON")
    if override:
        return Path(override)
    return PROJECT_ROOT / ".venvs" / kind / "bin" / "python"


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def enter(kind: str) -> None:
    """Make sure this process runs in environment `kind`, re-executing under it if needed."""
    if has_module(_MARKER_MODULE[kind]):
        _put_project_on_path()
        return
    python = python_for(kind)
    if not python.exists():
        raise EnvironmentMissing(
            f"The '{kind}' environment is missing (looked for {python}). "
            f"Run ./setup.sh to create it, or set LORAFLOW_{kind.upper()}_PYTHON to an "
            f"interpreter that has {_MARKER_MODULE[kind]} installed."
        )
    if os.environ.get("LORAFLOW_REEXEC") == kind:  # guard against an exec loop
        raise EnvironmentMissing(
            f"{python} was expected to provide {_MARKER_MODULE[kind]!r} but does not; "
            f"re-run ./setup.sh to repair the '{kind}' environment."
        )
    os.environ["LORAFLOW_REEXEC"] = kind
    _put_project_on_path()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(str(python), [str(python), *sys.argv])


def _put_project_on_path() -> None:
    """Make `loraflow` (src/) and the task scorers (evaluation/) importable here and in child
    processes, which inherit the environment (Ray workers among them)."""
    for path in (str(PROJECT_ROOT), str(PROJECT_ROOT / "src")):
        if path not in sys.path:
            sys.path.insert(0, path)
        paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if path not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [path, *paths]))
