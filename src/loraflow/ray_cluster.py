"""Connecting to Ray (a local instance by default, RAY_ADDRESS for a cluster) and refusing work
that the cluster can never schedule, instead of waiting on it forever."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import tempfile
from pathlib import Path

from loraflow import compat, console
from loraflow.envs import PROJECT_ROOT
from loraflow.errors import UserError

# Unix socket paths are limited to 107 bytes; Ray puts its sockets deep under the temp dir.
_MAX_TEMP_DIR_LEN = 40


def connect(address: str | None = None, num_cpus: int | None = None, metrics_export_port: int | None = None) -> None:
    """Join RAY_ADDRESS's cluster, or start a local instance (declaring `num_cpus` logical CPUs
    when given: Ray's CPUs are scheduling slots, not cores; exporting metrics for Prometheus on
    `metrics_export_port` when given)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # A local instance listens on loopback only: Ray otherwise binds its GCS, raylet and the
        # Prometheus metrics port on every interface. This switch (read when ray is imported) makes
        # Ray take 127.0.0.1 as the node's address, as it does on macOS and Windows.
        os.environ.setdefault(compat.RAY_LOOPBACK_ONLY_ENV, "0")
    import ray

    if ray.is_initialized():
        return
    # Quiet mode keeps the workers' output in Ray's log files instead of streaming it here.
    output = {"log_to_driver": console.verbose(),
              "logging_level": logging.WARNING if console.verbose() else logging.ERROR}
    with _keeping_sigterm_handler():
        if address:
            # A cluster's nodes hold both project environments (see containerfile); this job's
            # workers run in the driver's, whichever one started the node.
            ray.init(address=address, runtime_env={"py_executable": sys.executable}, **output)
        else:
            compat.init_local_ray(num_cpus, str(_local_temp_dir()), metrics_export_port, **output)
    console.quiet_loggers()


def shutdown() -> None:
    """Leave Ray (a local instance stops whole)."""
    import ray

    with _keeping_sigterm_handler():
        ray.shutdown()


@contextlib.contextmanager
def _keeping_sigterm_handler():
    """The entry point's SIGTERM handler (jobs.py: end MLflow runs KILLED, finish the cleanup) put
    back after Ray replaces it: ray.init with one that aborts the process, ray.shutdown (its core
    worker) with the default, which would kill the process silently during the rest of the job's
    cleanup, its runs left RUNNING."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, handler)


def worker_logs_hint() -> str:
    """Where to look when a Ray worker failed and quiet mode kept its output off the console."""
    if console.verbose():
        return ""
    where = (f"{_local_temp_dir()}/session_latest/logs" if not os.environ.get("RAY_ADDRESS")
             else "/tmp/ray/session_latest/logs on the cluster's nodes")
    return f" (the Ray workers' logs are in {where}; rerun with -P verbose=true to stream them)"


def _local_temp_dir() -> Path:
    inside = PROJECT_ROOT / ".cache" / "ray"
    if len(str(inside)) <= _MAX_TEMP_DIR_LEN:
        return inside
    return Path(tempfile.gettempdir()) / f"loraflow-ray-{os.getuid()}"


def alive_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def bundles_that_fit(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many copies of `bundle` one node's total resources can hold."""
    counts = [math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0]
    return min(counts) if counts else 0


def workers_that_fit(nodes: list[dict[str, float]], bundle: dict[str, float], strategy: str) -> int:
    """How many workers of `bundle` a placement group of `strategy` can place on these nodes."""
    fits = [bundles_that_fit(node, bundle) for node in nodes]
    if strategy == "STRICT_SPREAD":  # one worker a node
        return sum(1 for f in fits if f >= 1)
    if strategy == "STRICT_PACK":  # all on one node
        return max(fits, default=0)
    return sum(fits)


def check_feasible(num_workers: int, bundle: dict[str, float], strategy: str) -> None:
    """Raise UserError when no placement of `num_workers` x `bundle` exists on the alive nodes."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    possible = workers_that_fit(nodes, bundle, strategy)
    if possible >= num_workers:
        return
    have = [
        {k: v for k, v in node.items() if not k.startswith(("node:", "memory", "object_store"))}
        for node in nodes
    ]
    raise UserError(
        f"Ray can never schedule this training: it asks for ray_num_workers={num_workers} x "
        f"resources_per_worker={bundle} with placement_strategy={strategy}, but the cluster's "
        f"nodes have {have} (room for {possible} worker(s)). Lower ray_num_workers or "
        f"resources_per_worker, or set RAY_ADDRESS to a cluster that has these resources."
    )
