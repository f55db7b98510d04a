"""`mlflow run . -e deliver`: new versions taken towards Production by the controller, against a real
registry. The tiny model's version (trained by the train entry point) goes the whole way with real
engines: two controllers start at once, the one that claimed it is killed mid-evaluation, the other
leaves it alone, a third takes over and delivers it once (evaluate, Staging gate, the parity check
with a server started for it: the input alone, asked by the version's id, gets evaluate's
prediction byte for byte; Production); a server whose generation defaults drifted fails the parity
check. The registry's side (a gate's refusal, a refused parity report, a person's change
mid-delivery, a canary's outcome) runs on versions registered here, each put in the state
a controller leaves it in."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml
from browser import chromium, page_text
from conftest import ROOT, config_with, copy_store, entry_point
from mlflow import MlflowClient
from servers import mlflow_server
from test_promote import add_version

from loraflow import canary, delivery, entry_points, job_configs, parity, registry, rollout

NAME = "viggo-tiny-lora"
PASSING = {"exact_match": 0.7, "parse_validity": 0.99, "slot_f1": 0.9, "rows": 1083}


def _policy(tmp_path, name: str = NAME, to: str = "Production", gates: str | None = None, parity_rows: int = 16,
            serve_changes: dict | None = None) -> str:
    """A delivery config for `name`: small evaluations (16 rows, the adapter applied per row as the
    server applies it), `gates` (default: ones the tiny model passes), a parity check of
    `parity_rows` (every answer equal) on the tiny model's server."""
    evaluate = config_with("evaluate", tmp_path, max_rows=16, merge_adapter=False,
                           sampling={"temperature": 0.0, "max_tokens": 24})
    (tmp_path / "gates.yaml").write_text(gates or "stages: {Staging: {minimum: {rows: 4}}, "
                                                  "Production: {minimum: {rows: 4}}}\nrollout: {min_requests: 5}\n")
    serve = yaml.safe_load((ROOT / "configs/serve/default.yaml").read_text())
    serve["llm_config"]["model_loading_config"]["model_id"] = "tiny"
    serve.update(serve_changes or {})
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(serve))
    path = tmp_path / f"deliver-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump({"poll_interval_s": 1, "models": {name: {
        "to": to, "evaluate_config": str(evaluate), "promote_config": str(tmp_path / "gates.yaml"),
        "parity": {"rows": parity_rows, "min_equal": 1.0, "serve_config": str(tmp_path / "serve.yaml")}}}}))
    return str(path)


def _deliver(config: str, *, wait: bool = True):
    proc = subprocess.Popen([*entry_point("deliver"), "--config", config, "--once", "true"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    if wait:
        out, _ = proc.communicate(timeout=1200)
        return proc.returncode, out
    return proc


def _evaluations(name: str, number: str) -> list[str]:
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`{registry.MODEL_REF_TAG}` = 'models:/{name}/{number}'")
    return sorted(run.info.status for run in runs)


def _state(name: str, number: str) -> tuple[str | None, dict]:
    version = MlflowClient().get_model_version(name, number)
    return version.tags.get(delivery.STATE), delivery.record_of(version)


@pytest.fixture
def tiny_store(tiny_trainings, tmp_path, monkeypatch):
    """A copy of the tiny trainings with v1 alone, new: never moved."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", copy_store(tiny_trainings, tmp_path))
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    MlflowClient().delete_model_version(NAME, "2")
    yield
    mlflow.set_tracking_uri(None)


def test_two_controllers_at_once_one_killed_mid_evaluation_deliver_a_new_version_once(tiny_store, tmp_path):
    config = _policy(tmp_path)
    started = [_deliver(config, wait=False), _deliver(config, wait=False)]
    deadline = time.monotonic() + 600
    while "RUNNING" not in _evaluations(NAME, "1"):
        assert time.monotonic() < deadline and any(p.poll() is None for p in started), \
            [p.communicate()[0][-2000:] for p in started]
        time.sleep(1)
    claimer = delivery.claim_of(MlflowClient().get_model_version(NAME, "1"))["controller"]
    [killed] = [p for p in started if f" {p.pid} " in f" {claimer} "]
    [other] = [p for p in started if p is not killed]
    killed.send_signal(signal.SIGKILL)  # the controller alone: its evaluation dies with it
    killed.wait()
    out = other.communicate(timeout=120)[0]
    assert other.returncode == 0 and "evaluating" not in out  # it left the claimed version alone
    assert _state(NAME, "1")[0] == "evaluating"

    restarted = _deliver(config, wait=False)
    out = restarted.communicate(timeout=1200)[0]
    assert restarted.returncode == 0, out
    assert f"deliver: {NAME} v1: taking over from {claimer}, which is gone (state evaluating)" in out
    assert _evaluations(NAME, "1") == ["FINISHED", "KILLED"]  # no orphan RUNNING run, one finished
    version = MlflowClient().get_model_version(NAME, "1")
    state, record = _state(NAME, "1")
    assert (state, version.current_stage) == ("delivered", "Production")
    # the client's input alone, answered by the version's id at temperature 0: evaluate's prediction,
    # byte for byte, from as many prompt tokens (the prompt is served with the version)
    assert record["parity"]["rows"] == record["parity"]["equal"] == record["parity"]["prompt_tokens_equal"] == 16
    assert record["eval_run"] == version.tags[registry.EVAL_RUN_TAG] and record["production"] == ""
    assert version.tags["loraflow.promotion.by"].endswith(f"pid {restarted.pid}")  # the audit names the controller
    assert version.tags["loraflow.promotion.reason"].startswith("delivery: the first version in Production")
    assert "delivery: staged (Staging gate passed)" in version.description

    # A server whose generation defaults drifted from evaluation's (a repetition penalty applied to
    # requests that set none: vLLM's generation config) answers otherwise: the parity check says so.
    engine = yaml.safe_load((ROOT / "configs/engines/smollm2-cpu.yaml").read_text())
    drifted = yaml.safe_load(Path(_policy(tmp_path, serve_changes={"engine": {
        **engine, "override_generation_config": {"repetition_penalty": 2.0}}})).read_text())
    settings = job_configs.ParityCheck.model_validate(drifted["models"][NAME]["parity"])
    report = parity.check(version, record["eval_run"], {"temperature": 0.0, "max_tokens": 24}, settings,
                          tmp_path / "drifted.log")
    assert not report.passed and report.summary().startswith(
        "0/16 served answers equal the evaluation's (at least 100% needed), 16/16 prompts of as many tokens\n"
        "  row 0: evaluated ")
    code, out = _deliver(config)  # nothing pending
    assert code == 0 and "v1" not in out

    # What a person sees: the version's page in the MLflow UI (a real browser) with its delivery
    # state and one dated line a step in its description.
    with mlflow_server(os.environ["MLFLOW_TRACKING_URI"], str(tmp_path / "artifacts")) as url, chromium() as browser:
        page_text(browser, f"{url}/#/models/{NAME}/versions/1",
                  ["Production", "loraflow.delivery.state", "delivered", "delivery: staged (Staging gate passed)",
                   "delivery: delivered"], "mlflow-delivered-version.png")


# -- the registry's side: versions registered here, in the state a controller leaves them in -------

@pytest.fixture
def model(tracking_uri) -> str:
    return f"viggo-test-{uuid.uuid4().hex[:8]}"


def _left_by_a_dead_controller(name: str, number: str, state: str, production: str) -> None:
    """`number` as a controller that died left it: claimed, `state`, evaluated."""
    client = MlflowClient()
    eval_run = client.get_model_version(name, number).tags[registry.EVAL_RUN_TAG]
    client.set_model_version_tag(name, number, delivery.RECORD, json.dumps(
        {"since": time.time() - 60, "production": production, "eval_run": eval_run}))
    client.set_model_version_tag(name, number, delivery.CLAIM, json.dumps(
        {"controller": f"{os.uname().nodename} 999999999 1", "heartbeat": time.time()}))
    client.set_model_version_tag(name, number, delivery.STATE, state)


def _round(tmp_path, name: str, **changes) -> None:
    delivery.Controller(delivery.check_policy(_policy(tmp_path, name, **changes))).round()


def test_a_version_that_fails_the_staging_gate_stops_there_with_the_reason(model, tmp_path, capsys):
    number = add_version(model, {**PASSING, "exact_match": 0.1}, tmp_path)
    _left_by_a_dead_controller(model, number, "evaluated", "")
    _round(tmp_path, model, gates="stages: {Staging: {minimum: {exact_match: 0.3}}}")
    state, record = _state(model, number)
    assert state == "stopped"
    assert record["reason"].startswith(f"{model} v{number} does not pass the Staging gate (exact_match):")
    assert MlflowClient().get_model_version(model, number).current_stage == "None"
    assert f"deliver: {model} v{number}: stopped: {model} v{number} does not pass" in capsys.readouterr().out


def test_a_refused_parity_check_stops_the_version_before_any_live_traffic(model, tmp_path, monkeypatch):
    """What the controller does with a refused report (the check itself runs against a real
    server in the test above)."""
    production, candidate = add_version(model, PASSING, tmp_path), add_version(model, PASSING, tmp_path)
    assert entry_points.main("promote", ["--name", model, "--version", production]) == 0
    assert entry_points.main("promote", ["--name", model, "--version", candidate, "--stage", "Staging"]) == 0
    _left_by_a_dead_controller(model, candidate, "staged", production)
    refused = parity.ParityReport(16, 3, 16, 1.0, [{"index": 0, "evaluated": "a", "served": "b",
                                                     "evaluated_tokens": 9, "served_tokens": 9}])
    monkeypatch.setattr(parity, "check", lambda *args: refused)
    _round(tmp_path, model)
    state, record = _state(model, candidate)
    assert state == "stopped" and record["reason"] == (
        "parity check refused it: 3/16 served answers equal the evaluation's (at least 100% needed), 16/16 prompts "
        "of as many tokens\n  row 0: evaluated 'a' (9 prompt tokens), served 'b' (9)")
    assert record["parity"]["passed"] is False
    assert registry.rollout(MlflowClient(), model) is None  # no canary: no client saw it


def test_a_person_promoting_another_version_mid_delivery_stops_the_controller(model, tmp_path, capsys):
    first, candidate, other = (add_version(model, PASSING, tmp_path) for _ in range(3))
    assert entry_points.main("promote", ["--name", model, "--version", first]) == 0
    _left_by_a_dead_controller(model, candidate, "evaluated", first)
    assert entry_points.main("promote", ["--name", model, "--version", other, "--reason", "hotfix"]) == 0
    _round(tmp_path, model)
    state, record = _state(model, candidate)
    assert state == "stopped"
    assert record["reason"].startswith(f"Production changed during its delivery (v{first} -> v{other}, by ")
    assert MlflowClient().get_model_version(model, other).current_stage == "Production"  # theirs stands
    assert MlflowClient().get_model_version(model, candidate).current_stage == "None"


@pytest.mark.parametrize("outcome", ["promote", "roll back", "stopped by a person"])
def test_a_canary_under_way_ends_the_delivery_as_the_servers_or_a_person_decide(model, tmp_path, outcome):
    production, candidate = add_version(model, PASSING, tmp_path), add_version(model, PASSING, tmp_path)
    assert entry_points.main("promote", ["--name", model, "--version", production]) == 0
    gates = str(tmp_path / "gates.yaml")
    (tmp_path / "gates.yaml").write_text("stages: {Staging: {}, Production: {}}\n")
    assert entry_points.main("promote", ["--name", model, "--version", candidate, "--stage", "Staging"]) == 0
    assert not rollout.start_canary(model, candidate, 0.5, "test", False, gates).refused
    _left_by_a_dead_controller(model, candidate, "canary", production)
    _round(tmp_path, model)
    assert _state(model, candidate)[0] == "canary"  # the servers have not judged yet: it waits
    started = registry.rollout(MlflowClient(), model)
    if outcome == "stopped by a person":
        assert entry_points.main("promote", ["--name", model, "--version", candidate, "--stage", "Canary",
                                             "--weight", "0", "--reason", "not now"]) == 0
    else:
        rollout.finish_canary(model, started, canary.Verdict(outcome, ["test verdict"]), {})
    _round(tmp_path, model)
    state, record = _state(model, candidate)
    expected = {"promote": ("delivered", "promoted to Production: the canary held"),
                "roll back": ("stopped", "canary rolled back: canary: test verdict"),
                "stopped by a person": ("stopped", "canary stopped: not now")}[outcome]
    assert (state, record["reason"]) == expected


@pytest.mark.parametrize(("change", "message"), [
    ({"to": "Live"}, "models.NAME.to should be 'Staging', 'Canary' or 'Production', got 'Live'"),
    ({"evaluate_config": "configs/evaluate/missing.yaml"},
     ("models.NAME.evaluate_config names configs/evaluate/missing.yaml, which does not exist: name a file such as "
      "configs/evaluate/default.yaml")),
    ({"promote_config": "configs/evaluate/default.yaml"}, "models.NAME: Promotion config"),
    ("missing-model", "models.missing-model: There is no registered model 'missing-model'"),
])
def test_a_policy_naming_what_is_not_there_is_refused_at_start(model, tmp_path, capsys, change, message):
    add_version(model, PASSING, tmp_path)
    config = yaml.safe_load(Path(_policy(tmp_path, model)).read_text())
    if change == "missing-model":
        config["models"] = {"missing-model": config["models"][model]}
    else:
        config["models"][model].update(change)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    assert entry_points.main("deliver", ["--config", str(tmp_path / "bad.yaml"), "--once", "true"]) == 2
    err = capsys.readouterr().err
    assert message.replace("NAME", model) in err and err.startswith("error: Delivery config ")
    assert _state(model, "1") == (None, {})  # nothing delivered


def test_registry_webhooks_wake_the_controller_and_forged_calls_are_refused(tmp_path, monkeypatch):
    """Against an `mlflow server` on PostgreSQL that sends webhooks (http on loopback allowed for the
    test; production uses https), the controller polling once an hour acts on a new version within
    seconds of its registration; calls without the secret's signature are answered 401."""
    import base64

    import requests
    from cryptography.fernet import Fernet
    from servers import free_port, postgres_server

    secret, port = "webhook-secret-42", free_port()
    server_env = {"MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
                  "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(),
                  "MLFLOW_WEBHOOK_CACHE_TTL": "1"}  # the server's list of webhooks, 60 s old by default
    with postgres_server() as database, mlflow_server(database, str(tmp_path / "artifacts"), server_env) as url:
        import mlflow

        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        mlflow.set_tracking_uri(url)
        env = {**os.environ, "LORAFLOW_WEBHOOK_SECRET": secret}
        try:
            name = f"viggo-test-{uuid.uuid4().hex[:8]}"
            first = add_version(name, PASSING, tmp_path)
            assert entry_points.main("promote", ["--name", name, "--version", first]) == 0  # nothing new
            config = yaml.safe_load(Path(_policy(tmp_path, name, parity_rows=0)).read_text())
            config.update(poll_interval_s=3600, webhook={"listen": f"127.0.0.1:{port}",
                                                         "url": f"http://127.0.0.1:{port}/"})
            (tmp_path / "webhook.yaml").write_text(yaml.safe_dump(config))
            log = tmp_path / "deliver.log"
            with open(log, "w") as out:
                controller = subprocess.Popen([*entry_point("deliver"), "--config", str(tmp_path / "webhook.yaml")],
                                              cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + 120
                while "webhooks at" not in log.read_text():
                    assert controller.poll() is None and time.monotonic() < deadline, log.read_text()
                    time.sleep(0.5)
                [hook] = [h for h in MlflowClient().list_webhooks() if h.name == "loraflow-deliver"]
                assert hook.url == f"http://127.0.0.1:{port}/" and [str(e) for e in hook.events] == \
                    ["model_version.created"]

                body = json.dumps({"entity": "model_version", "action": "created", "data": {"name": name}})
                stamp = str(int(time.time()))
                forged = base64.b64encode(b"0" * 32).decode()
                for headers, why in [
                    ({}, "unsigned: the webhook needs the controller's secret"),
                    ({"X-MLflow-Signature": f"v1,{forged}", "X-MLflow-Delivery-Id": "d1", "X-MLflow-Timestamp": stamp},
                     "the signature does not match the controller's secret"),
                ]:
                    answer = requests.post(f"http://127.0.0.1:{port}/", data=body, headers=headers, timeout=10)
                    assert (answer.status_code, answer.json()) == (401, {"error": why})

                second = add_version(name, PASSING, tmp_path)  # the server calls the controller, which evaluates
                deadline = time.monotonic() + 120
                while _state(name, second)[0] not in delivery.DONE:
                    assert controller.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                    time.sleep(1)
                # its adapter is a stand-in that evaluate refuses: what matters is that it was acted on
                assert _state(name, second)[1]["reason"].startswith("its evaluation failed (exit code 2)")
                assert f"deliver: {name} v{second}: evaluating" in log.read_text()
            finally:
                controller.send_signal(signal.SIGTERM)
                assert controller.wait(timeout=60) == 0
                assert log.read_text().rstrip().endswith("a controller started again carries on from there")
        finally:
            mlflow.set_tracking_uri(None)


@pytest.mark.parametrize(("secret", "message"), [
    (None, "webhook: set LORAFLOW_WEBHOOK_SECRET to the webhook's signing secret"),
    ("s3cret", ("webhook: webhooks are sent by a tracking server (`mlflow server` on a SQL store), and "
                "sqlite:///")),
], ids=["no_secret", "local_store"])
def test_a_webhook_that_cannot_work_is_refused_at_start(model, tmp_path, capsys, monkeypatch, secret, message):
    add_version(model, PASSING, tmp_path)
    config = yaml.safe_load(Path(_policy(tmp_path, model)).read_text())
    config["webhook"] = {"url": "https://deliver.example.com/"}
    (tmp_path / "webhook.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.delenv("LORAFLOW_WEBHOOK_SECRET", raising=False)
    if secret:
        monkeypatch.setenv("LORAFLOW_WEBHOOK_SECRET", secret)
    assert entry_points.main("deliver", ["--config", str(tmp_path / "webhook.yaml")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")
    assert _state(model, "1") == (None, {})  # nothing delivered
