"""What every entry point does around its job: SIGTERM counts as Ctrl-C (so MLflow runs end
KILLED and locks are released), the first of them stops the job and later ones do not cut its
cleanup short, and errors print plainly with an exit code, not a traceback."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

from loraflow import console
from loraflow.errors import JobFailed, UserError, parse_bool


def _stop(signum, frame):
    # `mlflow run` answers Ctrl-C by sending its job a SIGTERM too, and systemd signals the whole
    # process group: the job is stopping already, and its cleanup (runs ended, locks released,
    # Ray and servers stopped) must run whole.
    for stopping in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(stopping) is _stop:
            signal.signal(stopping, _already_stopping)
    raise KeyboardInterrupt(f"signal {signum}")


def _already_stopping(signum, frame):
    pass


def run_job(job: Callable[[], int | None], interrupted: str, interrupted_code: int = 130,
            verbose: str = "false") -> int:
    """Run an entry point's job; returns the exit code (the job's own, 0 by default)."""
    signal.signal(signal.SIGTERM, _stop)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when started ignoring it (nohup, `&`)
        signal.signal(signal.SIGINT, _stop)
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
