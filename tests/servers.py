"""Real servers on loopback for tests: a static HTTP server, moto's S3-compatible server,
Debian's PostgreSQL, an MLflow tracking server and a two-node Ray cluster."""

from __future__ import annotations

import contextlib
import functools
import glob
import http.server
import json
import os
import pwd
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A free port below the kernel's ephemeral range and above Ray's worker ports (10002-19999):
    a port from bind(0) can be handed out again to the next bind(0) (Ray starts a dozen services
    that way) before the test's server binds it ("Failed to bind to address")."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    # SystemRandom: pytest-randomly reseeds `random` before every test, which would hand each test
    # the same candidates.
    for port in random.SystemRandom().sample(range(20_000, low), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in 20000-{low}")


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


class Lines:
    """A process's text stdout, read by a thread, so that every wait on it is bounded: a process
    that goes quiet fails the test at the deadline instead of hanging it."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.seen = proc, []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in iter(self.proc.stdout.readline, ""):
            self._queue.put(line)
        self._queue.put(None)

    def _next(self, deadline: float, what: str) -> str | None:
        try:
            line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"{what} not within the deadline:\n" + "".join(self.seen[-60:])) from None
        if line is not None:
            self.seen.append(line)
        return line

    def until(self, done, timeout: float) -> str:
        """The first line for which done(line) holds."""
        deadline = time.monotonic() + timeout
        while (line := self._next(deadline, "the awaited line")) is not None:
            if done(line):
                return line
        raise AssertionError(f"the process exited ({self.proc.wait()}):\n" + "".join(self.seen[-60:]))

    def all(self, timeout: float) -> str:
        """Everything it printed, once it has closed its output."""
        deadline = time.monotonic() + timeout
        while self._next(deadline, "the end of its output") is not None:
            pass
        return "".join(self.seen)


def _wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"{what} did not start on port {port}")
        time.sleep(0.2)


def s3_server():
    """moto's standalone S3 server process (real HTTP, S3 wire protocol) on 127.0.0.1: serve's own
    (adapter_store.moto_s3_server), on a port no Ray service can take first."""
    from loraflow import adapter_store

    return adapter_store.moto_s3_server(free_port())


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


class MlflowServer:
    """`mlflow server` with proxied artifacts on 127.0.0.1, on one port for its lifetime, so that
    a test can take it away (stop) and bring it back (start) under the same URL. With
    admin_password: MLflow's basic-auth app (`--app-name basic-auth`), whose user `admin` has that
    password, its users in a store of its own."""

    def __init__(self, backend_store_uri: str, artifacts_destination: str, env: dict | None = None,
                 admin_password: str | None = None):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._args = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
                      backend_store_uri, "--artifacts-destination", artifacts_destination, "--host", "127.0.0.1",
                      "--port", str(port), "--workers", "1"]
        self._env = {**os.environ, **(env or {})}
        self._proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="mlflow-server-", suffix=".log", delete=False)
        self._users = tempfile.mkdtemp(prefix="mlflow-users-")
        if admin_password is not None:
            config = Path(self._users, "basic_auth.ini")
            # The cache: each user's password hash checked once, not on every request (seconds each job).
            config.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{self._users}/users.db\n"
                              "admin_username = admin\nauth_cache_ttl_seconds = 600\n")
            self._args += ["--app-name", "basic-auth"]
            self._env.update(MLFLOW_AUTH_CONFIG_PATH=str(config), MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
                             MLFLOW_FLASK_SERVER_SECRET_KEY=os.urandom(16).hex())  # for its CSRF checks

    def start(self) -> None:
        self._proc = subprocess.Popen(self._args, stdout=self._log, stderr=subprocess.STDOUT, env=self._env)
        deadline = time.monotonic() + 240  # on a loaded 2-core machine it once took over 120 s
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/health", timeout=2):
                return
            if time.monotonic() > deadline or self._proc.poll() is not None:
                with open(self._log.name, errors="replace") as log:
                    raise RuntimeError(f"mlflow server did not start:\n{log.read()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=20)
        self._proc = None

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        os.unlink(self._log.name)
        shutil.rmtree(self._users, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, artifacts_destination: str, env: dict | None = None,
                  admin_password: str | None = None):
    """An MlflowServer for the length of a with-block; yields its URL once /health answers."""
    with MlflowServer(backend_store_uri, artifacts_destination, env, admin_password) as server:
        yield server.url


@contextlib.contextmanager
def ray_cluster(node_env: dict[str, str], cpus_per_node: int = 2):
    """`ray start --head` plus a second node with its own CPUs, both on 127.0.0.1, each a process
    group of its own so that teardown stops exactly this cluster (`ray stop` would stop every Ray
    on the machine). `node_env` is what the nodes' environment adds (credentials, as a cluster's
    nodes would have). Yields (address for RAY_ADDRESS, dashboard URL for the state API, the
    folder that holds the nodes' logs)."""
    ray = str(Path(sys.executable).with_name("ray"))
    temp = Path(tempfile.mkdtemp(prefix="lf-ray-", dir="/tmp"))  # short: Unix socket paths are limited
    port, dashboard = free_port(), free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))},
           "RAY_AUTH_MODE": "token", **node_env}  # Ray's default token auth, which nodes joining must name
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus_per_node), "--num-gpus", "0",
              "--disable-usage-stats"]
    nodes = []

    def start(*args: str, log: str) -> None:
        nodes.append(subprocess.Popen([ray, "start", *common, *args], env=env, start_new_session=True,
                                      stdout=open(temp / log, "w"), stderr=subprocess.STDOUT))

    try:
        start("--head", "--port", str(port), "--temp-dir", str(temp), "--dashboard-host", "127.0.0.1",
              "--dashboard-port", str(dashboard), log="head.log")
        _wait_for_port(dashboard, nodes[0], "the Ray head node", timeout=90)
        start("--address", f"127.0.0.1:{port}", log="worker.log")
        _wait_for_nodes(f"http://127.0.0.1:{dashboard}", 2, nodes)
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", temp
    finally:
        for node in reversed(nodes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGTERM)
        for node in reversed(nodes):
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(timeout=10)  # a node drains for up to 30 s; a test cluster need not
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def ray_dashboard(dashboard: str, path: str):
    """GET a Ray dashboard API path with the cluster's token (`ray start --head` writes it)."""
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    request = urllib.request.Request(f"{dashboard}{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.load(answer)


def _wait_for_nodes(dashboard: str, count: int, procs: list[subprocess.Popen], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a Ray node exited while starting")
        with contextlib.suppress(OSError, ValueError):
            summary = ray_dashboard(dashboard, "/nodes?view=summary")["data"]["summary"]
            if sum(1 for n in summary if n["raylet"]["state"] == "ALIVE") >= count:
                return
        time.sleep(1)
    raise RuntimeError(f"the Ray cluster did not reach {count} nodes")
