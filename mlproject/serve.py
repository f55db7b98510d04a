"""MLproject entry point `serve` (the logic lives in loraflow.serve)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from loraflow.envs import enter  # noqa: E402

enter("infer")
from loraflow.serve import main  # noqa: E402

sys.exit(main())
