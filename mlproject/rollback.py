"""MLproject entry point `rollback` (the logic lives in loraflow.promote)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from loraflow.envs import enter  # noqa: E402

enter("train")
from loraflow.promote import rollback_main  # noqa: E402

sys.exit(rollback_main())
