"""What every entry point does around its job: SIGTERM counts as Ctrl-C (so MLflow runs end
KILLED and locks are released), and errors print plainly with an exit code, not a traceback."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

from loraflow import console
from loraflow.errors import JobFailed, UserError, parse_bool


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_job(job: Callable[[], int | None], interrupted: str, interrupted_code: int = 130,
            verbose: str = "false") -> int:
    """Run an entry point's job; returns the exit code (the job's own, 0 by default)."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        console.setup(parse_bool("verbose", verbose))
        return job() or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except JobFailed as exc:
        print(f"error: {exc.what} failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return interrupted_code
