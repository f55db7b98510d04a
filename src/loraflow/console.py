"""How much the entry points print. Quiet by default: results, errors and progress bars on the
driver, while the Ray workers' own output (LLaMA-Factory, transformers, vLLM, Ray Train) stays in
Ray's log files. `-P verbose=true` (`--verbose true`) or LORAFLOW_VERBOSE=1 streams it all.
The choice travels in the environment, so Ray workers and subprocesses follow it."""

from __future__ import annotations

import logging
import os
import sys
import warnings

VERBOSE_ENV = "LORAFLOW_VERBOSE"
# Library log levels for quiet mode, as their own environment variables (read at import, also
# inside Ray workers and subprocesses).
_QUIET_ENV = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "TRANSFORMERS_VERBOSITY": "error",
    "LLAMAFACTORY_VERBOSITY": "WARN",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "PYTHONWARNINGS": "ignore",
}
_QUIET_LOGGERS = ("ray", "ray.data", "ray.serve", "ray.train", "filelock", "urllib3", "botocore", "alembic")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


def setup(verbose_flag: bool = False) -> None:
    """Call at the start of an entry point, before the libraries are imported."""
    if verbose_flag:
        os.environ[VERBOSE_ENV] = "1"
    if verbose():
        return
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.simplefilter("ignore")  # deprecation chatter from the libraries; --verbose shows it
    quiet_loggers()


def quiet_loggers() -> None:
    """Raise library loggers to ERROR in quiet mode; again after imports that configure their own
    logging (Ray Data does, when imported)."""
    if verbose():
        return
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def live() -> bool:
    """Whether stderr is a terminal (bars redraw in place) rather than a log file."""
    return sys.stderr.isatty()


def progress_bar(total: int | None, desc: str, unit: str = "it"):
    """A tqdm bar on stderr; in a log file (no terminal) it redraws every 10 s instead of live."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5 if live() else 10.0)
