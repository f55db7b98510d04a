"""Served requests as MLflow traces (traces.py): the settings and the row format (unit), and the
Tracer's traces in a real SQLite store exported to a dataset that the train entry point trains
on. test_serve_job.py checks the traces of a real server."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY_CONFIG, VIGGO, config_with, run_train
from mlflow import MlflowClient
from servers import mlflow_server
from test_promote import GOOD, add_version

from loraflow import datasets, entry_points, job_configs, lineage, registry, traces
from loraflow.errors import UserError
from loraflow.job_configs import ServeConfig, TracesConfig

NAME = "viggo-traced"
SHIPPED = {name: tuple(yaml.safe_load((ROOT / f"configs/serve/{name}.yaml").read_text())["traces"]["redact"])
           for name in ("default", "gpu")}
EMAIL = SHIPPED["default"][0]
OLD_PATTERNS = (r"[\w.+-]+@[\w-]+(\.[\w-]+)+", r"\+?\d[\d ()-]{7,}\d")  # shipped before issue 36: quadratic


@pytest.mark.unit
@pytest.mark.parametrize("raw, message", [
    (None, "traces should be a valid dictionary, got None"),
    ({"sample_rate": 0.1, "redact": [], "rate": 1}, "traces.rate is not a known key"),
    ({"sample_rate": 1.5, "redact": []}, "traces.sample_rate should be less than or equal to 1, got 1.5"),
    ({"sample_rate": True, "redact": []}, "traces.sample_rate should be a valid number, got True"),
    ({"sample_rate": 0.1, "redact": "x"}, "traces.redact should be a valid tuple, got 'x'"),
    ({"sample_rate": 0.1, "redact": ["(unclosed"]},
     "traces.redact '(unclosed' is not a regular expression (missing ), unterminated subpattern at position 0)"),
])
def test_bad_trace_settings_are_refused_with_what_to_write(raw, message, tmp_path):
    config = yaml.safe_load((ROOT / "configs/serve/default.yaml").read_text())
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({**config, "traces": raw}))
    with pytest.raises(UserError) as refused:
        job_configs.load(ServeConfig, path)
    assert str(refused.value) == f"Serving config {path}: {message}; see configs/serve/default.yaml."


@pytest.mark.unit
def test_redaction_reaches_every_string_of_a_request():
    tracer = traces.Tracer(TracesConfig(sample_rate=0.0, redact=(EMAIL,)), "run", "0")
    request = {"messages": [{"role": "user", "content": "ask ann.lee@example.co.uk, or bob@x.org"}], "max_tokens": 8}
    assert tracer._scrub(request) == {"messages": [{"role": "user", "content": "ask [REDACTED], or [REDACTED]"}],
                                      "max_tokens": 8}


@pytest.mark.unit
@pytest.mark.parametrize("config", sorted(SHIPPED))
@pytest.mark.parametrize("text, logged", [
    ("ask ann.lee@example.co.uk, or bob@x.org", "ask [REDACTED], or [REDACTED]"),
    ("<jo+tag@mail-server.example.com>.", "<[REDACTED]>."),
    ("a@b.com+bob@c.com", "[REDACTED]"),  # one after another: one match (the old patterns: two)
    ("call +44 20 7946 0958 or (555) 123-4567", "call [REDACTED] or ([REDACTED]"),
    ("card 4111 1111 1111 1111, ref 1+5551234567", "card [REDACTED], ref 1[REDACTED]"),
    ("user@localhost, @example.com, x@y, 12345678, Diablo II (1996) is 9/10",
     "user@localhost, @example.com, x@y, 12345678, Diablo II (1996) is 9/10"),
], ids=["e-mails", "in-brackets", "in-a-row", "phones", "card-and-plus", "none"])
def test_the_shipped_patterns_start_only_where_a_run_starts_and_redact_what_the_old_ones_did(config, text, logged):
    """A match that can start anywhere in a run of the characters it takes tries every start, each
    to the run's end: quadratic. The shipped patterns try a run's start only, and redact the same
    characters as the old ones."""
    email, phone = (re.compile(pattern) for pattern in SHIPPED[config])
    assert email.match("ann.lee@example.com", 1) is None and phone.match("+44 20 7946 0958", 2) is None
    assert traces.Tracer(TracesConfig(redact=SHIPPED[config]), "run", "0")._scrub(text) == logged
    assert _masked(SHIPPED[config], text) == _masked(OLD_PATTERNS, text)


def _masked(patterns: tuple[str, ...], text: str) -> str:
    """text with each character that the patterns redact, one after the other, masked."""
    for pattern in patterns:
        text = re.sub(pattern, lambda match: "\0" * len(match.group()), text)
    return text


class _Trace:
    def __init__(self, inputs, outputs, at=0):
        span = type("Span", (), {"inputs": inputs, "outputs": outputs})
        self.data = type("Data", (), {"spans": [span]})
        self.info = type("Info", (), {"request_time": at, "tags": {registry.TRACE_VERSION_TAG: "3"}})


@pytest.mark.unit
@pytest.mark.parametrize("messages, row", [
    ([{"role": "user", "content": "Diablo II is good.\nIt is."}],
     {"instruction": "Give the MR of v3.", "input": "Diablo II is good.\nIt is."}),  # the input is the message
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"}], None),  # sent as it came
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
     None),  # multi-turn: sent as it came, no row
], ids=["input", "system", "multi_turn"])
def test_a_chat_of_one_user_message_becomes_a_row_with_the_instruction_of_the_version_that_answered(messages, row):
    got = traces._alpaca_row(_Trace({"messages": messages}, {"text": "inform(name[Diablo II])"}),
                             {"3": "Give the MR of v3."}.get)
    assert got == (row and {**row, "output": "inform(name[Diablo II])", "_at": 0})


@pytest.mark.unit
def test_a_completion_or_an_empty_answer_is_no_row():
    assert traces._alpaca_row(_Trace({"prompt": "hi"}, {"text": "x"}), str) is None
    assert traces._alpaca_row(_Trace({"messages": [{"role": "user", "content": "a"}]}, {"text": ""}), str) is None


@pytest.mark.unit
def test_a_model_name_with_a_quote_is_refused_before_any_search(tmp_path):
    with pytest.raises(UserError) as refused:
        traces.export("it's", str(tmp_path / "served"))
    assert str(refused.value) == "Registered model names with a quote cannot be searched for in traces: \"it's\"."
    assert not (tmp_path / "served").exists()


@pytest.fixture
def traced(tracking_uri, tmp_path):
    """Eight ViGGO test rows asked of v1 (five) and v2 (three) as a client asks them (the input alone), one of them
    with an e-mail address, and answered with their reference; plus one failed request and one
    completion. Logged by the Tracer the server uses, into one serving run."""
    versions = [add_version(NAME, GOOD, tmp_path) for _ in range(2)]
    client = MlflowClient()
    run = client.create_run("0", run_name=f"serve-{NAME}@production", tags={registry.JOB_TAG: "serve"})
    tracer = traces.Tracer(TracesConfig(sample_rate=1.0, redact=(EMAIL,)), run.info.run_id, "0")
    rows = [json.loads(line) for line in (VIGGO / "test.jsonl").read_text().splitlines()[:8]]
    rows[2]["input"] += " Ask me at jo@example.com."
    for index, row in enumerate(rows):
        adapter = f"{NAME}-v{versions[0] if index < 5 else versions[1]}"
        request = {"model": "smollm2:production", "messages": [{"role": "user", "content": row["input"]}]}
        valid = index != 7
        tracer.offer("chat", request, row["output"], adapter, "production" if index < 5 else "canary", valid,
                     1_000_000 * (index + 1), 1_000_000 * (index + 1) + 500)
    tracer.offer("chat", {"messages": [{"role": "user", "content": "x"}]}, None, f"{NAME}-v1", "id", None, 1, 2,
                 error="engine died")
    tracer.offer("completions", {"prompt": "hi"}, "there", f"{NAME}-v1", "id", False, 3, 4)
    # Another registered model's adapter in the same store, asked for by its id: its own model's trace.
    tracer.offer("chat", {"messages": [{"role": "user", "content": "a\nb"}]}, "c", "other-model-v3", "id", True, 5, 6)
    tracer.flush()
    rows[2]["input"] = rows[2]["input"].replace("jo@example.com", "[REDACTED]")
    return rows, run.info.run_id


def test_traces_carry_the_version_route_and_verdict_and_export_to_a_dataset_train_trains_on(traced, tmp_path,
                                                                                             capsys):
    rows, run_id = traced
    logged = MlflowClient().search_traces(locations=["0"], max_results=100)
    assert len(logged) == 11
    [other] = [t for t in logged if t.info.tags[registry.TRACE_ADAPTER_TAG] == "other-model-v3"]
    assert (other.info.tags[registry.TRACE_MODEL_TAG], other.info.tags[registry.TRACE_VERSION_TAG]) \
        == ("other-model", "3")
    logged = [t for t in logged if t is not other]
    assert all(t.info.trace_metadata["mlflow.sourceRun"] == run_id for t in logged)
    tags = sorted((t.info.tags[registry.TRACE_VERSION_TAG], t.info.tags[registry.TRACE_ROUTE_TAG],
                   t.info.tags[registry.TRACE_VALID_TAG], t.info.state.value) for t in logged)
    assert tags == sorted([("1", "production", "true", "OK")] * 5 + [("2", "canary", "true", "OK")] * 2
                          + [("2", "canary", "false", "OK"), ("1", "id", "error", "ERROR"), ("1", "id", "false", "OK")])
    assert all("jo@example.com" not in json.dumps(t.data.spans[0].inputs) for t in logged)

    out = tmp_path / "served"
    assert entry_points.main("export_traces", ["--name", NAME, "--out", str(out)]) == 0
    exported = [json.loads(line) for line in (out / "served.jsonl").read_text().splitlines()]
    assert exported == rows  # in the order they were asked; the completion and the failure are not rows
    assert json.loads((out / "dataset_info.json").read_text()) == {"served": {
        "file_name": "served.jsonl", "formatting": "alpaca",
        "columns": {"prompt": "instruction", "query": "input", "response": "output"}}}
    assert [f.name for f in datasets.load_datasets(str(out), ["served"])] == ["served"]

    by_version = tmp_path / "v2-valid"
    assert entry_points.main("export_traces", ["--name", NAME, "--out", str(by_version), "--version", "2", "--valid-only", "true"]) == 0
    assert [json.loads(line) for line in (by_version / "served.jsonl").read_text().splitlines()] == rows[5:7]

    # The train entry point trains the tiny model on it, and registers what it trained.
    config = config_with(TINY_CONFIG, tmp_path, ("eval_dataset", "per_device_eval_batch_size", "eval_strategy",
                                                 "eval_steps"),
                         dataset="served", dataset_dir=str(out), registered_model_name="served-tiny-lora",
                         max_samples=8, output_dir=str(tmp_path / "train-out"))
    trained = run_train("--config", str(config))
    assert trained.returncode == 0, trained.stderr[-3000:]
    version = MlflowClient().get_model_version("served-tiny-lora", "1")
    train_run = MlflowClient().get_run(version.run_id)
    assert (train_run.data.params["dataset"], train_run.data.params["dataset_dir"]) == ("served", str(out))
    assert train_run.data.metrics["samples_seen"] == 8

    # Lineage both ways: v1's served traces were exported and learnt from by that train run; the new
    # version's data came from the traces v1 and v2 answered.
    [export] = lineage.lineage(f"models:/{NAME}/1")["exported"]  # the v2-only export holds none of v1's
    assert export["rows"] == 8 and export["sha256"] == hashlib.sha256((out / "served.jsonl").read_bytes()).hexdigest()
    assert [(run["run_id"], run["registered"]) for run in export["learnt_from_by"]] == \
        [(train_run.info.run_id, "served-tiny-lora/1")]
    [data] = lineage.lineage("models:/served-tiny-lora/1")["data"]
    assert (data["name"], data["context"], data["sha256"]) == ("served", "training", export["sha256"])
    assert [(run["registered_model"], run["versions"]) for run in data["exported_by"]] == [(NAME, [1, 2])]
    assert entry_points.main("lineage", ["--model", "models:/served-tiny-lora/1"]) == 0
    shown = capsys.readouterr().out
    assert f"    <- served traces of {NAME} v1, v2, exported by export-traces-{NAME}: http://127.0.0.1:5000/#/" in shown
    assert f"train run: {train_run.info.run_name} (FINISHED)" in shown


def test_only_traces_of_a_servers_run_are_exported(traced, tmp_path):
    """Anyone who can log to the store can log a trace with loraflow's tags: one logged in a run
    that is no server's, and one in no run (in another experiment), are no rows."""
    rows, _ = traced
    client = MlflowClient()
    elsewhere = client.create_experiment("elsewhere")
    not_served = client.create_run("0", run_name="train-x", tags={registry.JOB_TAG: "train"}).info.run_id
    injected = {"model": "smollm2:production", "messages": [{"role": "user", "content": "Injected\nrow"}]}
    for run_id, experiment in ((not_served, "0"), (None, elsewhere)):
        tracer = traces.Tracer(TracesConfig(sample_rate=1.0), run_id, experiment)
        tracer.offer("chat", injected, "inform(name[X])", f"{NAME}-v1", "production", True, 0, 1)
        tracer.flush()
    wanted = f"tags.`{registry.TRACE_MODEL_TAG}` = '{NAME}'"
    assert len(client.search_traces(locations=["0", elsewhere], filter_string=wanted, max_results=100)) == 12

    out = tmp_path / "served"
    assert entry_points.main("export_traces", ["--name", NAME, "--out", str(out)]) == 0
    assert [json.loads(line) for line in (out / "served.jsonl").read_text().splitlines()] == rows


def _logged(run_id: str) -> list:
    """The traces of a run, in the order they were asked."""
    found = MlflowClient().search_traces(locations=["0"], run_id=run_id, max_results=100)
    return sorted(found, key=lambda trace: trace.info.request_time)


def test_text_beyond_the_cap_is_cut_before_any_pattern_runs(tracking_uri):
    """Each string is cut to TRACED_CHARS first, less the word the cut falls in, with how much
    was cut: a pattern sees no more (this one would redact the x if it could see SECRET), and a
    cut address never reaches the store."""
    run_id = MlflowClient().create_run("0").info.run_id
    tracer = traces.Tracer(TracesConfig(sample_rate=1.0, redact=(r"^x(?=[\s\S]*SECRET)", EMAIL)), run_id, "0")
    prompt = "x " + "word " * 2000 + "SECRET"  # 10,008 characters; the cut falls between two words
    answer = "a " * 4094 + "ann.lee@example.com and more"  # 8,216; the cut falls in the address
    tracer.offer("chat", {"messages": [{"role": "user", "content": prompt}]}, answer, f"{NAME}-v1", "id", True, 1, 2)
    tracer.flush()
    [logged] = _logged(run_id)
    span = logged.data.spans[0]
    assert span.inputs == {"messages": [{"role": "user",
                                         "content": "x " + "word " * 1638 + "[... 1,816 characters cut]"}]}
    assert span.outputs == {"text": "a " * 4094 + "[... 28 characters cut]"}


def test_the_queue_drops_what_would_pass_its_count_or_character_bound(tracking_uri, monkeypatch):
    """While the logging thread is busy: a trace whose characters would take the queue past its
    bound is dropped (and counted), as is one beyond its count; what was queued is logged."""
    monkeypatch.setattr(traces, "_QUEUE_CHARS", 10_000)
    monkeypatch.setattr(traces, "_QUEUE_SIZE", 2)
    busy = threading.Event()
    log_queued = traces.Tracer._log_queued
    monkeypatch.setattr(traces.Tracer, "_log_queued", lambda self: (busy.wait(), log_queued(self)))
    run_id = MlflowClient().create_run("0").info.run_id
    tracer = traces.Tracer(TracesConfig(sample_rate=1.0), run_id, "0")

    def offer(name: str, chars: int, at_ms: int) -> None:  # a request of `chars` characters, named by its first
        request = {"messages": [{"role": "user", "content": name + "a" * (chars - len(name))}]}
        tracer.offer("chat", request, "ok", f"{NAME}-v1", "id", True, at_ms * 1_000_000, at_ms * 1_000_000 + 1)

    offer("first", 6_000, 1)
    offer("too many characters", 4_000, 2)  # 6,000 + 4,000 + "user" and "ok" twice > 10,000
    offer("fits", 3_980, 3)
    offer("one too many", 10, 4)
    assert tracer.dropped == 2
    busy.set()
    tracer.flush()
    assert [t.data.spans[0].inputs["messages"][0]["content"][:5] for t in _logged(run_id)] == ["first", "fitsa"]
    offer("after", 6_000, 5)  # what was logged left the bound
    tracer.flush()
    assert (len(_logged(run_id)), tracer.dropped) == (3, 2)


def test_a_failed_request_is_an_error_trace_and_answers_and_errors_are_redacted(tracking_uri):
    """docs/canary.md: the answer's text and a failure's message are redacted as the request is;
    a failed request's trace has status ERROR, no outputs, its message and the verdict `error`."""
    run_id = MlflowClient().create_run("0").info.run_id
    tracer = traces.Tracer(TracesConfig(sample_rate=1.0, redact=SHIPPED["default"]), run_id, "0")
    request = {"messages": [{"role": "user", "content": "Who is ann@example.com?"}]}
    tracer.offer("chat", request, "Mail ann@example.com or call +1 555 123 4567.", f"{NAME}-v1", "id", True,
                 1_000_000, 2_000_000)
    tracer.offer("chat", request, None, f"{NAME}-v1", "id", None, 3_000_000, 4_000_000,
                 error="no adapter for ann@example.com")
    tracer.flush()
    answered, failed = _logged(run_id)
    assert (answered.info.state.value, answered.data.spans[0].outputs) == \
        ("OK", {"text": f"Mail {traces.REDACTED} or call {traces.REDACTED}."})
    span = failed.data.spans[0]
    assert (failed.info.state.value, failed.info.tags[registry.TRACE_VALID_TAG], span.outputs,
            span.attributes["error"], span.inputs["messages"][0]["content"]) == \
        ("ERROR", "error", None, f"no adapter for {traces.REDACTED}", f"Who is {traces.REDACTED}?")


def test_a_trace_that_fails_to_be_written_is_ended_as_error_not_left_in_progress(tracking_uri, monkeypatch):
    """docs/canary.md: the tracking store refusing a trace's end fails no request and leaves no
    trace in progress; the next trace is written as usual."""
    end_trace = MlflowClient.end_trace
    refusals = iter([True])

    def refuse_once(self, trace_id, **kwargs):
        if next(refusals, False):
            raise ConnectionError("the tracking server went away")
        return end_trace(self, trace_id, **kwargs)

    monkeypatch.setattr(MlflowClient, "end_trace", refuse_once)
    run_id = MlflowClient().create_run("0").info.run_id
    tracer = traces.Tracer(TracesConfig(sample_rate=1.0), run_id, "0")
    for at in (1_000_000, 3_000_000):  # ns; traces are ordered by their start in ms
        tracer.offer("chat", {"messages": [{"role": "user", "content": "hi"}]}, "ok", f"{NAME}-v1", "id", True, at,
                     at + 1)
    tracer.flush()
    assert [(t.info.state.value, t.data.spans[0].outputs) for t in _logged(run_id)] == \
        [("ERROR", None), ("OK", {"text": "ok"})]


@pytest.mark.parametrize("extra, message", [
    (["--version", "9"], f"error: {NAME} has no version 9; it has versions 1, 2."),
    (["--since", "yesterday"], "error: since 'yesterday' is not a time such as 2026-12-01"),
    (["--since", "2999-01-01"],
     f"error: No logged chat traces of {NAME} from a server's run (tagged loraflow.job=serve) match"),
    (["--valid-only", "maybe"], "error: valid_only must be true or false, not 'maybe'."),
    (["--dataset", "../x"], "error: dataset '../x' must be a plain name such as served"),
])
def test_an_export_that_cannot_be_made_is_refused_and_writes_nothing(traced, tmp_path, capsys, extra, message):
    out = tmp_path / "served"
    assert entry_points.main("export_traces", ["--name", NAME, "--out", str(out), *extra]) == 2
    assert capsys.readouterr().err.startswith(message)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".served")) == []


def test_an_export_never_writes_over_a_folder_that_holds_files(traced, tmp_path, capsys):
    out = tmp_path / "served"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert entry_points.main("export_traces", ["--name", NAME, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {out} already exists and is not an empty folder: choose another " \
                                      "out, or remove it.\n"
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_mlflow_run_export_traces_writes_the_dataset_in_a_named_run(traced, tmp_path):
    """The command users run: its run is named after what it did and tagged with the job."""
    out = tmp_path / "served"
    proc = subprocess.run([str(Path(sys.executable).with_name("mlflow")), "run", ".", "-e", "export_traces",
                           "--env-manager", "local", "--experiment-name", "exports", "-P", f"name={NAME}",
                           "-P", f"out={out}", "-P", "version=1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (written["rows"], written["dataset_dir"], written["skipped"]) == (5, str(out), 1)  # the completion
    assert len((out / "served.jsonl").read_text().splitlines()) == 5
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("exports").experiment_id])
    assert (run.info.run_name, run.info.status, run.data.tags["loraflow.job"]) == \
        (f"export-traces-{NAME}", "FINISHED", "export_traces")


def test_a_basic_auth_tracking_server_serves_jobs_what_the_credentials_in_the_environment_allow(
        tracking_uri, tmp_path, monkeypatch, capsys):
    """docs/usage.md: an `mlflow server --app-name basic-auth`. A job sends MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD: without them, or as a user with the default READ permission, promote
    exits 2 saying what to do and changes nothing; as the admin it promotes."""
    import mlflow
    from mlflow.server import get_app_client

    def login(user: str, password: str) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)

    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", str(tmp_path / "artifacts"),
                       admin_password="admin-password-1") as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        mlflow.set_tracking_uri(url)
        try:
            login("admin", "admin-password-1")
            version = add_version(NAME, GOOD, tmp_path)
            get_app_client("basic-auth", tracking_uri=url).create_user("reader", "reader-password-1")
            login("reader", "reader-password-1")
            capsys.readouterr()
            assert entry_points.main("promote", ["--name", NAME, "--version", version]) == 2
            assert capsys.readouterr().err == "error: The tracking server refused the request: its user 'reader' " \
                                              "lacks the permission; an admin of its basic-auth app can grant it.\n"
            for unset in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                monkeypatch.delenv(unset)
            assert entry_points.main("promote", ["--name", NAME, "--version", version]) == 2
            assert capsys.readouterr().err == "error: The tracking server refused the request as unauthenticated: " \
                "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to one of its users (or " \
                "MLFLOW_TRACKING_TOKEN), or check them if set.\n"
            login("admin", "admin-password-1")
            assert MlflowClient().get_model_version(NAME, version).current_stage == "None"
            assert entry_points.main("promote", ["--name", NAME, "--version", version]) == 0
            assert MlflowClient().get_model_version(NAME, version).current_stage == "Production"
        finally:
            mlflow.set_tracking_uri(tracking_uri)
