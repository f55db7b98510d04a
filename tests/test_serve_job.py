"""The serve entry point: real Ray Serve LLM + vLLM (CPU build) serving a tiny adapter that train
trained and registered, loaded from the LoRA store on a real S3-compatible server (moto's, started
by serve itself), queried with the real openai client over loopback."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import openai
import pytest
import yaml
from browser import chromium, page_text
from conftest import ROOT, copy_store, entry_point
from mlflow import MlflowClient
from servers import Lines, MlflowServer, free_port, s3_server

from loraflow import canary, entry_points, tasks, traces
from loraflow import registry as registry_contract
from loraflow.evaluate import record_evaluation
from loraflow.registry_lock import locked

NAME = "viggo-tiny-lora"
MODEL_ID = "tiny"
STABLE = f"{MODEL_ID}:{NAME}"  # its stable name, following Production
SECOND = "viggo-nlg-tiny-lora"  # v1: viggo-tiny-lora v2's adapter, registered for the other task and its prompt
LATER = "viggo-later-tiny-lora"  # listed by the server's config, registered only while it serves
NLG_INSTRUCTION = json.loads((ROOT / "data/viggo-nlg/train.jsonl").open().readline())["instruction"]
API_KEY = "test-key-123"
# Figures that pass configs/promote/default.yaml (the default recipe's own are in quality-default.json).
GOOD = {"exact_match": 0.64, "parse_validity": 0.99, "slot_f1": 0.91, "rows": 1083}


@pytest.fixture(scope="module")
def registry(tiny_trainings, tmp_path_factory):
    """An `mlflow server` (so that a test can take it away while serving) on a copy of the session's
    tiny trainings: viggo-tiny-lora v1 and v2, two trainings by the train entry point with different
    weights, both evaluated; v1 in Production."""
    store = tmp_path_factory.mktemp("store")
    with MlflowServer(copy_store(tiny_trainings, store), str(store / "artifacts")) as tracking:
        import mlflow

        environment = pytest.MonkeyPatch()  # this module's store, undone for the modules after it
        environment.setenv("MLFLOW_TRACKING_URI", tracking.url)
        mlflow.set_tracking_uri(tracking.url)
        for version in ("1", "2"):
            record_evaluation(NAME, version, GOOD, "serve-test")
        assert entry_points.main("promote", ["--name", NAME, "--version", "1"]) == 0
        v2 = MlflowClient().get_model_version(NAME, "2")
        prompt = tasks.register_prompt(tasks.get("viggo-nlg"), NLG_INSTRUCTION, v2.run_id)
        _register_like(MlflowClient(), v2, tmp_path_factory.mktemp("second"), name=SECOND,
                       **{registry_contract.TASK_TAG: "viggo-nlg", registry_contract.PROMPT_TAG: prompt.uri})
        assert entry_points.main("promote", ["--name", SECOND, "--version", "1"]) == 0
        yield tracking
        environment.undo()
        mlflow.set_tracking_uri(None)


def _serve_config(tmp_path, port: int, lora_store: str | None = None, models: list[str] | None = None) -> str:
    config = yaml.safe_load((ROOT / "configs/serve/default.yaml").read_text())
    config.update(port=port, api_key_env="LORAFLOW_TEST_API_KEY", poll_interval_s=1, metrics_interval_s=1,
                  lora_store=lora_store, models=models or [NAME])
    config["traces"]["sample_rate"] = 1.0  # every answer traced: the traces test counts them
    config["metrics_export_port"] = free_port()
    config["llm_config"]["model_loading_config"]["model_id"] = MODEL_ID
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


class ServeProcess:
    """`serve` following the registry's Production alias; started again when a test stopped it."""

    def __init__(self, registry: MlflowServer, folder: Path, lora_store: str):
        self.registry, self.folder, self.lora_store, self.proc = registry, folder, lora_store, None

    def running(self) -> tuple[subprocess.Popen, int, Path]:
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None:
                _kill_session(self.proc.pid)  # what a stopped server left behind
            self.port, self.log = free_port(), self.folder / f"serve-{time.monotonic_ns()}.log"
            env = {**os.environ, "MLFLOW_TRACKING_URI": self.registry.url, "LORAFLOW_TEST_API_KEY": API_KEY}
            with open(self.log, "w") as out:
                config = _serve_config(self.folder, self.port, self.lora_store, models=[NAME, SECOND, LATER])
                self.proc = subprocess.Popen([*entry_point("serve"), "--config", config],
                                             cwd=ROOT,
                                             env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + 600
            while '"serving"' not in self.log.read_text(errors="replace"):
                assert self.proc.poll() is None, self.log.read_text(errors="replace")[-5000:]
                assert time.monotonic() < deadline, "serve did not come up in 10 minutes"
                time.sleep(2)
        return self.proc, self.port, self.log

    def kill(self) -> None:
        """Every process of its session: serve, its S3 server and Ray's, which outlive a killed serve."""
        if self.proc is not None:
            _kill_session(self.proc.pid)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def lora_store():
    """The module server's LoRA store: a bucket on an S3 server of the tests' own, so that a test can
    change it as an intruder would (serve's own local S3 server: the mlflow run test)."""
    with s3_server() as endpoint:
        environment = pytest.MonkeyPatch()  # the server inherits these
        for key, value in {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "test",
                           "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
                           "AWS_DEFAULT_REGION": "us-east-1"}.items():
            environment.setenv(key, value)
        import boto3

        boto3.client("s3").create_bucket(Bucket="serve-test")
        yield "s3://serve-test/adapters"
        environment.undo()


@pytest.fixture(scope="module")
def serve_process(registry, lora_store, tmp_path_factory):
    serving = ServeProcess(registry, tmp_path_factory.mktemp("serve"), lora_store)
    yield serving
    serving.kill()


@pytest.fixture
def server(serve_process):
    """The server, with v1 in Production and under the stable name: every test starts from there,
    whichever tests ran before it (they promote, take the registry away, stop the server)."""
    proc, port, log = serve_process.running()
    _no_rollout()
    if MlflowClient().get_model_version_by_alias(NAME, "production").version != "1":
        assert entry_points.main("promote", ["--name", NAME, "--version", "1", "--reason", "serve test: start from v1"]) == 0
    status = _wait_for_status(port, lambda s: (s["serving"], s["registry"]["state"], s["canary"])
                              == (f"{NAME}-v1", "ok", None), 120)
    assert (status["serving"], status["registry"]["state"], status["canary"]) == (f"{NAME}-v1", "ok", None), status
    return proc, port, log


def _no_rollout() -> None:
    """No canary under way, and none's outcome left on v2 (the canary tests read it)."""
    store = MlflowClient()
    rollout = registry_contract.rollout(store, NAME)
    if rollout is not None:
        assert entry_points.main("promote", ["--name", NAME, "--version", rollout["version"], "--stage", "Canary",
                             "--weight", "0"]) == 0
    for key in store.get_model_version(NAME, "2").tags:
        if key.startswith(registry_contract.CANARY_TAG_PREFIX):
            store.delete_model_version_tag(NAME, "2", key)


def client(port: int, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)


def ask(port: int, model: str = STABLE, max_tokens: int = 8, **kwargs):
    return client(port).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Blizzard North made Diablo II."}],
        max_tokens=max_tokens, temperature=0.0, **kwargs)


def test_models_lists_base_adapter_and_stable_name(server):
    """The stable name always; its version's own id once published (at its first request)."""
    _, port, _ = server
    assert ask(port).parse().model == f"{MODEL_ID}:{NAME}-v1"
    listed = {m.id: m for m in client(port).models.list().data}
    assert {MODEL_ID, f"{MODEL_ID}:{NAME}-v1", STABLE} <= set(listed)
    status = listed[STABLE].model_extra["metadata"]["loraflow"]
    assert status["serving"] == f"{NAME}-v1" and status["registry"]["state"] == "ok"


def test_two_tasks_are_served_at_once_and_models_come_and_go_while_serving(server, registry, tmp_path):
    """One server follows three registered models: viggo-tiny-lora (viggo-mr), SECOND (viggo-nlg, on
    another adapter) and LATER (not registered yet). Each stable name answers with its own version
    and prompt; promoting viggo-tiny-lora leaves SECOND's answers byte-identical; LATER answers 404
    saying why until it is registered and promoted, then serves, and goes again once deleted."""
    _, port, _ = server
    listed = {m.id: m for m in client(port).models.list().data}
    assert f"{MODEL_ID}:production" not in listed  # with several models, each is asked for by its name
    status = listed[f"{MODEL_ID}:{SECOND}"].model_extra["metadata"]["loraflow"]
    assert (status["serving"], status["registry"]["state"]) == (f"{SECOND}-v1", "ok")
    inputs = ["inform(name[Diablo II], developer[Blizzard North])", "request(specifier[exciting])"]

    def answers(model: str) -> list[tuple]:
        done = [client(port).chat.completions.create(model=model, max_tokens=8, temperature=0.0,
                                                     messages=[{"role": "user", "content": text}]) for text in inputs]
        return [(a.model, a.choices[0].message.content, a.usage.prompt_tokens) for a in done]

    before = answers(f"{MODEL_ID}:{SECOND}")  # published at its first request
    assert {model for model, _, _ in before} == {f"{MODEL_ID}:{SECOND}-v1"}
    card = {m.id: m for m in client(port).models.list().data}[f"{MODEL_ID}:{SECOND}-v1"]
    assert (card.model_extra["metadata"]["loraflow"]["task"], card.model_extra["metadata"]["loraflow"]["instruction"]) \
        == ("viggo-nlg", NLG_INSTRUCTION)
    mr = answers(STABLE)  # the same inputs, each version's own prompt: as many more tokens as the instructions differ
    assert [tokens for _, _, tokens in before] != [tokens for _, _, tokens in mr]
    with pytest.raises(openai.NotFoundError) as missing:
        ask(port, f"{MODEL_ID}:{LATER}")
    assert f"There is no registered model '{LATER}'" in missing.value.message

    assert entry_points.main("promote", ["--name", NAME, "--version", "2", "--reason", "serve test: two models"]) == 0
    assert _wait_for_status(port, lambda s: s["serving"] == f"{NAME}-v2")["serving"] == f"{NAME}-v2"
    assert answers(f"{MODEL_ID}:{SECOND}") == before

    store = MlflowClient()
    later = _register_like(store, store.get_model_version(NAME, "2"), tmp_path, name=LATER)
    assert entry_points.main("promote", ["--name", LATER, "--version", later]) == 0
    status = _wait_for_status(port, lambda s: s["serving"] == f"{LATER}-v1", name=LATER)
    assert status["serving"] == f"{LATER}-v1", status
    assert ask(port, f"{MODEL_ID}:{LATER}").parse().model == f"{MODEL_ID}:{LATER}-v1"
    store.delete_registered_model(LATER)
    status = _wait_for_status(port, lambda s: s["serving"] is None, name=LATER)
    assert status["why_not"].startswith(f"There is no registered model '{LATER}'"), status
    with pytest.raises(openai.NotFoundError):
        ask(port, f"{MODEL_ID}:{LATER}")


def test_the_version_card_names_its_prompt_and_a_chat_with_its_own_system_message_goes_as_sent(server, registry):
    """The version's prompt is served with it (that its answers are then evaluate's, byte for byte,
    is the parity check's: test_deliver.py). /v1/models names v1's task and prompt; a chat with a
    system message of its own goes as sent."""
    _, port, _ = server
    v1 = MlflowClient().get_model_version(NAME, "1")
    first = json.loads((ROOT / "data/viggo/test.jsonl").open().readline())
    sampling = {"temperature": 0.0, "max_tokens": 24}
    served = client(port).chat.completions.create(model=f"{MODEL_ID}:{NAME}-v1", **sampling,
                                                  messages=[{"role": "user", "content": first["input"]}])
    card = {m.id: m for m in client(port).models.list().data}[f"{MODEL_ID}:{NAME}-v1"]  # listed once published
    assert card.model_extra["metadata"]["loraflow"] == {"task": "viggo-mr", "prompt": v1.tags["loraflow.prompt"],
                                                        "instruction": first["instruction"]}
    own = client(port).chat.completions.create(model=f"{MODEL_ID}:{NAME}-v1", **sampling, messages=[
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": first["input"]}])
    assert own.usage.prompt_tokens < served.usage.prompt_tokens - 100  # no instruction added (it has ~160 tokens)


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


def test_a_pinned_version_is_routed_under_the_stable_name_whatever_the_alias(registry, lora_store):
    """`-P version=2` while v1 is in Production (or the other way round): the follower routes the stable name (and
    `<model_id>:production`, one model followed) to v2, published in the store at its first
    request, and never to the alias's version. (The follower alone, on the module's registry and LoRA store: the stable name's
    routes reach an engine in every other test.)"""
    from loraflow import adapter_store
    from loraflow.serving_follower import RegistryFollower
    from loraflow.serving_routes import FirstUse, route

    production = MlflowClient().get_model_version_by_alias(NAME, "production").version
    pinned = MlflowClient().get_model_version(NAME, "2" if production == "1" else "1")
    follower = RegistryFollower(base_id=MODEL_ID, models=[NAME], alias="production", pinned_version=pinned.version,
                                base_model_id=pinned.tags[registry_contract.BASE_MODEL_ID_TAG],
                                store=adapter_store.LoraStore(f"{lora_store}-pinned", {}), accounting=None,
                                warm_up=None, finish_canary=None)
    follower.poll(warm_up=False)
    with pytest.raises(FirstUse):  # published at its first request
        route(follower.table, STABLE)
    follower.publish_first_use(NAME)
    for asked in (STABLE, f"{MODEL_ID}:production"):
        routed = route(follower.table, asked)
        assert (routed.engine_model, routed.kind) == (f"{MODEL_ID}:{NAME}-v{pinned.version}", "production")


MANY = [f"viggo-many-{i:02d}" for i in range(24)]


def _register_many(tmp_path) -> None:
    """24 registered models in Production, each v1's adapter with a random lora_B of twice its spread:
    weights of their own, on the tiny model's base (scaled copies of one lora_B answer alike: the
    tiny model's bf16 log-probabilities saturate)."""
    import mlflow
    import torch
    from safetensors.torch import load_file, save_file

    from loraflow import registry, registry_changes

    v1 = MlflowClient().get_model_version(NAME, "1")
    source = Path(mlflow.artifacts.download_artifacts(artifact_uri=v1.source, dst_path=str(tmp_path / "v1")))
    weights = load_file(source / "adapter_model.safetensors")
    for i, name in enumerate(MANY):
        folder = tmp_path / name
        folder.mkdir()
        for file in source.iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
        seed = torch.Generator().manual_seed(i)
        save_file({key: torch.randn(value.shape, generator=seed).to(value.dtype) * 2 * value.float().std()
                   if ".lora_B." in key else value for key, value in weights.items()},
                  str(folder / "adapter_model.safetensors"))
        with mlflow.start_run(run_name=f"copy-{name}") as run:
            mlflow.log_artifacts(str(folder), registry.ADAPTER_ARTIFACT_PATH)
        version = registry.register_adapter(name, run.info.run_id, dict(v1.tags), "serve test: many models",
                                            registry.file_digests(folder))
        registry_changes.promote(name, str(version.version), "Production", "serve test: many models", True,
                                 str(ROOT / "configs/promote/default.yaml"))


def _top_logprobs(answer) -> tuple[tuple[str, float], ...]:
    """The first token's five likeliest tokens and their log-probabilities: a fingerprint of the
    weights that answered (adapters that make one token near certain still differ in the others)."""
    return tuple((top.token, top.logprob) for top in answer.choices[0].logprobs.content[0].top_logprobs)


def _alike(a: tuple, b: tuple) -> bool:
    """The same five tokens, each as likely (batching changes the float sums a little; ties may swap)."""
    a, b = dict(a), dict(b)
    return a.keys() == b.keys() and all(abs(a[token] - b[token]) < 0.02 for token in a)


def test_24_models_on_4_lora_slots_answer_with_their_own_weights_then_ctrl_c_stops_the_server(
        registry, lora_store, tmp_path):
    """`mlflow run . -e serve` following every registered model of the base model (`models: all`), 24
    of them in Production with weights of their own, on 4 LoRA slots per replica: each stable name
    answers with its own weights, in a random order from 4 clients, none failing, while Ray Serve
    loads and evicts adapters (its multiplexing counters). Then Ctrl-C in its terminal (SIGINT to
    the whole process group: mlflow run, serve, Ray's processes): serve shuts down, nothing prints a
    traceback, the port is closed and no process of the group is left."""
    import random

    _register_many(tmp_path)
    port, metrics_port = free_port(), free_port()
    config = yaml.safe_load(Path(_serve_config(tmp_path, port, f"{lora_store}-many")).read_text())
    config.update(models="all", metrics_export_port=metrics_port)
    config["llm_config"]["model_loading_config"]["model_source"] = MlflowClient().get_model_version(
        NAME, "1").tags[registry_contract.BASE_MODEL_TAG]  # `all`: the models of this base model
    assert config["llm_config"]["engine_kwargs"]["max_loras"] == 4
    (tmp_path / "serve-all.yaml").write_text(yaml.safe_dump(config))
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_cli), "run", ".", "-e", "serve", "--env-manager", "local",
         "-P", f"config={tmp_path / 'serve-all.yaml'}"], cwd=ROOT,
        env={**os.environ, "MLFLOW_TRACKING_URI": registry.url, "LORAFLOW_TEST_API_KEY": API_KEY},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=_as_a_terminals_job)
    output = Lines(proc)
    try:
        started = json.loads(output.until(lambda line: line.startswith('{"serving"'), timeout=600))
        [launched] = MlflowClient().search_runs(["0"], "tags.`mlflow.project.entryPoint` = 'serve'")
        assert launched.data.tags["loraflow.job"] == "serve" and started["mlflow_run"] == launched.info.run_id
        listed = {m.id for m in client(port).models.list().data}
        assert {f"{MODEL_ID}:{name}" for name in MANY} <= listed
        own = {name: _top_logprobs(ask(port, model=f"{MODEL_ID}:{name}", max_tokens=1, logprobs=True,
                                       top_logprobs=5).parse()) for name in MANY}
        alike = [(a, b) for a in MANY for b in MANY if a < b and _alike(own[a], own[b])]
        assert alike == [], f"copies that answer alike, the test cannot tell them apart: {alike[:3]}"
        order = random.Random(7).choices(MANY, k=48)
        answers, failures, lock = [], [], threading.Lock()

        def loop() -> None:
            while True:
                with lock:
                    if not order:
                        return
                    name = order.pop()
                try:
                    answer = ask(port, model=f"{MODEL_ID}:{name}", max_tokens=1, logprobs=True, top_logprobs=5).parse()
                    with lock:
                        answers.append((name, answer.model, _top_logprobs(answer)))
                except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                    with lock:
                        failures.append(repr(exc))

        workers = [threading.Thread(target=loop) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert failures == [] and len(answers) == 48
        wrong = [(name, model) for name, model, fingerprint in answers
                 if model != f"{MODEL_ID}:{name}-v1" or not _alike(fingerprint, own[name])]
        assert wrong == [], wrong[:5]
        def counters() -> tuple[float, float]:  # Ray exports them every few seconds
            return tuple(_prometheus(metrics_port, f"ray_serve_multiplexed_models_{what}_counter_total")
                         for what in ("load", "unload"))

        deadline = time.monotonic() + 60
        while not ((counted := counters())[0] >= 24 and counted[1] >= 20) and time.monotonic() < deadline:
            time.sleep(2)
        assert counted[0] >= 24 and counted[1] >= 20, counted  # 24 models through 4 slots: loads and evictions
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have failed to start
            os.killpg(proc.pid, signal.SIGINT)  # mlflow run leads its own process group, as a shell's job does
        try:
            log = output.all(timeout=120)
        except AssertionError as exc:  # name what outlived Ctrl-C, then stop it: later tests start clean
            left = _session_processes(proc.pid)
            _kill_session(proc.pid)
            raise AssertionError(f"still running 120 s after Ctrl-C: {left}") from exc
    # mlflow run says it cancels the run and exits 1 (click's "Aborted!"); serve shuts down cleanly.
    assert proc.wait(timeout=30) == 1, log[-3000:]
    assert "=== Run (ID " in log and ") interrupted, cancelling run ===" in log and "Aborted!" in log, log[-3000:]
    assert "shutting down" in log and "Traceback" not in log, log[-3000:]
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), 1):
        pass
    _assert_session_ends(proc.pid)


def test_one_model_by_id_with_the_checks_of_completions(server):
    """GET /v1/models/{id}: the stable name's card carries the registry's state; an id that is not
    a plain adapter folder in the store is refused before Ray reads {store}/{id}/adapter_config.json."""
    _, port, _ = server
    stable = client(port).models.retrieve(STABLE)
    assert stable.id == STABLE
    assert stable.model_extra["metadata"]["loraflow"]["serving"] == f"{NAME}-v1"
    assert client(port).models.retrieve(f"{MODEL_ID}:{NAME}-v1").id == f"{MODEL_ID}:{NAME}-v1"
    for adapter, status, message in [("%2e%2e", 400, "Invalid adapter id"), ("x" * 300, 400, "Invalid adapter id"),
                                     ("a/b", 400, "Invalid adapter id 'a/b'"), ("../x", 400, "Invalid adapter id"),
                                     ("s3://other-bucket/x", 400, "Invalid adapter id 's3:"),
                                     ("no-such-adapter", 404, "Unknown adapter 'no-such-adapter'")]:
        with pytest.raises(openai.APIStatusError) as caught:
            client(port).models.retrieve(f"{MODEL_ID}:{adapter}")
        assert (caught.value.status_code, message in caught.value.message) == (status, True), caught.value.message


def test_the_api_key_reaches_no_ray_process(server):
    """Ray's processes inherit serve's environment; the key is taken out of it before Ray starts
    (the replicas get its SHA-256)."""
    proc, _, _ = server
    started = [pid for pid in _session_pids(proc.pid) if pid != proc.pid]  # everything serve started
    commands = b" ".join(_read(f"/proc/{pid}/cmdline") for pid in started)
    assert all(name in commands for name in (b"gcs_server", b"raylet", b"ServeReplica"))
    holding = [pid for pid in started if API_KEY.encode() in _read(f"/proc/{pid}/environ")]
    assert holding == []


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # the process ended meanwhile
        return b""


def test_health_endpoint(server):
    _, port, _ = server
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/healthz", timeout=30) as response:
        assert response.status == 200


def test_streaming_chat(server):
    _, port, _ = server
    stream = client(port).chat.completions.create(
        model=STABLE, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, stream=True)
    chunks = list(stream)
    assert len(chunks) > 1
    assert {chunk.model for chunk in chunks} == {f"{MODEL_ID}:{NAME}-v1"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.parametrize("path, body", [
    ("/v1/models", None), (f"/v1/models/{STABLE}", None), (f"/v1/models/{MODEL_ID}", None),
    ("/v1/chat/completions", {"model": STABLE, "messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": 2}),
    ("/v1/completions", {"model": STABLE, "prompt": "hi", "max_tokens": 2}),
    ("/v1/embeddings", {"model": STABLE, "input": "hi"}),
    ("/tokenize", {"model": STABLE, "prompt": "hi"}),
    ("/detokenize", {"model": STABLE, "tokens": [1, 2]}),
], ids=["models", "model-stable", "model-base", "chat", "completions", "embeddings", "tokenize", "detokenize"])
@pytest.mark.parametrize("key", [None, "wrong"])
def test_every_route_needs_the_api_key(server, path, body, key):
    _, port, _ = server
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers,
                                     data=None if body is None else json.dumps(body).encode())
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 401
    assert "Missing or wrong API key: send `Authorization: Bearer <key>`." in caught.value.read().decode()


@pytest.mark.parametrize(
    "adapter, status",
    [("../../etc", 400), ("s3://other-bucket/adapter", 400), ("viggo-tiny-lora-v1/../x", 400),
     ("%2e%2e", 400), ("no-such-adapter", 404), ("x" * 300, 400), ("a/b", 400)],
)
def test_bad_adapter_ids_are_refused(server, adapter, status):
    _, port, _ = server
    with pytest.raises(openai.APIStatusError) as caught:
        ask(port, model=f"{MODEL_ID}:{adapter}")
    assert caught.value.status_code == status
    expected = (f"Invalid adapter id {adapter!r}: use a name listed by /v1/models." if status == 400 else
                f"Unknown adapter {adapter!r}: /v1/models lists what is served.")
    assert expected in caught.value.message, caught.value.message


def test_oversized_prompt_is_refused_with_the_limit(server):
    """A prompt longer than the engine's max_model_len (1024 tokens) gets a 400 naming the limit."""
    _, port, _ = server
    with pytest.raises(openai.BadRequestError) as refused:
        client(port).chat.completions.create(
            model=STABLE, max_tokens=8,
            messages=[{"role": "user", "content": "Diablo II was made by Blizzard North. " * 400}])
    assert "1024" in refused.value.message
    assert ask(port).parse().model == f"{MODEL_ID}:{NAME}-v1"  # and the server carries on


@pytest.mark.parametrize(
    "args, message",
    [(["--name", "no-such-model"], "There is no registered model 'no-such-model'"),
     (["--name", NAME, "--alias", "staging"], f"{NAME} has no version with the alias 'staging' yet: promote one "
                                              f"first, e.g. `mlflow run . -e promote -P name={NAME} -P version=N "
                                              "-P stage=Staging`."),
     (["--name", NAME, "--version", "7"], f"{NAME} has no version 7; it has versions 1, 2")],  # 3, ... if promoted
)
def test_nothing_to_serve_is_a_clear_error(registry, args, message):
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry.url}
    proc = subprocess.run([*entry_point("serve"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr


@pytest.mark.parametrize(
    "changes, message",
    [({"host": "0.0.0.0"}, "Refusing to serve on 0.0.0.0 without an API key: anyone who can reach it could use "
                           "it. Set LORAFLOW_TEST_API_KEY to a key, or serve on 127.0.0.1, or set "
                           "allow_unauthenticated: true in the serving config."),
     ({"allow_unauthenticated": "maybe"}, "allow_unauthenticated should be a valid boolean, got 'maybe'; see "
                                          "configs/serve/default.yaml.")],
)
def test_unsafe_serving_configs_are_refused(registry, tmp_path, changes, message):
    config = _serve_config(tmp_path, free_port())
    raw = {**yaml.safe_load(open(config)), **changes}
    with open(config, "w") as f:
        yaml.safe_dump(raw, f)
    env = {k: v for k, v in os.environ.items() if k != "LORAFLOW_TEST_API_KEY"}
    proc = subprocess.run([*entry_point("serve"), "--name", NAME, "--config", config],
                          cwd=ROOT, env={**env, "MLFLOW_TRACKING_URI": registry.url}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_port_in_use_is_refused_before_anything_starts(registry, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([*entry_point("serve"), "--name", NAME,
                               "--config", _serve_config(tmp_path, port)], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "MLFLOW_TRACKING_URI": registry.url, "LORAFLOW_TEST_API_KEY": API_KEY},
                              timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (f"Cannot listen on 127.0.0.1:{port} (Address already in use): another program uses that port, or the "
            "host is not this machine's. Set port (or host) in the serving config.") in proc.stderr


def test_serving_without_a_key_beyond_loopback_needs_the_config_to_say_so(monkeypatch, capsys):
    from loraflow import serve

    monkeypatch.delenv("LORAFLOW_TEST_API_KEY", raising=False)
    config = serve.load_config(str(ROOT / "configs/serve/default.yaml")).model_copy(
        update={"api_key_env": "LORAFLOW_TEST_API_KEY", "host": "0.0.0.0", "allow_unauthenticated": True})
    assert serve.take_api_key(config) == ""
    assert capsys.readouterr().err == ("warning: serving on 0.0.0.0 without an API key "
                                       "(set LORAFLOW_TEST_API_KEY to require one)\n")
    assert serve.take_api_key(config.model_copy(update={"host": "127.0.0.1", "allow_unauthenticated": False})) == ""
    assert "warning: serving on 127.0.0.1 without an API key" in capsys.readouterr().err
    monkeypatch.setenv("LORAFLOW_TEST_API_KEY", "k-1")
    assert serve.take_api_key(config) == "k-1" and "LORAFLOW_TEST_API_KEY" not in os.environ


def answer_of(port: int, model: str) -> tuple[str, float]:
    """A greedy answer's first token and its log-probability: a fingerprint of the weights that
    answered (two adapters that agree on the token still differ in its probability)."""
    first = ask(port, model=model, max_tokens=1, logprobs=True).parse().choices[0].logprobs.content[0]
    return first.token, first.logprob


def same_weights(a: tuple[str, float], b: tuple[str, float]) -> bool:
    return a[0] == b[0] and abs(a[1] - b[1]) < 1e-3  # batching changes the float sums a little


class Answer(NamedTuple):
    model: str  # the version that answered, as the response names it
    fingerprint: tuple[str, float]  # the first token and its logprob: which weights produced it
    sent: float  # monotonic times
    received: float


def _load(port: int, requests: int, clients: int, on_done=None) -> tuple[list[Answer], list[str]]:
    """Send `requests` short chat requests from `clients` threads; returns the answers in the order
    they came back, and the failures."""
    served, failures = [], []
    lock = threading.Lock()
    left = iter(range(requests))

    def loop() -> None:
        while True:
            with lock:
                if next(left, None) is None:
                    return
            try:
                sent = time.monotonic()
                answer = ask(port, max_tokens=1, logprobs=True).parse()
                first = answer.choices[0].logprobs.content[0]
                with lock:
                    served.append(Answer(answer.model, (first.token, first.logprob), sent, time.monotonic()))
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
    and never back, and every answer comes from the weights of the version it names."""
    _, port, _ = server
    promotion: list[subprocess.Popen] = []

    def promote_at_100(done: int) -> None:
        if done == 100:
            promotion.append(subprocess.Popen(
                [*entry_point("promote"), "--name", NAME, "--version", "2",
                 "--reason", "serve test"], cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": registry.url},
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

    started = time.monotonic()
    served, failures = _load(port, 1000, 4, promote_at_100)
    [promoter] = promotion
    assert promoter.wait(timeout=120) == 0, promoter.communicate()[0]
    assert failures == [] and len(served) == 1000
    models = [answer.model for answer in served]
    assert models.count(f"{MODEL_ID}:{NAME}-v2") >= 10, "the promotion was never picked up"
    first_v2 = models.index(f"{MODEL_ID}:{NAME}-v2")
    # Requests sent before the switch may come back after it, even after several v2 answers (the
    # engine schedules them as it likes); none sent after the first v2 answer came back may be v1's.
    switched = served[first_v2].received
    late_v1 = [i for i, answer in enumerate(served) if answer.model.endswith("-v1") and answer.sent > switched]
    assert late_v1 == [], f"v1 answered requests sent after v2 had answered: {late_v1[:5]}"
    # Each version asked for by its own id (v2's adapter is in the store once it was promoted).
    own = {f"{MODEL_ID}:{NAME}-v{v}": answer_of(port, f"{MODEL_ID}:{NAME}-v{v}") for v in (1, 2)}
    assert not same_weights(*own.values()), f"the two trainings answer alike, the test cannot tell them apart: {own}"
    wrong = [(i, answer.model, answer.fingerprint) for i, answer in enumerate(served)
             if not same_weights(answer.fingerprint, own[answer.model])]
    assert wrong == [], f"answers not from the weights of the version they name: {wrong[:5]} (own: {own})"
    print(f"1000 requests in {time.monotonic() - started:.0f} s, 0 failed, v2 from request {first_v2 + 1}")


def _stable_status(port: int, name: str = NAME) -> dict:
    listed = {m.id: m for m in client(port).models.list().data}
    return listed[f"{MODEL_ID}:{name}"].model_extra["metadata"]["loraflow"]


def _wait_for_status(port: int, done, timeout: float = 60, name: str = NAME) -> dict:
    deadline = time.monotonic() + timeout
    while not done(status := _stable_status(port, name)) and time.monotonic() < deadline:
        time.sleep(1)
    return status


def _register_like(store: MlflowClient, v2, tmp_path, name: str = NAME, **changes) -> str:
    """A version of `name` made from v2's adapter with `changes` to its adapter_config.json or tags,
    registered (with its own digests) and evaluated like a good one."""
    import mlflow

    from loraflow import registry

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=v2.source, dst_path=str(tmp_path)))
    adapter_config = json.loads((local / "adapter_config.json").read_text())
    adapter_config.update(changes.pop("adapter_config", {}))
    (local / "adapter_config.json").write_text(json.dumps(adapter_config))
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(local), registry.ADAPTER_ARTIFACT_PATH)
    version = registry.register_adapter(name, run.info.run_id, {**v2.tags, **changes}, "serve test",
                                        registry.file_digests(local))
    record_evaluation(name, str(version.version), GOOD, "serve-test")
    return str(version.version)


@pytest.mark.parametrize("changes, refusal", [
    ({"loraflow.base_model_id": "another-model@sha256:0123456789abcdef"},
     "was trained on another-model@sha256:0123456789abcdef, but the base model here is tiny-smollm2@sha256:"),
    ({"adapter_config": {"r": 64, "lora_alpha": 128}}, "failed to load"),  # rank 64 > the engine's max_lora_rank 16
], ids=["another-base-model", "fails-to-load"])
def test_a_promoted_version_that_cannot_serve_is_refused_and_the_last_good_keeps_serving(
        server, registry, tmp_path, changes, refusal):
    """A version trained on another base model, or whose adapter the engine cannot load, is
    promoted: the watcher refuses it (the latter at the warm-up request), /v1/models says why,
    and the stable name stays on v1; v1 is promoted again afterwards."""
    _, port, _ = server
    store = MlflowClient()
    bad = _register_like(store, store.get_model_version(NAME, "2"), tmp_path, **changes)
    assert entry_points.main("promote", ["--name", NAME, "--version", bad, "--reason", "serve test: a version that cannot serve"]) == 0
    status = _wait_for_status(port, lambda s: s["registry"]["state"] == "error", timeout=120)
    assert status["registry"]["state"] == "error" and refusal in status["registry"]["error"], status
    assert f"{NAME}-v{bad}" in status["registry"]["error"] and status["serving"] == f"{NAME}-v1"
    served, failures = _load(port, 10, 2)
    assert failures == [] and {answer.model for answer in served} == {f"{MODEL_ID}:{NAME}-v1"}
    assert entry_points.main("promote", ["--name", NAME, "--version", "1", "--reason", "serve test: back to v1"]) == 0
    status = _wait_for_status(port, lambda s: s["registry"]["state"] == "ok")
    assert (status["registry"]["state"], status["registry"]["version"], status["serving"]) == ("ok", "1", f"{NAME}-v1")


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


def test_registry_unreachable_keeps_serving_and_reports_it(server, registry):
    """The tracking server goes away: the last good adapter keeps answering, and /v1/models says
    that the registry cannot be reached; once it is back, the watcher says so."""
    _, port, _ = server
    registry.stop()
    try:
        status = _wait_for_status(port, lambda s: s["registry"]["state"] == "error")
        assert status["registry"]["state"] == "error" and status["registry"]["error"], status
        assert status["serving"] == f"{NAME}-v1"
        served, failures = _load(port, 20, 2)
        assert failures == [] and {answer.model for answer in served} == {f"{MODEL_ID}:{NAME}-v1"}
    finally:
        registry.start()
    status = _wait_for_status(port, lambda s: s["registry"]["state"] == "ok")
    assert (status["registry"]["state"], status["serving"]) == ("ok", f"{NAME}-v1"), status


def _canary_config(tmp_path: Path, **policy) -> str:
    """configs/promote/default.yaml with these rollout settings."""
    raw = yaml.safe_load((ROOT / "configs/promote/default.yaml").read_text())
    raw["rollout"] = {**raw["rollout"], **policy}
    path = tmp_path / "promote.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _start_canary(tmp_path: Path, weight: str, **policy) -> dict:
    assert entry_points.main("promote", ["--name", NAME, "--version", "2", "--stage", "Canary", "--weight", weight,
                         "--config", _canary_config(tmp_path, **policy), "--reason", "serve test"]) == 0
    return registry_contract.rollout(MlflowClient(), NAME)


def test_a_canary_splits_the_stable_name_and_survives_a_restart(server, serve_process, registry, tmp_path):
    """v2 as a 50% canary: 200 requests from 4 clients all succeed and are labelled, both versions
    answer in about equal shares, a request key always lands on the same version, a version asked
    for by its id is not split, /v1/models shows the rollout and each version's live figures. The
    server is then stopped as systemd stops a service, SIGTERM to its whole process group (serve and
    Ray's processes at once): Serve and Ray shut down without waiting on Serve's stopped controller,
    exit 0, the port is closed, no process of serve's session is left, its MLflow run ends FINISHED.
    Started again, it reads the same rollout from the registry (the server keeps none of it) and
    splits again. weight=0 stops it."""
    proc, port, log = server
    rollout = _start_canary(tmp_path, "0.5", min_requests=100_000)  # never judged here
    status = _wait_for_status(port, lambda s: s["canary"] is not None)
    assert status["canary"] == {"version": "2", "serving": f"{NAME}-v2", "weight": 0.5,
                                "started_at": rollout["started_at"]}
    assert MlflowClient().get_model_version_by_alias(NAME, registry_contract.CANARY_ALIAS).version == "2"
    with chromium() as browser:  # what a person sees in the MLflow UI (docs/canary.md shows it)
        page_text(browser, f"{registry.url}/#/models/{NAME}", ["Version 1", "@ production", "@ canary"],
                  "mlflow-canary-model.png")
    served, failures = _load(port, 200, 4)
    assert failures == [] and len(served) == 200
    share = sum(answer.model == f"{MODEL_ID}:{NAME}-v2" for answer in served) / 200
    # 200 draws at 0.5: the standard deviation of the share is 0.035; 0.15 is over 4 of them.
    assert {answer.model for answer in served} == {f"{MODEL_ID}:{NAME}-v1", f"{MODEL_ID}:{NAME}-v2"}
    assert 0.35 <= share <= 0.65, share
    for key in ("alice", "bob", "carol"):
        side = f"{MODEL_ID}:{NAME}-v{2 if canary.takes_candidate(0.5, key) else 1}"
        by_user = {ask(port, max_tokens=1, user=key).parse().model for _ in range(4)}
        by_header = {ask(port, max_tokens=1, extra_headers={"x-loraflow-route-key": key}).parse().model
                     for _ in range(4)}
        assert by_user == by_header == {side}, (key, by_user, by_header)
    assert {ask(port, model=f"{MODEL_ID}:{NAME}-v1", max_tokens=1).parse().model for _ in range(10)} \
        == {f"{MODEL_ID}:{NAME}-v1"}

    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text(errors="replace")[-3000:]
    assert _serving_run(log).info.status == "FINISHED"
    said = log.read_text(errors="replace")
    assert "shutting down" in said and "Traceback" not in said and "Controller failed to shut down" not in said, \
        said[-3000:]
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), 1):
        pass
    _assert_session_ends(proc.pid)
    _, port, _ = serve_process.running()
    status = _wait_for_status(port, lambda s: s["canary"] is not None)
    assert status["canary"] == {"version": "2", "serving": f"{NAME}-v2", "weight": 0.5,
                                "started_at": rollout["started_at"]}
    served, failures = _load(port, 100, 4)
    assert failures == [] and {answer.model for answer in served} == {f"{MODEL_ID}:{NAME}-v1", f"{MODEL_ID}:{NAME}-v2"}
    live = _stable_status(port)["live"]
    counted = {version: sum(answer.model == f"{MODEL_ID}:{NAME}-{version}" for answer in served)
               for version in ("v1", "v2")}
    for version, requests in counted.items():
        figures = live[f"{NAME}-{version}"]  # since the restart: only these requests
        assert (figures["requests"], figures["errors"], figures["output_tokens"], figures["scored"]) \
            == (requests, 0, requests, requests), figures
        assert figures["parse_validity"] == 0.0  # the tiny model's one-token answers are no meaning representation
        assert 0 < figures["p50_ms"] <= figures["p95_ms"]

    # The server's own MLflow run (it was not started by `mlflow run`) gets the figures over time.
    run = _serving_run(serve_process.log)
    assert (run.info.run_name, run.info.status, run.data.tags["loraflow.job"]) == \
        (f"serve-{NAME}+{SECOND}+{LATER}@production", "RUNNING", "serve")
    assert run.data.tags["mlflow.user"]  # who started the server
    assert MlflowClient().get_experiment(run.info.experiment_id).name == NAME  # the model's own experiment
    for version, requests in counted.items():
        history = _wait_for_metric(run.info.run_id, f"live.{NAME}-{version}.requests", requests)
        assert history[-1].value == requests and [m.step for m in history] == sorted(m.step for m in history)
    assert _wait_for_metric(run.info.run_id, f"live.{NAME}.canary_weight", 0.5)[-1].value == 0.5

    assert entry_points.main("promote", ["--name", NAME, "--version", "2", "--stage", "Canary", "--weight", "0",
                         "--reason", "serve test: stop"]) == 0
    assert _wait_for_status(port, lambda s: s["canary"] is None)["canary"] is None
    assert {answer.model for answer in _load(port, 20, 2)[0]} == {f"{MODEL_ID}:{NAME}-v1"}
    tags = MlflowClient().get_model_version(NAME, "2").tags
    assert (tags["loraflow.canary.result"], tags["loraflow.canary.reason"]) == ("stopped", "serve test: stop")
    assert registry_contract.rollout(MlflowClient(), NAME) is None


def _serving_run(log: Path):
    started = next(line for line in log.read_text(errors="replace").splitlines() if line.startswith('{"serving"'))
    return MlflowClient().get_run(json.loads(started)["mlflow_run"])


def _wait_for_metric(run_id: str, key: str, value: float, timeout: float = 30) -> list:
    deadline = time.monotonic() + timeout
    while (not (history := MlflowClient().get_metric_history(run_id, key)) or history[-1].value != value) \
            and time.monotonic() < deadline:
        time.sleep(1)
    return history


def _wait_for_rollout_end(timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while registry_contract.rollout(MlflowClient(), NAME) is not None and time.monotonic() < deadline:
        time.sleep(1)


def test_a_canary_whose_answers_do_not_parse_is_rolled_back_while_clients_send(server, registry, tmp_path):
    """A policy that asks for half of the answers to parse: the candidate's do not (the tiny model's
    one-token answers), so after 20 of them the server rolls it back, under load: no request fails,
    the registry records the live figures and why, v2 keeps its stage, and v1 then answers all.
    While the registry cannot take the verdict (its lock held elsewhere), the candidate serves nothing."""
    _, port, _ = server
    _start_canary(tmp_path, "0.5", min_requests=20, min_parse_validity=0.5, max_p95_ratio=100.0)
    _wait_for_status(port, lambda s: s["canary"] is not None)
    # Asked for by its id, the candidate is answered, but its judgement counts only the stable name's traffic.
    assert {ask(port, model=f"{MODEL_ID}:{NAME}-v2", max_tokens=1).parse().model for _ in range(30)} \
        == {f"{MODEL_ID}:{NAME}-v2"}
    time.sleep(3)  # three polls
    assert registry_contract.rollout(MlflowClient(), NAME) is not None
    with locked(MlflowClient(), NAME):  # the verdict waits for the registry
        served, failures = _load(port, 200, 4)
        status = _wait_for_status(port, lambda s: s["canary"] is None)
        assert status["canary"] is None and registry_contract.rollout(MlflowClient(), NAME) is not None
        assert {answer.model for answer in _load(port, 20, 2)[0]} == {f"{MODEL_ID}:{NAME}-v1"}
    _wait_for_rollout_end()
    assert failures == [] and len(served) == 200
    store = MlflowClient()
    assert registry_contract.rollout(store, NAME) is None
    v2 = store.get_model_version(NAME, "2")
    assert registry_contract.CANARY_ALIAS not in v2.aliases and v2.current_stage != "Production"
    assert v2.tags["loraflow.canary.result"] == "rolled back"
    assert v2.tags["loraflow.canary.reason"] == "canary: parse validity 0.000 < 0.500"
    live = json.loads(v2.tags["loraflow.canary.live"])
    assert live["candidate"]["requests"] >= 20 and live["candidate"]["parse_validity"] == 0.0
    assert live["production"]["requests"] > 0
    assert "canary rolled back: canary: parse validity 0.000 < 0.500" in v2.description
    with chromium() as browser:
        page_text(browser, f"{registry.url}/#/models/{NAME}/versions/2",
                  ["loraflow.canary.result", "rolled back", "canary rolled back"], "mlflow-canary-rolled-back.png")
    assert store.get_model_version_by_alias(NAME, "production").version == "1"
    status = _wait_for_status(port, lambda s: s["canary"] is None)
    assert status["canary"] is None
    assert {answer.model for answer in _load(port, 20, 2)[0]} == {f"{MODEL_ID}:{NAME}-v1"}
    with pytest.raises(openai.NotFoundError, match=f"Unknown adapter '{NAME}-v2'"):  # no longer served by id either
        ask(port, model=f"{MODEL_ID}:{NAME}-v2")


def test_a_canary_that_holds_steps_up_and_is_promoted(server, tmp_path):
    """A candidate that holds at 50% moves to 100%, holds again and is promoted to Production by the
    server, through promote's gate and lock: v1 archived, the audit tags carry the live figures, the
    stable name follows, no request fails."""
    _, port, _ = server
    _start_canary(tmp_path, "0.5", steps=[1.0], min_requests=20, min_parse_validity=0.0, max_validity_drop=1.0,
                  max_p95_ratio=100.0)
    served, failures = [], []
    while registry_contract.rollout(MlflowClient(), NAME) is not None and len(served) < 2000:
        # Load until the server ends the rollout: each share counts only what it serves after the
        # poll that set it, so how many requests that takes depends on how fast this machine is.
        more, failed = _load(port, 100, 4)
        served, failures = served + more, failures + failed
    assert failures == [] and registry_contract.rollout(MlflowClient(), NAME) is None
    store = MlflowClient()
    v1, v2 = (store.get_model_version(NAME, version) for version in ("1", "2"))
    assert (v1.current_stage, v2.current_stage) == ("Archived", "Production")
    assert store.get_model_version_by_alias(NAME, "production").version == "2"
    assert registry_contract.CANARY_ALIAS not in v2.aliases and registry_contract.rollout(store, NAME) is None
    assert (v2.tags["loraflow.promotion.stage"], v2.tags["loraflow.promotion.gate"]) == ("Production", "passed")
    assert v2.tags["loraflow.promotion.reason"].startswith("canary: held at 100% over ")
    assert json.loads(v2.tags["loraflow.promotion.live"])["candidate"]["requests"] >= 20
    assert v2.tags["loraflow.canary.result"] == "promoted"
    assert "canary: 50% -> 100% (held at 50% over " in v2.description
    assert _wait_for_status(port, lambda s: s["serving"] == f"{NAME}-v2")["serving"] == f"{NAME}-v2"
    assert {answer.model for answer in _load(port, 20, 2)[0]} == {f"{MODEL_ID}:{NAME}-v2"}


def _prometheus(port: int, name: str, **labels: str) -> float:
    """A series' value on Ray's metrics endpoint, summed over the lines with these labels (0 before
    it exists)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + "{") and all(f'{key}="{value}"' in line for key, value in labels.items())]
    return sum(values)


def _settled(read, interval: float = 12, timeout: float = 90):
    """A reading that two reads one export interval apart agree on (Ray exports every few seconds:
    the requests of the test before may not be in the first read)."""
    deadline, last = time.monotonic() + timeout, read()
    while time.monotonic() < deadline:
        time.sleep(interval)
        if (now := read()) == last:
            return now
        last = now
    raise AssertionError(f"metrics did not settle in {timeout} s: {last}")


def test_live_figures_are_prometheus_metrics_on_rays_endpoint(server, serve_process):
    """ray_loraflow_* series per version and route on the local Ray instance's metrics port: each
    request counted once, the histogram's count with it, the validity as scored and valid answers."""
    _, port, _ = server
    metrics_port = yaml.safe_load((serve_process.folder / "serve.yaml").read_text())["metrics_export_port"]
    series = [("ray_loraflow_requests_total", "id"), ("ray_loraflow_latency_ms_count", "id"),
              ("ray_loraflow_scored_answers_total", "id"), ("ray_loraflow_output_tokens_total", "id"),
              ("ray_loraflow_requests_total", "production")]

    def read() -> list[float]:
        return [_prometheus(metrics_port, name, adapter=f"{NAME}-v1", route=route) for name, route in series]

    before = _settled(read)
    for model in [f"{MODEL_ID}:{NAME}-v1"] * 3 + [STABLE] * 2:
        ask(port, model=model, max_tokens=1).parse()
    expected = [b + added for b, added in zip(before, (3, 3, 3, 3, 2))]
    deadline = time.monotonic() + 60  # Ray exports every few seconds
    while (now := read()) != expected and time.monotonic() < deadline:
        time.sleep(1)
    assert now == expected
    assert _prometheus(metrics_port, "ray_loraflow_valid_answers_total", adapter=f"{NAME}-v1") == 0  # none parse
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    [weight] = [line for line in text.splitlines()
                if line.startswith("ray_loraflow_canary_weight{") and f'registered_model="{NAME}"' in line]
    assert float(weight.rsplit(" ", 1)[1]) == 0.0  # no rollout (the fixture stopped any)


def test_served_requests_are_traced_with_the_version_and_export_to_a_dataset(server, registry, tmp_path):
    """With traces.sample_rate 1: each answer is a trace of the server's run, tagged with the
    version that answered, how the request reached it and the grammar's verdict, e-mail addresses
    redacted; export_traces turns them into dataset rows: v1's instruction, the client's input, the
    answer as served."""
    _, port, log = server
    since = datetime.now(timezone.utc)
    prompt = "Blizzard North made Diablo II.\nMail ann.lee@example.com about it."
    answers = []
    for model in [STABLE] * 4 + [f"{MODEL_ID}:{NAME}-v1"] * 2:
        answer = client(port).chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                      max_tokens=4, temperature=0.0)
        answers.append((answer.model, answer.choices[0].message.content))
    run = _serving_run(log)
    wanted = (f"tags.`{registry_contract.TRACE_MODEL_TAG}` = '{NAME}' "
              f"AND timestamp_ms >= {int(since.timestamp() * 1000)}")
    deadline = time.monotonic() + 60
    while len(logged := MlflowClient().search_traces(locations=[run.info.experiment_id], filter_string=wanted)) < 6 \
            and time.monotonic() < deadline:
        time.sleep(1)
    assert len(logged) == 6
    logged = sorted(logged, key=lambda trace: trace.info.request_time)
    assert [(t.info.tags[registry_contract.TRACE_VERSION_TAG], t.info.tags[registry_contract.TRACE_ADAPTER_TAG],
             t.info.tags[registry_contract.TRACE_ROUTE_TAG], t.info.tags[registry_contract.TRACE_VALID_TAG])
            for t in logged] == [("1", f"{NAME}-v1", "production", "false")] * 4 \
        + [("1", f"{NAME}-v1", "id", "false")] * 2
    assert {t.info.trace_metadata["mlflow.sourceRun"] for t in logged} == {run.info.run_id}
    span = logged[0].data.spans[0]
    assert span.inputs == {"model": STABLE, "max_tokens": 4, "temperature": 0.0,
                           "messages": [{"role": "user", "content": prompt.replace("ann.lee@example.com",
                                                                                   traces.REDACTED)}]}
    assert [t.data.spans[0].outputs["text"] for t in logged] == [text for _, text in answers]
    with chromium() as browser:  # what a person sees in the MLflow UI (docs/canary.md shows it)
        page_text(browser, f"{registry.url}/#/experiments/{run.info.experiment_id}/traces",
                  ["Traces", f"Mail {traces.REDACTED} ab"], "mlflow-served-traces.png")

    out = tmp_path / "served"
    assert entry_points.main("export_traces", ["--name", NAME, "--out", str(out), "--since", since.isoformat()]) == 0
    rows = [json.loads(line) for line in (out / "served.jsonl").read_text().splitlines()]
    instruction = json.loads((ROOT / "data/viggo/train.jsonl").open().readline())["instruction"]
    assert rows == [{"instruction": instruction, "input": prompt.replace("ann.lee@example.com", traces.REDACTED),
                     "output": text} for _, text in answers]


def _assert_session_ends(session: int) -> None:
    deadline = time.monotonic() + 30
    while (left := _session_processes(session)) and time.monotonic() < deadline:
        time.sleep(1)
    assert left == [], f"processes of the session outlived it: {left}"


def _as_a_terminals_job() -> None:
    """Ctrl-C reaches a job started from a terminal. A test run started in the background of a
    non-interactive shell (`pytest &`, nohup, some CI runners) ignores SIGINT, and every process it
    starts inherits that, Python included (it then installs no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _kill_session(session: int) -> None:
    """SIGKILL every process of a session (serve's: the server, its S3 server, Ray's)."""
    for pid in _session_pids(session):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _session_pids(session: int) -> list[int]:
    """The processes in a session (field 6 of /proc/PID/stat)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        fields = _read(f"/proc/{pid}/stat").rsplit(b")", 1)[-1].split()
        if len(fields) > 3 and int(fields[3]) == session:
            found.append(int(pid))
    return found


def _session_processes(session: int) -> list[str]:
    """The command lines of the processes in a session."""
    return [_read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace")
            for pid in _session_pids(session)]


def test_a_local_instance_listens_on_loopback_only(server):
    """Serve's session (serve, Ray's GCS, raylet, dashboard, metrics port, the engine) listens on
    loopback, and the machine's other addresses are refused on the API and metrics ports. The one
    exception is Ray Serve 2.60's own: each replica's inter-deployment gRPC server binds [::]
    (hard-coded in ray/serve/_private/replica.py); it refuses calls without Ray's token."""
    import grpc
    import psutil

    proc, port, _ = server
    session = set(_session_pids(proc.pid))
    listening = [(c.pid, c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in session]
    assert len(listening) >= 5  # the API, Ray's services and its metrics port
    others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs  # link-local ones need a scope
              if a.family in (socket.AF_INET, socket.AF_INET6) and "%" not in a.address and not _is_loopback(a.address)
              and not ipaddress.ip_address(a.address).is_link_local]
    assert others, "this machine has no address beyond loopback to try"
    beyond = [(pid, ip, listens) for pid, ip, listens in listening if not _is_loopback(ip)]
    assert all(_read(f"/proc/{pid}/cmdline").startswith(b"ray::ServeReplica:") for pid, _, _ in beyond), beyond
    for _, _, listens in beyond:
        call = grpc.insecure_channel(f"{others[0]}:{listens}").unary_unary("/ray.serve.ASGIService/HandleRequest")
        with pytest.raises(grpc.RpcError) as refused:
            call(b"", timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    metrics_port = yaml.safe_load((Path(_config_of(proc)).read_text()))["metrics_export_port"]
    for address in others:
        for target in (port, metrics_port):
            with pytest.raises(ConnectionRefusedError), socket.create_connection((address, target), timeout=5):
                pass


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def _config_of(proc: subprocess.Popen) -> str:
    cmdline = _read(f"/proc/{proc.pid}/cmdline").split(b"\0")
    return cmdline[cmdline.index(b"--config") + 1].decode()


def test_only_published_versions_are_served_and_a_changed_store_folder_is_withdrawn(server, lora_store):
    """A folder in the LoRA store that this server did not publish is not served (404, not listed);
    a published one whose files change afterwards is withdrawn (503 naming the files) on the stable
    name and by id, before any engine can load it; deleted, it is published again from the registry."""
    import boto3

    _, port, _ = server
    ask(port)  # published at its first request, if no test asked before
    bucket, _, prefix = lora_store[len("s3://"):].partition("/")
    s3 = boto3.client("s3")
    published = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{NAME}-v1/")["Contents"]]
    for key in published:  # the same files under a name loraflow never published (evaluate's run-* uploads)
        s3.copy_object(Bucket=bucket, CopySource={"Bucket": bucket, "Key": key},
                       Key=key.replace(f"{NAME}-v1/", "run-0123abcd/"))
    with pytest.raises(openai.NotFoundError, match="Unknown adapter 'run-0123abcd'"):
        ask(port, model=f"{MODEL_ID}:run-0123abcd")
    assert f"{MODEL_ID}:run-0123abcd" not in {m.id for m in client(port).models.list().data}

    s3.put_object(Bucket=bucket, Key=f"{prefix}/{NAME}-v1/adapter_config.json", Body=b'{"r": 8, "changed": true}')
    status = _wait_for_status(port, lambda s: s["registry"]["state"] == "error")
    assert "differs from the registered adapter" in status["registry"]["error"]
    for model in (STABLE, f"{MODEL_ID}:{NAME}-v1"):
        with pytest.raises(openai.InternalServerError) as refused:
            ask(port, model=model)
        assert refused.value.status_code == 503
        assert (f"{NAME}-v1 is not served: its files in the LoRA store changed after publishing "
                f"(adapter_config.json); delete {lora_store}/{NAME}-v1") in refused.value.message

    for key in published:
        s3.delete_object(Bucket=bucket, Key=key)
    status = _wait_for_status(port, lambda s: s["registry"]["state"] == "ok")
    assert status["serving"] == f"{NAME}-v1"
    assert ask(port).parse().model == f"{MODEL_ID}:{NAME}-v1"


def test_a_pathological_1mb_prompt_is_traced_cut_while_other_clients_are_answered(server):
    """Issue 36: a 1 MiB prompt that is one run of word characters without @ (quadratic for the
    e-mail pattern shipped before: its trace's redaction held the ingress's GIL for hours) is
    refused by the engine and traced cut to its first line, while 4 clients are answered, before
    and after, none failing, no trace dropped. And what docs/canary.md says reaches a trace: not
    the `user` field or the route key; no streamed answer (counted in the live figures, not scored)."""
    _, port, log = server
    first_line = "Blizzard North made Diablo II.\n"
    prompt = first_line + "a.b-c_d+" * 131_072  # and 1 MiB of one run: no @, no whitespace
    dropped = _stable_status(port)["traces_dropped"]
    since_ms = int(time.time() * 1000)
    answering, during = threading.Event(), {}
    load = threading.Thread(target=lambda: during.update(
        done=_load(port, 60, 4, on_done=lambda answered: answered >= 5 and answering.set())))
    load.start()
    assert answering.wait(timeout=120)
    with pytest.raises(openai.BadRequestError) as refused:
        client(port).chat.completions.create(model=STABLE, max_tokens=8,
                                             messages=[{"role": "user", "content": prompt}])
    assert "1024" in refused.value.message
    after = _load(port, 20, 4)  # while the refused prompt's trace is being written
    load.join(timeout=600)
    for served, failures in (during["done"], after):
        assert failures == [] and {answer.model for answer in served} == {f"{MODEL_ID}:{NAME}-v1"}
    assert (len(during["done"][0]), len(after[0])) == (60, 20)
    run = _serving_run(log)
    wanted = (f"tags.`{registry_contract.TRACE_VALID_TAG}` = 'error' AND timestamp_ms >= {since_ms}")
    deadline = time.monotonic() + 60
    while not (errors := MlflowClient().search_traces(locations=[run.info.experiment_id], filter_string=wanted)) \
            and time.monotonic() < deadline:
        time.sleep(1)
    [traced] = errors
    assert (traced.info.state.value, traced.data.spans[0].inputs["messages"]) == \
        ("ERROR", [{"role": "user", "content": f"{first_line}[... 1,048,576 characters cut]"}])

    # A streamed answer and one whose request carries a `user` field and a route key.
    before = _stable_status(port)["live"][f"{NAME}-v1"]
    since_ms = int(time.time() * 1000)
    list(client(port).chat.completions.create(model=STABLE, max_tokens=4, stream=True,
                                              messages=[{"role": "user", "content": "Streamed."}]))
    client(port).chat.completions.create(model=STABLE, max_tokens=4, temperature=0.0,
                                         messages=[{"role": "user", "content": "Keyed."}], user="client-7",
                                         extra_headers={"x-loraflow-route-key": "route-key-7"})
    live = _stable_status(port)["live"][f"{NAME}-v1"]
    assert (live["requests"] - before["requests"], live["scored"] - before["scored"]) == (2, 1)
    wanted = f"tags.`{registry_contract.TRACE_MODEL_TAG}` = '{NAME}' AND timestamp_ms >= {since_ms}"
    deadline = time.monotonic() + 60
    while not (logged := MlflowClient().search_traces(locations=[run.info.experiment_id], filter_string=wanted)) \
            and time.monotonic() < deadline:
        time.sleep(1)
    [keyed] = logged  # one at a time, in order: the stream's would have been logged before it
    assert keyed.data.spans[0].inputs == {"model": STABLE, "max_tokens": 4, "temperature": 0.0,
                                          "messages": [{"role": "user", "content": "Keyed."}]}
    assert "client-7" not in keyed.to_json() and "route-key-7" not in keyed.to_json()
    assert _stable_status(port)["traces_dropped"] == dropped
