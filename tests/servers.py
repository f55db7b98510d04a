"""Real servers on loopback for tests: a static HTTP server, moto's S3-compatible server,
Debian's PostgreSQL and an MLflow tracking server."""

from __future__ import annotations

import contextlib
import functools
import glob
import http.server
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def http_server(directory: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"{what} did not start on port {port}")
        time.sleep(0.2)


@contextlib.contextmanager
def s3_server():
    """moto's standalone S3 server process (real HTTP, S3 wire protocol) on 127.0.0.1."""
    port = free_port()
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, proc, "moto_server")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _postgres_bin(tool: str) -> str:
    found = shutil.which(tool) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))), None)
    if found is None:
        raise RuntimeError(f"PostgreSQL's {tool} is missing: install Debian's postgresql package "
                           "(./setup.sh does when run as root).")
    return found


@contextlib.contextmanager
def postgres_server():
    """A throwaway PostgreSQL cluster on 127.0.0.1 with a database `mlflow`, trust auth on loopback.
    As root it runs as the `postgres` user, because initdb and postgres refuse to run as root."""
    workdir = Path(tempfile.mkdtemp(prefix="loraflow-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(workdir, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = workdir / "data"

    def run(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, timeout=120)

    run(_postgres_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "loraflow", "--no-sync")
    # fsync off: a test database need not survive a power cut.
    run(_postgres_bin("pg_ctl"), "-D", str(data), "-l", str(workdir / "log"), "-w", "start",
        "-o", f"-h 127.0.0.1 -p {port} -k {workdir} -F")
    try:
        run(_postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "loraflow", "mlflow")
        yield f"postgresql://loraflow@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_user, _postgres_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, artifacts_destination: str, env: dict | None = None):
    """`mlflow server` with proxied artifacts on 127.0.0.1; yields its URL once /health answers."""
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    log = tempfile.NamedTemporaryFile(prefix="mlflow-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [str(mlflow), "server", "--backend-store-uri", backend_store_uri,
         "--artifacts-destination", artifacts_destination, "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"mlflow server did not start; log: {log.name}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        os.unlink(log.name)
