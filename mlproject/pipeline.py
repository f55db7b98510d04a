"""MLproject entry point `pipeline` (the logic lives in loraflow.pipeline)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from loraflow.envs import enter  # noqa: E402

enter("train")
from loraflow.pipeline import main  # noqa: E402

sys.exit(main())
