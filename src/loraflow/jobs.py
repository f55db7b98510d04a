"""What every entry point does around its job: SIGTERM counts as Ctrl-C (so MLflow runs end
KILLED and locks are released), and errors print plainly with an exit code, not a traceback."""

from __future__ import annotations

import os
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
    except Exception as exc:
        refusal = _refused_by_tracking_server(exc)
        if refusal is None:
            raise
        print(f"error: {refusal}", file=sys.stderr)
        return 2


def _refused_by_tracking_server(exc: Exception) -> str | None:
    """A tracking server's 401 or 403 (its basic-auth app) as what to do, not MLflow's traceback."""
    status = getattr(exc, "get_http_status_code", lambda: None)()  # an MlflowException's
    if status == 401:
        return ("The tracking server refused the request as unauthenticated: set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD to one of its users (or MLFLOW_TRACKING_TOKEN), or check them if set.")
    if status == 403:
        return (f"The tracking server refused the request: its user {os.environ.get('MLFLOW_TRACKING_USERNAME')!r} "
                "lacks the permission; an admin of its basic-auth app can grant it.")
    return None
