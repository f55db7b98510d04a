"""This machine as result files name it, and how fast it is now (standard library only: fresh_clone.py
runs before set-up; the speed probe runs in an environment with torch)."""

import os
from pathlib import Path


def describe() -> str:
    """CPUs and their model: step times differ by CPU model, not only by count."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return f"{len(os.sched_getaffinity(0))} CPUs ({model})"


_MATMUL_PROBE = """
import time, torch
a = torch.randn(2048, 2048, dtype=torch.bfloat16); b = torch.randn(2048, 2048, dtype=torch.bfloat16)
for _ in range(3): a @ b
started, n = time.perf_counter(), 0
while time.perf_counter() - started < 5: a @ b; n += 1
print(2 * 2048 ** 3 * n / (time.perf_counter() - started) / 1e9)
"""


def matmul_gflops(python: str) -> float:
    """This machine's speed now: GFLOP/s of a 2048^3 bf16 matrix product with torch's threads (5 s),
    run by `python` (an environment with torch). The same 2-core machine has given 640 to 2,180
    at different hours: result files of absolute times carry it."""
    import subprocess

    done = subprocess.run([python, "-c", _MATMUL_PROBE], capture_output=True, text=True, check=True)
    return round(float(done.stdout.strip()), 1)
