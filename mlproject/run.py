"""Starts an entry point: `python mlproject/run.py NAME --option value ...`, which is what `mlflow
run . -e NAME -P option=value` runs (MLproject). The entry points are declared in
src/loraflow/entry_points.py; each moves into its environment (.venvs/train or .venvs/infer) first."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from loraflow.entry_points import run_script  # noqa: E402

sys.exit(run_script(sys.argv[1:]))
