"""The promote and rollback entry points against a real registry: a local SQLite store and an
`mlflow server` backed by PostgreSQL (Debian's, started here on loopback).

Versions are registered the way train registers them (a run with an `adapter` artifact); their
evaluation metrics are written as the `loraflow.eval.*` tags that the evaluate entry point writes, so that
gates can be exercised without running vLLM for every case (test_evaluate_job covers that path).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
import warnings

import pytest
from browser import chromium, page_text
from conftest import ROOT, task_tags
from servers import mlflow_server, postgres_server

from loraflow import entry_points, registry, registry_changes, tasks
from loraflow.errors import UserError
from loraflow.evaluate import record_evaluation
from loraflow.registry_lock import locked

# Figures that pass configs/promote/default.yaml, near the default recipe's own (quality-default.json).
GOOD = {"parse_validity": 0.99, "slot_f1": 0.91, "exact_match": 0.64, "rows": 1083}


@pytest.fixture(scope="session")
def postgres_tracking_server(tmp_path_factory):
    with postgres_server() as database, mlflow_server(database, str(tmp_path_factory.mktemp("artifacts"))) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path, monkeypatch) -> str:
    """The tracking URI of a registry; each test uses its own model names in it. Tests of concurrent
    writers and of the lock run on both backends (their transactions differ); the rest on SQLite."""
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    else:
        uri = request.getfixturevalue("postgres_tracking_server")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri


SQLITE_ONLY = pytest.mark.parametrize("store", ["sqlite"], indirect=True)


@pytest.fixture
def model_name() -> str:
    return f"viggo-test-{uuid.uuid4().hex[:8]}"


def add_version(name: str, metrics: dict[str, float] | None, tmp_path) -> str:
    """Register a version like train does; record `metrics` like evaluate does (None: not evaluated)."""
    import mlflow

    adapter = tmp_path / f"adapter-{uuid.uuid4().hex[:6]}"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(adapter), artifact_path=registry.ADAPTER_ARTIFACT_PATH)
    version = registry.register_adapter(name, run.info.run_id, {"loraflow.base_model": "tiny",
                                                                **task_tags(run.info.run_id)},
                                        "test adapter", registry.file_digests(adapter))
    if metrics is not None:
        record_evaluation(name, str(version.version), metrics, run.info.run_id)
    return str(version.version)


def run_promote(capsys, name, version, stage="Production", *extra: str) -> tuple[int, str, str]:
    code = entry_points.main("promote", ["--name", name, "--version", version, "--stage", stage, *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def stages(name: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return {str(v.version): v.current_stage for v in MlflowClient().search_model_versions(f"name='{name}'")}


def alias_target(name: str, alias: str) -> str | None:
    from mlflow import MlflowClient

    target = MlflowClient().get_registered_model(name).aliases.get(alias)
    return None if target is None else str(target)


def version_info(name: str, version: str):
    from mlflow import MlflowClient

    return MlflowClient().get_model_version(name, version)


def test_promotion_moves_stage_and_alias_and_archives_the_previous(store, model_name, tmp_path, capsys):
    v1 = add_version(model_name, GOOD, tmp_path)
    v2 = add_version(model_name, {**GOOD, "exact_match": 0.66}, tmp_path)

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # users see no MLflow deprecation noise
        code, out, _ = run_promote(capsys, model_name, v1, "production", "--reason", "first release")
    assert code == 0, out
    assert f"v{v1}: None -> Production (gate: passed)" in out
    assert "slot_f1" in out  # the gate table is shown on success too
    assert stages(model_name) == {v1: "Production", v2: "None"}
    assert alias_target(model_name, "production") == v1

    code, out, _ = run_promote(capsys, model_name, v2, "Production", "--reason", "better matches")
    assert code == 0
    assert stages(model_name) == {v1: "Archived", v2: "Production"}
    assert alias_target(model_name, "production") == v2

    audit = version_info(model_name, v2)
    assert audit.tags["loraflow.promotion.reason"] == "better matches"
    assert audit.tags["loraflow.promotion.gate"] == "passed"
    assert audit.tags["loraflow.promotion.previous_production"] == f"v{v1}"
    assert json.loads(audit.tags["loraflow.promotion.metrics"])["exact_match"] == 0.66
    assert "@" in audit.tags["loraflow.promotion.by"] and audit.tags["loraflow.promotion.at"].startswith("20")
    assert "None -> Production" in audit.description and "better matches" in audit.description
    assert f"archived: v{v2} was promoted" in version_info(model_name, v1).description


@SQLITE_ONLY
def test_gate_refusal_shows_the_comparison_and_changes_nothing(store, model_name, tmp_path, capsys):
    v1 = add_version(model_name, GOOD, tmp_path)
    worse = add_version(model_name, {**GOOD, "exact_match": 0.57}, tmp_path)  # above 0.55, 0.07 below v1
    assert run_promote(capsys, model_name, v1)[0] == 0

    code, _, err = run_promote(capsys, model_name, worse, "Production", "--reason", "try")
    assert code == 2
    assert "does not pass the Production gate (exact_match)" in err
    assert f"v{worse} (candidate)" in err and f"v{v1} (production)" in err
    assert "0.570" in err and "0.640" in err and ">= production - 0.05" in err and "FAIL" in err
    assert "force=true" in err
    assert stages(model_name) == {v1: "Production", worse: "None"}
    assert "loraflow.promotion.gate" not in version_info(model_name, worse).tags

    code, _, err = run_promote(capsys, model_name, worse, "Production", "--force", "true")
    assert code == 2 and "give a reason" in err

    code, out, _ = run_promote(capsys, model_name, worse, "Production", "--force", "true",
                               "--reason", "hotfix approved by on-call")
    assert code == 0 and "gate: overridden" in out
    assert version_info(model_name, worse).tags["loraflow.promotion.gate"] == "overridden"
    assert alias_target(model_name, "production") == worse


@SQLITE_ONLY
def test_a_maximum_gate_refuses_a_metric_above_it(store, model_name, tmp_path, capsys):
    """A gate's `maximum`, for a metric where lower is better (the data-to-text task's slot error rate)."""
    nlg = {"bleu": 0.28, "slot_error_rate": 0.09, "parse_validity": 0.86, "rows": 1083}
    gates = tmp_path / "gates.yaml"
    gates.write_text("stages: {Production: {minimum: {bleu: 0.25}, maximum: {slot_error_rate: 0.12}}}")
    worse = add_version(model_name, {**nlg, "slot_error_rate": 0.15}, tmp_path)
    code, _, err = run_promote(capsys, model_name, worse, "Production", "--config", str(gates))
    assert code == 2 and "does not pass the Production gate (slot_error_rate)" in err, err
    assert "<= 0.12" in err and "0.150" in err and stages(model_name) == {worse: "None"}
    good = add_version(model_name, nlg, tmp_path)
    code, out, _ = run_promote(capsys, model_name, good, "Production", "--config", str(gates))
    assert code == 0 and "slot_error_rate  <= 0.12" in out and stages(model_name)[good] == "Production", out


@SQLITE_ONLY
def test_unevaluated_version_is_refused_with_what_to_run(store, model_name, tmp_path, capsys):
    version = add_version(model_name, None, tmp_path)
    code, _, err = run_promote(capsys, model_name, version, "Staging")
    assert code == 2
    assert f"v{version} has no evaluation yet" in err and "-e evaluate" in err
    assert stages(model_name) == {version: "None"}


@SQLITE_ONLY
def test_promoting_the_current_version_again_is_a_no_op(store, model_name, tmp_path, capsys):
    version = add_version(model_name, GOOD, tmp_path)
    assert run_promote(capsys, model_name, version)[0] == 0
    described = version_info(model_name, version).description

    code, out, _ = run_promote(capsys, model_name, version)
    assert code == 0 and "already in Production; nothing to do" in out
    assert version_info(model_name, version).description == described


@SQLITE_ONLY
def test_staging_then_production_then_archived_keep_aliases_in_step(store, model_name, tmp_path, capsys):
    version = add_version(model_name, GOOD, tmp_path)
    assert run_promote(capsys, model_name, version, "Staging")[0] == 0
    assert alias_target(model_name, "staging") == version

    assert run_promote(capsys, model_name, version, "Production")[0] == 0
    assert alias_target(model_name, "staging") is None
    assert alias_target(model_name, "production") == version

    assert run_promote(capsys, model_name, version, "Archived", "--reason", "retired")[0] == 0
    assert stages(model_name) == {version: "Archived"}
    assert alias_target(model_name, "production") is None


@SQLITE_ONLY
def test_rollback_walks_back_through_production_history(store, model_name, tmp_path, capsys):
    versions = [add_version(model_name, {**GOOD, "exact_match": 0.62 + i / 100}, tmp_path) for i in range(3)]
    for version in versions:
        assert run_promote(capsys, model_name, version)[0] == 0

    assert entry_points.main("rollback", ["--name", model_name, "--reason", "v3 answers badly"]) == 0
    assert "(rollback)" in capsys.readouterr().out
    assert alias_target(model_name, "production") == versions[1]
    assert stages(model_name)[versions[2]] == "Archived"
    rolled = version_info(model_name, versions[1])
    assert rolled.tags["loraflow.promotion.gate"] == "rollback"
    assert rolled.tags["loraflow.promotion.reason"] == "v3 answers badly"
    assert "rolled back" in version_info(model_name, versions[2]).description

    assert entry_points.main("rollback", ["--name", model_name]) == 0
    assert alias_target(model_name, "production") == versions[0]
    assert entry_points.main("rollback", ["--name", model_name]) == 2
    assert "Nothing to roll back to" in capsys.readouterr().err
    assert stages(model_name)[versions[0]] == "Production"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--name", "no-such-model", "--version", "1"], "There is no registered model 'no-such-model'"),
        (["--version", "99"], "has no version 99; it has versions 1"),
        (["--version", "one"], "Version must be a number, not 'one'"),
        (["--version", "1", "--stage", "Prod"],
         "Unknown stage 'Prod': use one of Staging, Production, Archived. Or Canary, for a live rollout."),
        (["--version", "1", "--config", "configs/promote/missing.yaml"], "does not exist"),
        (["--version", "1", "--force", "maybe"], "force must be true or false"),
    ],
)
def test_bad_promotion_requests_are_refused_clearly(args, message, tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    add_version("viggo-bad", GOOD, tmp_path)
    full = args if "--name" in args else ["--name", "viggo-bad", *args]
    assert entry_points.main("promote", full) == 2
    assert message in capsys.readouterr().err
    assert stages("viggo-bad") == {"1": "None"}  # nothing moved
    assert stages("viggo-bad") == {"1": "None"}


@pytest.mark.parametrize(
    "content, message",
    [
        ("stages: {Archived: {minimum: {exact_match: 1}}}",
         "stages.Archived (a key) should be 'Staging' or 'Production'; see configs/promote/default.yaml."),
        ("stages: {Production: {minimum: {accuracy: 0.5}}}",  # what some task's evaluation records
         "stages.Production.minimum.accuracy (a key) should be "
         + ", ".join(f"'{name}'" for name in tasks.recordable_metrics()[:-1])
         + f" or '{tasks.recordable_metrics()[-1]}'; see configs/promote/default.yaml."),
        ("stages: {Production: {minimum: {exact_match: high}}}",
         "stages.Production.minimum.exact_match should be a valid number, got 'high'; see "
         "configs/promote/default.yaml."),
        ("gates: {}", "stages is missing (each gated stage (Staging, Production) and its gate; a stage not named has "
                      "no checks); gates is not a known key; see configs/promote/default.yaml."),
    ],
)
def test_bad_gate_configs_are_refused_clearly(content, message, tmp_path):
    from loraflow import promotion_gates

    path = tmp_path / "gates.yaml"
    path.write_text(content)
    with pytest.raises(UserError) as refused:
        promotion_gates.load(path)
    assert str(refused.value) == f"Promotion config {path}: {message}"


@SQLITE_ONLY
def test_a_version_whose_artifacts_were_deleted_is_refused(store, model_name, tmp_path, capsys):
    from mlflow import MlflowClient
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    version = add_version(model_name, GOOD, tmp_path)
    run = MlflowClient().get_run(version_info(model_name, version).run_id)
    get_artifact_repository(run.info.artifact_uri).delete_artifacts(registry.ADAPTER_ARTIFACT_PATH)
    code, _, err = run_promote(capsys, model_name, version)
    assert code == 2
    assert f"{model_name} v{version}'s adapter artifacts are missing" in err and "train a new version" in err
    assert stages(model_name) == {version: "None"} and alias_target(model_name, "production") is None
    code, _, _ = run_promote(capsys, model_name, version, "Archived")  # retiring it still works
    assert code == 0


def test_concurrent_promotions_end_with_exactly_one_production(store, model_name, tmp_path):
    versions = [add_version(model_name, GOOD, tmp_path) for _ in range(5)]
    # Each process starts at the same instant (a shared start file) and promotes its own version.
    start = tmp_path / "go"
    script = (
        "import os, sys, time\n"
        "version = sys.argv[1]\n"
        f"sys.argv = ['promote', '--name', {model_name!r}, '--version', version]\n"
        "from loraflow import entry_points, promote  # noqa: F401 - imported before the start line\n"
        f"open(os.path.join({str(tmp_path)!r}, 'ready-' + version), 'w').close()\n"
        f"while not os.path.exists({str(start)!r}): time.sleep(0.001)\n"
        "sys.exit(entry_points.main('promote', sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    procs = [subprocess.Popen([sys.executable, "-c", script, v], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for v in versions]

    try:
        deadline = time.monotonic() + 120  # every process has imported mlflow and waits at the start line
        while not all((tmp_path / f"ready-{v}").exists() for v in versions):
            assert time.monotonic() < deadline and all(proc.poll() is None for proc in procs), \
                [proc.communicate()[0] for proc in procs if proc.poll() is not None]
            time.sleep(0.05)
        start.touch()
        outputs = [proc.communicate(timeout=180)[0] for proc in procs]
    finally:  # a failure leaves no process polling for the start file
        for proc in procs:
            proc.kill()
            proc.wait()
    assert [proc.returncode for proc in procs] == [0] * len(procs), outputs

    in_production = [v for v, stage in stages(model_name).items() if stage == "Production"]
    assert len(in_production) == 1, stages(model_name)
    assert alias_target(model_name, "production") == in_production[0]
    from mlflow import MlflowClient

    assert not [m for m in MlflowClient().search_registered_models() if m.name == f"{model_name}.lock"]


def test_a_promotion_that_dies_part_way_releases_the_lock_and_the_next_change_completes_it(
        store, model_name, tmp_path, capsys, monkeypatch):
    from mlflow import MlflowClient

    for metrics in (GOOD, GOOD, GOOD):
        add_version(model_name, metrics, tmp_path)
    assert run_promote(capsys, model_name, "1")[0] == 0

    def lost(*args):
        raise ConnectionError("the tracking server went away")

    with monkeypatch.context() as patched:  # dies after the stage moved, before the aliases
        patched.setattr(registry_changes, "_sync_alias", lost)
        with pytest.raises(ConnectionError):
            entry_points.main("promote", ["--name", model_name, "--version", "2", "--reason", "half"])
    assert stages(model_name) == {"1": "Archived", "2": "Production", "3": "None"}
    assert alias_target(model_name, "production") == "1"  # stage and alias disagree
    client = MlflowClient()
    with locked(client, model_name, wait_s=1):  # the lock was released
        pass

    code, out, _ = run_promote(capsys, model_name, "3", "Staging")  # any later change completes it first
    assert code == 0
    assert f"warning: {model_name}: completing a change left half done by " in out
    assert "(v2 -> Production)" in out
    assert alias_target(model_name, "production") == "2"
    assert json.loads(client.get_registered_model(model_name).tags[registry.PRODUCTION_HISTORY_TAG]) == [1, 2]
    v2 = version_info(model_name, "2")
    assert (v2.tags["loraflow.promotion.stage"], v2.tags["loraflow.promotion.reason"]) == ("Production", "half")
    assert "archived: v2 was promoted to Production" in version_info(model_name, "1").description
    assert registry.PENDING_TAG not in client.get_registered_model(model_name).tags
    assert stages(model_name) == {"1": "Archived", "2": "Production", "3": "Staging"}


def test_a_lock_whose_holder_is_gone_is_broken(store, model_name, capsys):
    """A lock with no heartbeat for STALE_AFTER_S (its holder crashed) is removed by the next change."""
    from mlflow import MlflowClient

    from loraflow import registry_lock

    client = MlflowClient()
    silent_since = time.time() - registry_lock.STALE_AFTER_S - 5
    client.create_registered_model(f"{model_name}.lock", description="Held by a crashed process.", tags={
        registry.LOCK_OWNER_TAG: "gone", registry.LOCK_HEARTBEAT_TAG: str(silent_since)})
    with locked(client, model_name, wait_s=5):
        assert client.get_registered_model(f"{model_name}.lock").tags[registry.LOCK_OWNER_TAG] != "gone"
    assert capsys.readouterr().out == (f"warning: removing a stale registry lock '{model_name}.lock' "
                                       "(Held by a crashed process.)\n")
    assert not [m for m in client.search_registered_models() if m.name == f"{model_name}.lock"]


def test_a_slow_live_holder_keeps_its_lock_and_others_time_out(store, model_name, monkeypatch):
    """A holder that takes longer than STALE_AFTER_S keeps its lock through its heartbeat, also after
    a beat failed with an error of any kind; a second change waits wait_s, then gives up naming the
    holder, and leaves the lock alone."""
    import threading

    from mlflow import MlflowClient

    from loraflow import registry_lock

    monkeypatch.setattr(registry_lock, "STALE_AFTER_S", 3)
    monkeypatch.setattr(registry_lock, "HEARTBEAT_S", 0.5)
    client = MlflowClient()
    holding, release = threading.Event(), threading.Event()

    class FirstBeatLost(MlflowClient):
        lost = False

        def set_registered_model_tag(self, *args, **kwargs):
            if not FirstBeatLost.lost:
                FirstBeatLost.lost = True
                raise ConnectionError("the tracking server did not answer")
            return super().set_registered_model_tag(*args, **kwargs)

    def slow_holder() -> None:
        with locked(FirstBeatLost(), model_name):
            holding.set()
            release.wait(30)

    first = threading.Thread(target=slow_holder)
    first.start()
    assert holding.wait(30)
    time.sleep(4)  # past STALE_AFTER_S since the lock was made
    started = time.monotonic()
    with pytest.raises(UserError) as err, locked(client, model_name, wait_s=2):
        pass
    assert time.monotonic() - started >= 2
    assert str(err.value) == (
        f"Another change to {model_name} holds the registry lock '{model_name}.lock' (Held by "
        f"{registry_lock.holder()} while it changes {model_name}.). Try again when it ends; if that process is "
        f"gone, delete the registered model '{model_name}.lock' (it is removed automatically once its holder "
        "has sent no heartbeat for 3 s).")
    assert FirstBeatLost.lost
    release.set()
    first.join()
    assert not [m for m in client.search_registered_models() if m.name == f"{model_name}.lock"]


def test_release_leaves_a_lock_that_another_holder_took_over(store, model_name, capsys):
    """Release is owner-checked: if the lock was broken and taken by another holder meanwhile,
    leaving the block does not delete the new holder's lock."""
    from mlflow import MlflowClient


    client = MlflowClient()
    lock = f"{model_name}.lock"
    with locked(client, model_name):
        client.delete_registered_model(lock)  # as a breaker would, then a new holder:
        client.create_registered_model(lock, tags={registry.LOCK_OWNER_TAG: "the-new-holder"})
    assert client.get_registered_model(lock).tags[registry.LOCK_OWNER_TAG] == "the-new-holder"
    assert capsys.readouterr().out == (f"warning: the registry lock '{lock}' was broken as stale while this "
                                       "process held it; left to its new holder\n")
    client.delete_registered_model(lock)


def test_promote_and_rollback_through_mlflow_run(tracking_uri, tmp_path):
    """The entry points as users start them: `mlflow run . -e promote` / `-e rollback`."""
    v1 = add_version("viggo-smollm2-lora", GOOD, tmp_path)
    v2 = add_version("viggo-smollm2-lora", GOOD, tmp_path)
    mlflow_cli = os.path.join(os.path.dirname(sys.executable), "mlflow")

    def mlflow_run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([mlflow_cli, "run", ".", "--env-manager", "local", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)

    for version in (v1, v2):
        done = mlflow_run("-e", "promote", "-P", f"version={version}", "-P", "reason=release")
        assert done.returncode == 0, done.stderr
    assert "None -> Production" in done.stdout
    assert "FutureWarning" not in done.stderr and "deprecated" not in done.stderr.lower()
    done = mlflow_run("-e", "rollback", "-P", "reason=regression")
    assert done.returncode == 0, done.stderr
    assert alias_target("viggo-smollm2-lora", "production") == v1
    # The runs `mlflow run` made are named after what they did and tagged with the job.
    from mlflow import MlflowClient

    launched = MlflowClient().search_runs(["0"], order_by=["start_time ASC"])
    names = [f"promote-viggo-smollm2-lora-v{v1}-Production", f"promote-viggo-smollm2-lora-v{v2}-Production",
             f"rollback-viggo-smollm2-lora-to-v{v1}"]
    assert [(r.info.run_name, r.data.tags["loraflow.job"]) for r in launched if "loraflow.job" in r.data.tags] == [
        (names[0], "promote"), (names[1], "promote"), (names[2], "rollback")]
    assert all(r.data.tags["mlflow.user"] for r in launched)  # who ran it
    # and that is what a person reads in the MLflow UI's runs table
    with mlflow_server(tracking_uri, str(tmp_path / "artifacts")) as url, chromium() as browser:
        page_text(browser, f"{url}/#/experiments/0?workflowType=machine_learning", ["Run Name", *names],
                  "mlflow-promote-runs.png")


def _measured(scores: dict, version: str = "1"):
    """A stand-in model version carrying measured scores as evaluate writes them."""
    from types import SimpleNamespace

    keys = ("exact_match", "slot_f1", "parse_validity", "intent_accuracy", "rows")
    tags = {f"loraflow.eval.{k}": str(scores[k]) for k in keys if k in scores}
    return SimpleNamespace(version=version, tags={**tags, "loraflow.eval.run_id": "measured"})


@pytest.mark.unit
def test_default_gates_pass_the_default_recipe_and_refuse_smaller_trainings():
    """configs/promote/default.yaml against the committed figures it cites."""
    from loraflow import job_configs, promotion_gates
    from loraflow.job_configs import PromoteConfig

    gates = promotion_gates.load(job_configs.shipped_default(PromoteConfig)).stages
    results = ROOT / "benchmarks" / "results"
    default = json.loads((results / "quality-default.json").read_text())
    assert promotion_gates.check(gates["Production"], "Production", _measured(default), None).passed
    curve = {r["name"]: r["scores"] for f in results.glob("recipe-search-h200-*.json")
             for r in json.loads(f.read_text())["recipes"] if r.get("scores")}
    default_seeds = [s for name, s in curve.items() if name.startswith("n1600x1-b4-lr0.003-r8a16-cosine")]
    assert len(default_seeds) == 2
    for scores in default_seeds:
        assert promotion_gates.check(gates["Production"], "Production", _measured(scores), None).passed
    for name in ("n1000x1-b4-lr0.001-r8a16-cosine-w0.1", "n1000x1-b4-lr0.002-r16a32-cosine-w0.1",
                 "n800x1-b4-lr0.002-r16a32-cosine-w0.1", "n1200x1-b4-lr0.002-r8a16-cosine-w0.1"):
        report = promotion_gates.check(gates["Production"], "Production", _measured(curve[name]), None)
        assert "exact_match" in [c.metric for c in report.failures], name


@SQLITE_ONLY
def test_every_way_of_naming_a_version_resolves_to_it(store, model_name, tmp_path):
    """What evaluate accepts: models:/NAME/N, models:/NAME@ALIAS, models:/NAME/STAGE and the train
    run's id all name the promoted version's adapter (a run id: the run's own artifacts)."""
    from mlflow import MlflowClient

    add_version(model_name, GOOD, tmp_path)
    version = add_version(model_name, GOOD, tmp_path)
    assert entry_points.main("promote", ["--name", model_name, "--version", version]) == 0
    target = MlflowClient().get_model_version(model_name, version)
    for text in (f"models:/{model_name}/{version}", f"models:/{model_name}@production",
                 f"models:/{model_name}/Production"):
        ref = registry.resolve(text)
        assert (ref.version.version, ref.run_id, ref.artifact_uri, ref.base_model) == (
            target.version, target.run_id, target.source, "tiny"), text
        assert ref.label == f"{model_name}-v{version}"
    MlflowClient().set_tag(target.run_id, "loraflow.base_model", "tiny")  # as train tags its run
    by_run = registry.resolve(target.run_id)
    assert (by_run.version, by_run.artifact_uri, by_run.label) == (
        None, f"runs:/{target.run_id}/adapter", f"run-{target.run_id[:8]}")


@SQLITE_ONLY
def test_an_evaluation_recorded_part_way_counts_as_none(store, model_name, tmp_path, capsys, monkeypatch):
    """Writes cut short (the tracking server gone) leave no figures that gates would read: neither
    the new evaluation's first ones nor the old one's."""
    from mlflow import MlflowClient

    add_version(model_name, GOOD, tmp_path)
    writes = []

    def lost_after_two(self, name, version, key, value):
        writes.append(key)
        if len(writes) > 2:
            raise ConnectionError("the tracking server went away")
        return original(self, name, version, key, value)

    original = MlflowClient.set_model_version_tag
    with monkeypatch.context() as patched:
        patched.setattr(MlflowClient, "set_model_version_tag", lost_after_two)
        with pytest.raises(ConnectionError):
            record_evaluation(model_name, "1", {**GOOD, "exact_match": 0.10}, "second-evaluation")
    version = version_info(model_name, "1")
    assert registry.EVAL_RUN_TAG not in version.tags and registry.eval_metrics(version) == {}
    code, _, err = run_promote(capsys, model_name, "1")
    assert code == 2 and "v1 has no evaluation yet: run `mlflow run . -e evaluate" in err
    record_evaluation(model_name, "1", {"exact_match": 0.7, "rows": 10.0}, "third-evaluation")
    assert registry.eval_metrics(version_info(model_name, "1")) == {"exact_match": 0.7, "rows": 10.0}
