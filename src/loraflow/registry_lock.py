"""A mutex for changes to one registered model, kept in the registry itself.

The MLflow registry has no compare-and-set, and a promotion reads (the gate, the version now in
Production) before it writes: without a lock, concurrent promotions leave several versions in
Production (tests/test_promote.py shows it). Creating a
registered model is atomic in every backend (a unique name), so holding the lock means having
created `<name>.lock`, tagged with the holder's own token; it is deleted on release. This works the
same against a local SQLite store and a tracking server, from any number of machines.

A holder refreshes a heartbeat tag while it holds the lock, so that only a lock whose holder is
gone (no heartbeat for STALE_AFTER_S) is broken, never a slow live one; and release deletes the lock
only while it still carries the holder's token. Without compare-and-set, breaking a stale lock
keeps one window: two processes that both judge the same lock stale within a registry round trip.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import threading
import time
import uuid

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode

from loraflow.errors import UserError
from loraflow.registry import LOCK_HEARTBEAT_TAG, LOCK_OWNER_TAG

STALE_AFTER_S = 300  # no heartbeat for this long: the holder crashed
HEARTBEAT_S = 30


def holder() -> str:
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


@contextlib.contextmanager
def locked(client: MlflowClient, name: str, wait_s: float = 60.0):
    lock = f"{name}.lock"
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(lock, tags={LOCK_OWNER_TAG: token, LOCK_HEARTBEAT_TAG: str(time.time())},
                                           description=f"Held by {holder()} while it changes {name}.")
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
                f"delete the registered model {lock!r} (it is removed automatically once its holder "
                f"has sent no heartbeat for {STALE_AFTER_S} s)."
            )
        time.sleep(0.2)
    def beat() -> None:
        if client.get_registered_model(lock).tags.get(LOCK_OWNER_TAG) == token:
            client.set_registered_model_tag(lock, LOCK_HEARTBEAT_TAG, str(time.time()))

    try:
        with heartbeat(beat):
            yield
    finally:
        _release(client, lock, token)


@contextlib.contextmanager
def heartbeat(beat):
    """`beat()` every HEARTBEAT_S on a thread of its own while the block runs (a holder's sign of life:
    this lock's, a delivery controller's claim). Any failure (the server unreachable, a timeout)
    costs one beat, never the thread: a missed beat is retried, and STALE_AFTER_S is many beats."""
    stop, every_s = threading.Event(), HEARTBEAT_S  # read now: tests shorten it

    def beating() -> None:
        while not stop.wait(every_s):
            with contextlib.suppress(Exception):
                beat()

    thread = threading.Thread(target=beating, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _release(client: MlflowClient, lock: str, token: str) -> None:
    with contextlib.suppress(MlflowException):  # already gone: nothing to release
        if client.get_registered_model(lock).tags.get(LOCK_OWNER_TAG) != token:
            print(f"warning: the registry lock {lock!r} was broken as stale while this process held it; "
                  "left to its new holder")
            return
        client.delete_registered_model(lock)


def _break_if_stale(client: MlflowClient, lock: str) -> None:
    with contextlib.suppress(MlflowException):  # it may have been released meanwhile
        model = client.get_registered_model(lock)
        if time.time() - _last_heartbeat(model) <= STALE_AFTER_S:
            return
        again = client.get_registered_model(lock)  # the same holder, still silent: not one that took it since
        same_holder = again.tags.get(LOCK_OWNER_TAG) == model.tags.get(LOCK_OWNER_TAG)
        if same_holder and time.time() - _last_heartbeat(again) > STALE_AFTER_S:
            print(f"warning: removing a stale registry lock {lock!r} ({model.description})")
            client.delete_registered_model(lock)


def _last_heartbeat(model) -> float:
    try:
        return float(model.tags[LOCK_HEARTBEAT_TAG])
    except (KeyError, ValueError):  # a lock made by hand, or by an older loraflow
        return model.creation_timestamp / 1000


def _describe(client: MlflowClient, lock: str) -> str:
    try:
        return client.get_registered_model(lock).description or "holder unknown"
    except MlflowException:
        return "released just now"
