"""The serve entry point: real Ray Serve LLM + vLLM (CPU build) serving a tiny adapter that train
trained and registered, loaded from the LoRA store on a real S3-compatible server (moto's, started
by serve itself), queried with the real openai client over loopback."""

from __future__ import annotations

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
from servers import free_port

from loraflow import promote

NAME = "viggo-tiny-lora"
MODEL_ID = "tiny"
API_KEY = "test-key-123"
GOOD = {"parse_validity": 1.0, "slot_f1": 0.4, "rows": 50}


def _use_store(uri: str) -> MlflowClient:
    import mlflow

    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    return MlflowClient()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """viggo-tiny-lora v1 (trained by the train entry point, in Production) and v2 (the same adapter
    registered again: a distinct version with its own adapter id), both evaluated."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
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


def ask(port: int, model: str = f"{MODEL_ID}:production", **kwargs):
    return client(port).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Blizzard North made Diablo II."}],
        max_tokens=8, temperature=0.0, **kwargs)


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


def test_promotion_while_requests_are_in_flight_fails_none(server, registry):
    """A bounded request loop runs while v2 is promoted: every request succeeds, the stable name
    moves from v1 to v2 without restart and never back."""
    _, port, _ = server
    served, failures = [], []
    stop = threading.Event()

    def loop() -> None:
        deadline = time.monotonic() + 300
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                served.append(ask(port).parse().model)
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                failures.append(repr(exc))

    workers = [threading.Thread(target=loop) for _ in range(3)]
    for worker in workers:
        worker.start()
    time.sleep(3)
    _use_store(registry)
    assert promote.main(["--name", NAME, "--version", "2", "--reason", "serve test"]) == 0
    deadline = time.monotonic() + 240
    while served.count(f"{MODEL_ID}:{NAME}-v2") < 10 and time.monotonic() < deadline and not failures:
        time.sleep(0.5)
    stop.set()
    for worker in workers:
        worker.join()
    assert failures == []
    assert f"{MODEL_ID}:{NAME}-v1" in served and served.count(f"{MODEL_ID}:{NAME}-v2") >= 10
    first_v2 = served.index(f"{MODEL_ID}:{NAME}-v2")
    # Requests started before the switch may finish after it; none may start on v1 after v2 answers
    # plus the 3 that were in flight.
    assert f"{MODEL_ID}:{NAME}-v1" not in served[first_v2 + 3:]
    print(f"{len(served)} requests, {len(failures)} failed, v2 from request {first_v2 + 1}")


def test_sigterm_shuts_down_cleanly(server):
    proc, port, log = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text(errors="replace")[-3000:]
    assert "shutting down" in log.read_text(errors="replace")
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), 1):
        pass


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
