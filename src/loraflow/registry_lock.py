"""A mutex for changes to one registered model, kept in the registry itself.

The MLflow registry has no compare-and-set, and a promotion reads (the gate, the version now in
Production) before it writes: without a lock, concurrent promotions leave several versions in
Production (tests/test_promote.py shows it). Creating a
registered model is atomic in every backend (a unique name), so holding the lock means having
created `<name>.lock`; it is deleted on release. This works the same against a local SQLite store
and a tracking server, from any number of machines.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import time

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode

from loraflow.errors import UserError

STALE_AFTER_S = 300  # a promotion takes seconds; a lock this old was left by a crashed process


def holder() -> str:
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


@contextlib.contextmanager
def locked(client: MlflowClient, name: str, wait_s: float = 60.0):
    lock = f"{name}.lock"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(lock, description=f"Held by {holder()} while it changes {name}.")
            break
        except MlflowException as exc:
            # On a name clash the SQL store looks the holder's lock up to report it; if the holder
            # released it in between, that lookup says "not found". Both mean: someone else held it.
            if exc.error_code not in (ErrorCode.Name(RESOURCE_ALREADY_EXISTS), ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)):
                raise
        _break_if_stale(client, lock)
        if time.monotonic() > deadline:
            raise UserError(
                f"Another change to {name} holds the registry lock {lock!r} "
                f"({_describe(client, lock)}). Try again when it ends; if that process is gone, "
                f"delete the registered model {lock!r} (it is removed automatically after "
                f"{STALE_AFTER_S} s)."
            )
        time.sleep(0.2)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(lock)


def _break_if_stale(client: MlflowClient, lock: str) -> None:
    with contextlib.suppress(MlflowException):  # it may have been released meanwhile
        model = client.get_registered_model(lock)
        if time.time() - model.creation_timestamp / 1000 > STALE_AFTER_S:
            print(f"warning: removing a stale registry lock {lock!r} ({model.description})")
            client.delete_registered_model(lock)


def _describe(client: MlflowClient, lock: str) -> str:
    try:
        return client.get_registered_model(lock).description or "holder unknown"
    except MlflowException:
        return "released just now"
