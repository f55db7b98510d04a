"""This machine as result files name it (standard library only: fresh_clone.py runs before set-up)."""

import os
from pathlib import Path


def describe() -> str:
    """CPUs and their model: step times differ by CPU model, not only by count."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return f"{len(os.sched_getaffinity(0))} CPUs ({model})"
