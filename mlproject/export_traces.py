"""MLproject entry point `export_traces` (the logic lives in loraflow.traces)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from loraflow.envs import enter  # noqa: E402

enter("train")
from loraflow.traces import main  # noqa: E402

sys.exit(main())
