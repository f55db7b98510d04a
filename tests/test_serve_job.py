"""The serve entry point: real Ray Serve LLM + vLLM (CPU build) serving a tiny adapter that train
trained and registered, loaded from the LoRA store on a real S3-compatible server (moto's, started
by serve itself), queried with the real openai client over loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import yaml
from conftest import ROOT, TINY_CONFIG
from mlflow import MlflowClient
from servers import free_port, mlflow_server

from loraflow import promote

NAME = "viggo-tiny-lora"
MODEL_ID = "tiny"
API_KEY = "test-key-123"
# Figures that pass configs/promote/default.yaml (the default recipe's own are in quality-default.json).
GOOD = {"exact_match": 0.57, "parse_validity": 0.99, "slot_f1": 0.89, "rows": 1083}


def _use_store(uri: str) -> MlflowClient:
    import mlflow

    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    return MlflowClient()


TRACKING_SERVER = contextlib.ExitStack()  # closed by the test that takes the registry away


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """An `mlflow server` (so that it can be taken away while serving) holding viggo-tiny-lora v1
    (trained by the train entry point, in Production) and v2 (the same adapter registered again:
    a distinct version with its own adapter id), both evaluated."""
    store = tmp_path_factory.mktemp("store")
    uri = TRACKING_SERVER.enter_context(mlflow_server(f"sqlite:///{store / 'mlflow.db'}", str(store / "artifacts")))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run([sys.executable, str(ROOT / "mlproject/train.py"), "--config", str(TINY_CONFIG)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    client = _use_store(uri)
    v1 = client.get_model_version(NAME, "1")
    client.create_model_version(NAME, source=v1.source, run_id=v1.run_id, tags=v1.tags)
    for version in ("1", "2"):
        for key, value in GOOD.items():
            client.set_model_version_tag(NAME, version, f"eval.{key}", str(value))
    assert promote.main(["--name", NAME, "--version", "1"]) == 0
    yield uri
    TRACKING_SERVER.close()
    if previous is not None:
        os.environ["MLFLOW_TRACKING_URI"] = previous


def _serve_config(tmp_path, port: int) -> str:
    config = yaml.safe_load((ROOT / "configs/serve/default.yaml").read_text())
    config.update(port=port, api_key_env="LORAFLOW_TEST_API_KEY", poll_interval_s=1)
    config["llm_config"]["model_loading_config"]["model_id"] = MODEL_ID
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def server(registry, tmp_path_factory):
    port = free_port()
    config = _serve_config(tmp_path_factory.mktemp("serve"), port)
    log = tmp_path_factory.mktemp("log") / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry, "LORAFLOW_TEST_API_KEY": API_KEY}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "mlproject/serve.py"), "--name", NAME,
                                 "--config", config], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while '"serving"' not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text(errors="replace")[-5000:]
        assert time.monotonic() < deadline, "serve did not come up in 10 minutes"
        time.sleep(2)
    yield proc, port, log
    if proc.poll() is None:
        proc.kill()


def client(port: int, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)


def ask(port: int, model: str = f"{MODEL_ID}:production", max_tokens: int = 8, **kwargs):
    return client(port).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Blizzard North made Diablo II."}],
        max_tokens=max_tokens, temperature=0.0, **kwargs)


def test_models_lists_base_adapter_and_stable_name(server):
    _, port, _ = server
    listed = {m.id: m for m in client(port).models.list().data}
    assert {MODEL_ID, f"{MODEL_ID}:{NAME}-v1", f"{MODEL_ID}:production"} <= set(listed)
    status = listed[f"{MODEL_ID}:production"].model_extra["metadata"]["loraflow"]
    assert status["serving"] == f"{NAME}-v1" and status["registry"]["state"] == "ok"


def test_chat_answers_and_names_the_version(server):
    _, port, _ = server
    raw = ask(port)
    answer = raw.parse()
    assert answer.model == f"{MODEL_ID}:{NAME}-v1"
    assert raw.headers["x-loraflow-adapter"] == f"{MODEL_ID}:{NAME}-v1"
    assert answer.choices[0].message.content and answer.usage.completion_tokens > 0


def test_an_adapter_can_be_asked_for_by_its_version_id(server):
    _, port, _ = server
    assert ask(port, model=f"{MODEL_ID}:{NAME}-v1").parse().model == f"{MODEL_ID}:{NAME}-v1"


def test_health_endpoint(server):
    _, port, _ = server
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/healthz", timeout=30) as response:
        assert response.status == 200


def test_streaming_chat(server):
    _, port, _ = server
    stream = client(port).chat.completions.create(
        model=f"{MODEL_ID}:production", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, stream=True)
    chunks = list(stream)
    assert len(chunks) > 1
    assert {chunk.model for chunk in chunks} == {f"{MODEL_ID}:{NAME}-v1"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_missing_or_wrong_api_key_is_refused(server):
    _, port, _ = server
    with pytest.raises(openai.AuthenticationError, match="API key"):
        client(port, "wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        client(port, "wrong").chat.completions.create(model=f"{MODEL_ID}:production",
                                                      messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    # No key at all (the openai client insists on one, so a bare HTTP request).
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 401


@pytest.mark.parametrize(
    "adapter, status",
    [("../../etc", 400), ("s3://other-bucket/adapter", 400), ("viggo-tiny-lora-v1/../x", 400),
     ("%2e%2e", 400), ("no-such-adapter", 404), ("x" * 300, 400)],
)
def test_bad_adapter_ids_are_refused(server, adapter, status):
    _, port, _ = server
    with pytest.raises(openai.APIStatusError) as caught:
        ask(port, model=f"{MODEL_ID}:{adapter}")
    assert caught.value.status_code == status
    assert "adapter" in caught.value.message.lower()


def test_oversized_prompt_is_refused_with_the_limit(server):
    """A prompt longer than the engine's max_model_len (1024 tokens) gets a 400 naming the limit."""
    _, port, _ = server
    with pytest.raises(openai.BadRequestError) as refused:
        client(port).chat.completions.create(
            model=f"{MODEL_ID}:production", max_tokens=8,
            messages=[{"role": "user", "content": "Diablo II was made by Blizzard North. " * 400}])
    assert "1024" in refused.value.message
    assert ask(port).parse().model == f"{MODEL_ID}:{NAME}-v1"  # and the server carries on


@pytest.mark.parametrize(
    "args, message",
    [(["--name", "no-such-model"], "There is no registered model 'no-such-model'"),
     (["--name", NAME, "--alias", "staging"], "has no version with the alias 'staging' yet"),
     (["--name", NAME, "--version", "7"], "has no version 7 yet")],
)
def test_nothing_to_serve_is_a_clear_error(registry, args, message):
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry}
    proc = subprocess.run([sys.executable, str(ROOT / "mlproject/serve.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr


def _load(port: int, requests: int, clients: int, on_done=None) -> tuple[list[str], list[str]]:
    """Send `requests` short chat requests from `clients` threads; returns (models served, failures)."""
    served, failures = [], []
    lock = threading.Lock()
    left = iter(range(requests))

    def loop() -> None:
        while True:
            with lock:
                if next(left, None) is None:
                    return
            try:
                model = ask(port, max_tokens=1).parse().model
                with lock:
                    served.append(model)
                    if on_done:
                        on_done(len(served))
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                with lock:
                    failures.append(repr(exc))

    workers = [threading.Thread(target=loop) for _ in range(clients)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return served, failures


def test_1000_requests_across_a_promotion_fail_none(server, registry):
    """1,000 requests from 4 clients while v2 is promoted (by the promote entry point, after the
    100th answer): every request succeeds, the stable name moves from v1 to v2 without restart
    and never back."""
    _, port, _ = server
    promotion: list[subprocess.Popen] = []

    def promote_at_100(done: int) -> None:
        if done == 100:
            promotion.append(subprocess.Popen(
                [sys.executable, str(ROOT / "mlproject/promote.py"), "--name", NAME, "--version", "2",
                 "--reason", "serve test"], cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": registry},
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

    started = time.monotonic()
    served, failures = _load(port, 1000, 4, promote_at_100)
    [promoter] = promotion
    assert promoter.wait(timeout=120) == 0, promoter.communicate()[0]
    assert failures == [] and len(served) == 1000
    assert served.count(f"{MODEL_ID}:{NAME}-v2") >= 10, "the promotion was never picked up"
    first_v2 = served.index(f"{MODEL_ID}:{NAME}-v2")
    # Requests started before the switch may finish after it (4 in flight); none may start on v1
    # after that.
    assert f"{MODEL_ID}:{NAME}-v1" not in served[first_v2 + 4:]
    print(f"1000 requests in {time.monotonic() - started:.0f} s, 0 failed, v2 from request {first_v2 + 1}")


def _engine_replica_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "ServeReplica:loraflow:LLMServer" in line]


def test_killed_engine_replica_is_replaced_and_requests_fail_cleanly(server):
    """SIGKILL the vLLM replica under load: requests during the gap fail with an error answer
    within the client's timeout (none hangs), Ray Serve starts a new replica, then all succeed."""
    _, port, _ = server
    [pid] = _engine_replica_pids()
    outcomes: list[tuple[float, float, bool]] = []  # (start, seconds, succeeded)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            start = time.monotonic()
            try:
                ask(port, max_tokens=1)
                outcomes.append((start, time.monotonic() - start, True))
            except Exception:  # noqa: BLE001 - a failed request is what is being measured
                outcomes.append((start, time.monotonic() - start, False))
                time.sleep(0.5)

    workers = [threading.Thread(target=loop) for _ in range(2)]
    for worker in workers:
        worker.start()
    time.sleep(3)
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    deadline = killed_at + 300
    while time.monotonic() < deadline:  # recovered: 20 successes in a row after the kill
        recent = [ok for start, _, ok in outcomes if start > killed_at][-20:]
        if len(recent) == 20 and all(recent):
            break
        time.sleep(1)
    stop.set()
    for worker in workers:
        worker.join()
    after = [(start, seconds, ok) for start, seconds, ok in outcomes if start > killed_at]
    assert after[-20:] and all(ok for _, _, ok in after[-20:]), "no recovery within 5 minutes"
    assert max(seconds for _, seconds, _ in outcomes) < 120  # the client's timeout: nothing hung
    assert _engine_replica_pids() not in ([], [pid])  # a new replica process
    failed = sum(1 for _, _, ok in after if not ok)
    recovered = max(start for start, _, ok in after if not ok) - killed_at if failed else 0.0
    print(f"{len(outcomes)} requests, {failed} failed after the kill, all succeed again {recovered:.0f} s after it")


def test_registry_unreachable_keeps_serving_and_reports_it(server):
    """The tracking server goes away: the last good adapter keeps answering, and /v1/models says
    that the registry cannot be reached."""
    _, port, _ = server
    TRACKING_SERVER.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        listed = {m.id: m for m in client(port).models.list().data}
        status = listed[f"{MODEL_ID}:production"].model_extra["metadata"]["loraflow"]
        if status["registry"]["state"] == "error":
            break
        time.sleep(1)
    assert status["registry"]["state"] == "error" and status["registry"]["error"], status
    assert status["serving"] == f"{NAME}-v2"
    served, failures = _load(port, 20, 2)
    assert failures == [] and set(served) == {f"{MODEL_ID}:{NAME}-v2"}


def test_sigterm_shuts_down_cleanly(server):
    proc, port, log = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text(errors="replace")[-3000:]
    assert "shutting down" in log.read_text(errors="replace")
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), 1):
        pass
