"""SIGTERM as Ctrl-C: entry points end their MLflow run KILLED on either."""

import signal


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def sigterm_interrupts() -> None:
    signal.signal(signal.SIGTERM, _raise_interrupt)
