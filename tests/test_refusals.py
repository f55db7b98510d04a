"""The refusals that the other test files do not cover (docs/reliability.md's bad input catalogue
lists every one with its test). Each is triggered as cheaply as it can be: an entry point's own
main() in this process, against a fresh SQLite store, where the refusal is on an entry point's
path (exit code 2, the whole message, no traceback, and nothing written: no run, no version, no
tag, no promotion, no store folder); the module's function where no entry point reaches it
before training. Nothing here trains, starts vLLM, Ray or Ray Serve."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY_CONFIG, config_with, entry_point, task_tags
from servers import free_port

from loraflow import base_models, console, entry_points, registry
from loraflow.errors import UserError


@pytest.fixture(autouse=True)
def _entry_point_state():
    """An entry point's main() sets process-wide state (quiet-mode variables, warning filters,
    logger levels, SIGTERM and SIGINT handlers): put it back, so that the files after this one see none."""
    environ, filters = dict(os.environ), list(warnings.filters)
    levels = {name: logging.getLogger(name).level for name in console._QUIET_LOGGERS}
    handlers = {stopping: signal.getsignal(stopping) for stopping in (signal.SIGTERM, signal.SIGINT)}
    yield
    os.environ.clear()
    os.environ.update(environ)
    warnings.filters[:] = filters
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    for stopping, handler in handlers.items():
        signal.signal(stopping, handler)


def refused(name: str, argv: list[str], capsys) -> str:
    """Run entry point `name` in this process; it must exit 2 with one plain error message. Returns it."""
    code = entry_points.main(name, argv)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    assert err.count("error: ") == 1, err[-3000:]
    return err[err.index("error: ") + len("error: "):].rstrip("\n")


def nothing_written() -> None:
    """No run, no registered model (a lock included) in the store."""
    from mlflow import MlflowClient

    client = MlflowClient()
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    assert client.search_registered_models() == []


def _weights() -> bytes:
    import numpy as np
    from safetensors.numpy import save

    return save({"lora_A": np.zeros((8, 16), dtype=np.float32)})


def add_version(tmp_path: Path, name: str, tags: dict[str, str], run_tags: dict[str, str] | None = None,
                task: bool = True):
    """A version registered the way train registers one (a real adapter folder, its digests, its
    task and prompt unless `task` is false)."""
    import mlflow

    folder = tmp_path / f"adapter-{name}"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(_weights())
    with mlflow.start_run() as run:
        mlflow.set_tags(run_tags or {})
        mlflow.log_artifacts(str(folder), artifact_path=registry.ADAPTER_ARTIFACT_PATH)
    tags = {**task_tags(run.info.run_id), **tags} if task else tags
    return registry.register_adapter(name, run.info.run_id, tags, "test adapter", registry.file_digests(folder))


def store_state() -> list:
    """Every run (id, status, tags) and version (stage, tags, aliases): what a refusal must leave alone."""
    from mlflow import MlflowClient

    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return ([(r.info.run_id, r.info.status, r.data.tags, r.data.metrics) for r in runs]
            + [(m.name, m.aliases, [(v.version, v.current_stage, v.tags) for v in
                                    client.search_model_versions(f"name='{m.name}'")])
               for m in client.search_registered_models()])


# -- train: the config, the overrides, the data ------------------------------------------------

def _train_config(tmp_path: Path, drop: tuple[str, ...] = (), **changes) -> Path:
    return config_with(TINY_CONFIG, tmp_path, drop, **changes)


def _info(viggo: Path, **entries) -> None:
    info = json.loads((viggo / "dataset_info.json").read_text())
    info.update(entries)
    (viggo / "dataset_info.json").write_text(json.dumps(info))


_HOW = ("entry_without_file_name", "info_not_json", "info_not_a_mapping", "info_entry_not_a_mapping",
        "json_file_not_json",
        "json_file_not_a_list", "json_item_not_an_object", "jsonl_row_not_an_object", "two_instructions")


def _damage(viggo: Path, how: str) -> None:
    alpaca = {"formatting": "alpaca"}
    if how == "entry_without_file_name":
        _info(viggo, **{"viggo-train": alpaca})
    elif how == "info_not_json":
        (viggo / "dataset_info.json").write_text('{"viggo-train": ')
    elif how == "info_not_a_mapping":
        (viggo / "dataset_info.json").write_text('["viggo-train", "viggo-val"]')
    elif how == "info_entry_not_a_mapping":  # was a TypeError and a traceback
        _info(viggo, **{"viggo-train": 3})
    elif how == "json_file_not_json":
        _info(viggo, **{"viggo-train": {**alpaca, "file_name": "train.json"}})
        (viggo / "train.json").write_text('[{"instruction": "x",\n "input": ')
    elif how == "json_file_not_a_list":
        _info(viggo, **{"viggo-train": {**alpaca, "file_name": "train.json"}})
        (viggo / "train.json").write_text('{"instruction": "x", "input": "y", "output": "z"}')
    elif how == "json_item_not_an_object":
        _info(viggo, **{"viggo-train": {**alpaca, "file_name": "train.json"}})
        (viggo / "train.json").write_text('[{"instruction": "x", "input": "y", "output": "z"}, "row two"]')
    elif how == "jsonl_row_not_an_object":
        lines = (viggo / "train.jsonl").read_text().splitlines()
        lines[2] = '["instruction", "input", "output"]'
        (viggo / "train.jsonl").write_text("\n".join(lines) + "\n")
    elif how == "two_instructions":  # a task trains with one prompt, which the version keeps
        lines = (viggo / "train.jsonl").read_text().splitlines()
        lines[2] = json.dumps({**json.loads(lines[2]), "instruction": "Parse the sentence."})
        (viggo / "train.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("how, message", [
    ("entry_without_file_name", "Dataset 'viggo-train' in {viggo}/dataset_info.json has no file_name."),
    ("info_not_json", "{viggo}/dataset_info.json is not valid JSON: Expecting value: line 1 column 17 (char 16)"),
    ("info_not_a_mapping", "{viggo}/dataset_info.json must map dataset names to their specs."),
    ("info_entry_not_a_mapping", "{viggo}/dataset_info.json must map dataset names to their specs."),
    ("json_file_not_json", "{viggo}/train.json: not valid JSON (line 2): Expecting value"),
    ("json_file_not_a_list", "{viggo}/train.json: a .json data file must hold a list of objects."),
    ("json_item_not_an_object", "{viggo}/train.json item 2: expected a JSON object, got str."),
    ("jsonl_row_not_an_object", "{viggo}/train.jsonl line 3: expected a JSON object, got list."),
    ("two_instructions", "dataset viggo-train: the rows carry 2 different instructions; a task trains with one "
                         "prompt, so give every row the same instruction (or split the data into one dataset a task)."),
], ids=_HOW)
def test_train_refuses_bad_data_before_a_run(tracking_uri, tmp_path, viggo_copy, capsys, how, message):

    _damage(viggo_copy, how)
    config = _train_config(tmp_path, dataset_dir=str(viggo_copy))
    assert refused("train", ["--config", str(config)], capsys) == message.format(viggo=viggo_copy.resolve())
    nothing_written()


def test_train_refuses_a_remote_dataset_dir_that_cannot_be_downloaded(tracking_uri, tmp_path, capsys, monkeypatch):
    from loraflow import datasets

    monkeypatch.setattr(datasets, "CACHE_DIR", tmp_path / "cache")
    url = f"http://127.0.0.1:{free_port()}/viggo"  # nothing listens there
    message = refused("train", ["--config", str(_train_config(tmp_path, dataset_dir=url))], capsys)
    assert message.startswith(f"Cannot download {url}/dataset_info.json: <urlopen error ")
    assert "Connection refused" in message and message.endswith(".")
    nothing_written()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("config, overrides, message", [
    ("lora_rank: [8\n", "", "Training config {path} is not valid YAML (while parsing a flow sequence); see "
     "configs/train/default.yaml."),
    ("- lora_rank\n- dataset\n", "", "Training config {path} must hold a mapping of keys to values; see "
     "configs/train/default.yaml."),
    (None, "{max_samples: 5", "overrides is not valid YAML (while parsing a flow mapping): write a mapping such as "
     "'{{max_samples: 50}}'."),
    ({"ray_num_workers": 0}, "", "{path}: ray_num_workers must be at least 1, got 0."),
    (None, "{learning_rate: -0.001}",  # LLaMA-Factory's optimizer would refuse it after Ray started (exit 1)
     "Invalid training config:\n  learning_rate -0.001 in {path} with overrides {{learning_rate}} must be > 0"),
    ({"ray_max_failures": -2}, "", "{path}: ray_max_failures must be -1 (retry forever) or >= 0."),
    ({"drop": ("model_name_or_path",)}, "",
     "model_name_or_path is missing from the config; set it to a model folder or hub id."),
    ({"drop": ("dataset",)}, "", "dataset is missing from the config; name datasets from dataset_info.json."),
    # /sys refuses new folders even to root, as a read-only file system refuses everyone
    (None, "{output_dir: /sys/loraflow-test/out}", "output_dir /sys/loraflow-test/out cannot be written (Operation "
     "not permitted); set output_dir in the config to a folder this user can write to, with free space."),
    (None, "{ray_storage_path: /sys/loraflow-test/ray}", "ray_storage_path /sys/loraflow-test/ray cannot be written "
     "(Operation not permitted); set ray_storage_path in the config to a folder this user can write to, with free "
     "space."),
], ids=["config_not_yaml", "config_not_a_mapping", "overrides_not_yaml", "no_workers", "negative_learning_rate",
        "max_failures",
        "no_model", "no_dataset", "output_dir_not_writable", "ray_storage_not_writable"])
def test_train_refuses_a_bad_config_before_a_run(tracking_uri, tmp_path, capsys, config, overrides, message):

    if isinstance(config, str):
        path = tmp_path / "train.yaml"
        path.write_text(config)
    else:
        changes = dict(config or {})
        path = _train_config(tmp_path, drop=changes.pop("drop", ()), **changes)
    got = refused("train", ["--config", str(path), "--overrides", overrides], capsys)
    expected = message.format(path=path)
    assert got.startswith(expected), got
    if "YAML:" not in expected:
        assert got == expected
    nothing_written()


def test_a_credential_in_mlflow_run_overrides_is_refused_and_erased_from_the_store(tracking_uri, tmp_path):
    """`mlflow run` logs -P overrides as a parameter of its run before train starts: the refusal
    deletes it, so that the credential is in no parameter, tag or run name, nor in the database's bytes."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    secret = "hf_canary_s3cret_0836"
    proc = subprocess.run([sys.executable, "-m", "mlflow", "run", ".", "-e", "train", "--env-manager", "local",
                           "-P", f"overrides={{hub_token: {secret}}}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=os.environ.copy())
    assert proc.returncode == 1, proc.stderr[-3000:]  # `mlflow run`'s own code for a failed entry point
    assert f"error: Invalid training config:\n  hub_token in {ROOT / 'configs/train/default.yaml'} with overrides {{hub_token}} holds a " \
           "credential (its name says so)." in proc.stderr, proc.stderr[-3000:]
    client = MlflowClient()
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()], run_view_type=ViewType.ALL)
    assert run.info.status == "FAILED" and "config" in run.data.params and "overrides" not in run.data.params
    assert secret not in json.dumps([run.data.params, run.data.tags, run.info.run_name])
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    assert all(secret.encode() not in path.read_bytes() for path in database.parent.glob("mlflow.db*"))


@pytest.mark.parametrize("job", ["evaluate", "train"])
def test_messages_name_the_store_without_the_uris_query(tracking_uri, tmp_path, capsys, monkeypatch, job):
    """The URI's user info and query are where credentials travel: messages leave them out."""

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"{tracking_uri}?timeout=20")
    run_id = "0123456789abcdef0123456789abcdef"
    if job == "evaluate":
        message = refused("evaluate", ["--model", run_id, "--config", str(_eval_config(tmp_path))], capsys)
        assert message == f"Model reference {run_id!r}: there is no run with that id in {tracking_uri}."
    else:
        message = refused("train", ["--resume", run_id], capsys)
        assert message == (f"resume={run_id}: there is no training run with that id and a logged config in "
                           f"{tracking_uri}.")
    nothing_written()


def test_train_refuses_to_resume_a_finished_training(tracking_uri, capsys):
    """Without training first (test_train_job covers it after a real one): a finished run with a config."""
    import mlflow


    with mlflow.start_run() as run:
        mlflow.set_tags({"loraflow.job": "train", "loraflow.registered_model": "viggo-tiny-lora"})
        mlflow.log_text(TINY_CONFIG.read_text(), "config/train_config.yaml")
    before = store_state()
    assert refused("train", ["--resume", run.info.run_id], capsys) == (
        f"resume={run.info.run_id}: that training finished (see its run); there is nothing to continue. "
        "Start a new training instead.")
    assert store_state() == before


def test_train_refuses_to_resume_a_training_stopped_after_it_registered(tracking_uri, capsys, tmp_path):
    """SIGTERM right after registration: the run ends KILLED with its version registered, and the
    tag that says so unwritten. A resume would register the same adapter a second time."""
    import mlflow

    from loraflow import registry

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with mlflow.start_run() as run:
        mlflow.set_tags({"loraflow.job": "train", "loraflow.registered_model": "viggo-tiny-lora",
                         "loraflow.ray_run": "loraflow_sft-0123abcd"})
        mlflow.log_text(TINY_CONFIG.read_text(), "config/train_config.yaml")
        mlflow.log_artifacts(str(adapter), registry.ADAPTER_ARTIFACT_PATH)
    mlflow.MlflowClient().set_terminated(run.info.run_id, "KILLED")
    registry.register_adapter("viggo-tiny-lora", run.info.run_id, {}, "test", registry.file_digests(adapter))
    before = store_state()
    assert refused("train", ["--resume", run.info.run_id], capsys) == (
        f"resume={run.info.run_id}: that training registered viggo-tiny-lora version 1 before it was stopped; "
        "there is nothing to continue. Evaluate that version, or start a new training.")
    assert store_state() == before


@pytest.mark.parametrize("driver, message", [
    (None, "that run is still marked RUNNING and records no driver process, so loraflow cannot tell whether it "
           "still trains. Stop it first, or wait until it ends."),
    ("another-host 4242 123", "that run is still marked RUNNING by a driver on host another-host; resume it there, "
                              "where loraflow can check that the driver is gone."),
    ("this process", "that training is still running (pid {pid} on this host); wait for it to end, or stop it "
                     "(Ctrl-C, or kill that pid), then resume."),
    ("continued", "run 0123456789abcdef already continues that training; resume that run instead, if it did not "
                  "finish."),
], ids=["no_driver", "driver_on_another_host", "driver_alive", "already_continued"])
def test_train_refuses_to_resume_a_training_that_may_still_run(tracking_uri, capsys, driver, message):
    """Without training first (test_train_job covers a live and a dead driver after a real one)."""
    import mlflow

    from loraflow import processes

    tags = {"loraflow.job": "train", "loraflow.registered_model": "viggo-tiny-lora"}
    if driver == "this process":
        tags["loraflow.driver"] = processes.identity()
    elif driver == "continued":
        tags["loraflow.resumed_by"] = "0123456789abcdef"
    elif driver is not None:
        tags["loraflow.driver"] = driver
    client = mlflow.MlflowClient()
    run = client.create_run("0", tags=tags)  # RUNNING until ended
    client.log_text(run.info.run_id, TINY_CONFIG.read_text(), "config/train_config.yaml")
    if driver == "continued":
        client.set_terminated(run.info.run_id, "KILLED")
    before = store_state()
    assert refused("train", ["--resume", run.info.run_id], capsys) == (
        f"resume={run.info.run_id}: " + message.format(pid=os.getpid()))
    assert store_state() == before


def test_an_adapter_that_training_did_not_write_is_refused(tmp_path):
    """After LLaMA-Factory returned: reached only by a training run, so checked on the function."""
    from loraflow import ray_training

    output_dir, dest = tmp_path / "out", tmp_path / "dest"
    output_dir.mkdir()
    dest.mkdir()
    (output_dir / "trainer_log.jsonl").write_text("{}\n")
    with pytest.raises(UserError) as err:
        ray_training._copy_outputs(output_dir, dest)
    assert str(err.value) == f"training wrote no adapter_config.json into {output_dir}"


# -- evaluate: its config, the model reference, the version's base model ------------------------

def _bad_config(tmp_path: Path, changes, make) -> Path:
    """A parametrised case's config file: "missing" (no file), text as written, or the shipped
    config made by `make` with keys changed (and those under "drop" removed)."""
    if changes == "missing":
        return tmp_path / "nothing.yaml"
    if isinstance(changes, str):
        path = tmp_path / "config.yaml"
        path.write_text(changes)
        return path
    changes = dict(changes)
    return make(tmp_path, drop=changes.pop("drop", ()), **changes)


def _eval_config(tmp_path: Path, drop: tuple[str, ...] = (), **changes) -> Path:
    return config_with("evaluate", tmp_path, drop, **changes)


@pytest.mark.parametrize("changes, message", [
    ("missing", "Evaluation config {path} does not exist; see configs/evaluate/default.yaml."),
    ("- engine\n", "Evaluation config {path} must hold a mapping of keys to values; see "
                   "configs/evaluate/default.yaml."),
    ("engine: [16\n", "Evaluation config {path} is not valid YAML (while parsing a flow sequence); see "
                      "configs/evaluate/default.yaml."),
    ({"drop": ("engine",), "engin": {"max_lora_rank": 16}},
     "Evaluation config {path}: engine is missing (vLLM engine arguments, or the engine profile that holds them "
     "(configs/engines/*.yaml, shared with serve); max_lora_rank is required); engin is not a known key; see "
     "configs/evaluate/default.yaml."),
    ({"engine": "bfloat16"}, "Evaluation config {path}: engine bfloat16 is no engine profile file: name one in "
                             "configs/engines/; see configs/evaluate/default.yaml."),
    ({"engine": ["bfloat16"]}, "Evaluation config {path}: engine should be a valid dictionary, got ['bfloat16']; "
                               "see configs/evaluate/default.yaml."),
    ({"engine_env": ["OMP_NUM_THREADS=1"]}, "Evaluation config {path}: engine_env should be a valid dictionary, got "
                                            "['OMP_NUM_THREADS=1']; see configs/evaluate/default.yaml."),
    ({"engine_env": {"OMP_NUM_THREADS": 1}},
     "Evaluation config {path}: engine_env.OMP_NUM_THREADS should be a valid string, got 1 (quote it); see "
     "configs/evaluate/default.yaml."),
    ({"engine": {"max_lora_rank": "16", "dtype": "bfloat16"}},
     "Evaluation config {path}: engine needs max_lora_rank, a whole number >= 1 (the largest adapter rank served), "
     "got '16'; see configs/evaluate/default.yaml."),
    ({"merge_adapter": "yes"}, "Evaluation config {path}: merge_adapter should be a valid boolean, got 'yes'; see "
                               "configs/evaluate/default.yaml."),
    ({"merge_adapter": True, "lora_store": "s3://bucket/adapters"},
     "Evaluation config {path}: merge_adapter: true evaluates on this machine's engines, lora_store sends the "
     "adapter to engines on other nodes; set merge_adapter: false to evaluate through the LoRA store; see "
     "configs/evaluate/default.yaml."),
    ({"max_rows": 0, "batch_size": 64.5},
     "Evaluation config {path}: max_rows should be greater than or equal to 1, got 0; batch_size should be a valid "
     "integer, got 64.5; see configs/evaluate/default.yaml."),
], ids=["missing", "not_a_mapping", "not_yaml", "keys", "engine_not_a_profile", "engine_not_a_mapping",
        "engine_env_not_a_mapping",
        "engine_env_not_strings", "max_lora_rank", "merge_adapter_not_bool", "merge_adapter_with_lora_store",
        "numbers"])
def test_evaluate_refuses_a_bad_config_first(tracking_uri, tmp_path, capsys, changes, message):

    path = _bad_config(tmp_path, changes, _eval_config)
    assert refused("evaluate", ["--model", "models:/viggo-eval/1", "--config", str(path)], capsys) == (
        message.format(path=path))
    nothing_written()


SECRET = "hf_canary_s3cret_5150"  # planted in configs: it must show up nowhere
CREDENTIAL_FIX = ("credentials do not belong in a config, which is logged to MLflow and shown on Ray's dashboard; "
                  "leave it out and set it in the environment of the Ray nodes instead (on a local instance: the "
                  "environment you start the job in), where the engines read it")


@pytest.mark.parametrize("changes, found", [
    ({"engine_env": {"HF_TOKEN": SECRET, "OMP_NUM_THREADS": "1"}}, "engine_env.HF_TOKEN holds a credential (its name "
                                                                   "says so)"),
    ({"engine": {"max_lora_rank": 16, "hf_token": SECRET}}, "engine.hf_token holds a credential (its name says so)"),
    ({"dataset_dir": f"https://{SECRET}@data.example/viggo"},
     "dataset_dir holds a credential (a user name in it (https://NAME@host), which web servers take as a token)"),
], ids=["engine_env", "engine", "dataset_url"])
def test_evaluate_refuses_a_credential_in_its_config_and_shows_it_nowhere(tracking_uri, tmp_path, capsys, changes,
                                                                          found):
    """The config becomes the run's parameters and engine_env Ray's runtime_env: refused before either exists."""

    path = _eval_config(tmp_path, **changes)
    code = entry_points.main("evaluate", ["--model", "models:/viggo-eval/1", "--config", str(path)])
    out, err = capsys.readouterr()
    assert code == 2
    assert err == f"error: Evaluation config {path}: {found}: {CREDENTIAL_FIX}; see configs/evaluate/default.yaml.\n"
    assert SECRET not in out + err
    nothing_written()  # no run: no parameter, tag or artifact


def test_the_evaluate_script_refuses_an_engine_profile_that_is_not_one(tracking_uri, tmp_path):
    """The process users start (it moves itself into the infer environment): exit 2, no traceback."""
    profile = tmp_path / "engine.yaml"
    profile.write_text("- bfloat16\n")
    path = _eval_config(tmp_path, engine=str(profile))
    proc = subprocess.run([*entry_point("evaluate"), "--model", "models:/viggo-eval/1",
                           "--config", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=os.environ.copy())
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.endswith(f"error: Evaluation config {path}: engine {profile} must hold a mapping of vLLM "
                                "engine arguments to values; see configs/evaluate/default.yaml.\n"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    nothing_written()


TINY = "./.cache/models/tiny-smollm2"


@pytest.mark.parametrize("kind", ["not_understood", "not_a_selector", "run_without_base_model",
                                  "version_without_base_model", "no_base_model_id", "base_model_not_here", "no_task"])
def test_evaluate_refuses_what_it_cannot_check_before_a_run(tracking_uri, tmp_path, capsys, kind):

    text = "models:/viggo-eval/1"
    if kind == "not_understood":
        text, message = "viggo-eval/1", (
            "Model reference 'viggo-eval/1' is not understood: use models:/NAME/VERSION, models:/NAME@ALIAS, "
            "models:/NAME/STAGE (Staging, Production, Archived) or a run id.")
        add_version(tmp_path, "viggo-eval", {"loraflow.base_model": TINY})
    elif kind == "not_a_selector":
        text, message = "models:/viggo-eval/latest", (
            "Model reference 'models:/viggo-eval/latest': 'latest' is neither a version number nor a stage.")
        add_version(tmp_path, "viggo-eval", {"loraflow.base_model": TINY})
    elif kind == "run_without_base_model":
        text = add_version(tmp_path, "viggo-eval", {"loraflow.base_model": TINY}).run_id
        message = f"{text} does not come from a loraflow train run (it has no loraflow.base_model tag)."
    elif kind == "version_without_base_model":
        add_version(tmp_path, "viggo-eval", {})
        message = f"{text} does not come from a loraflow train run (it has no loraflow.base_model tag)."
    elif kind == "no_base_model_id":
        add_version(tmp_path, "viggo-eval", {"loraflow.base_model": TINY})
        message = (f"{text} has no {registry.BASE_MODEL_ID_TAG} tag, so its base model cannot be checked (it was "
                   "registered by hand or by an older loraflow): train a new version.")
    elif kind == "base_model_not_here":
        add_version(tmp_path, "viggo-eval", {"loraflow.base_model": "./.cache/models/no-such-model",
                                             registry.BASE_MODEL_ID_TAG: "no-such-model@sha256:0123456789abcdef"})
        message = "Base model ./.cache/models/no-such-model is not on this machine; run ./setup.sh."
    else:
        add_version(tmp_path, "viggo-eval", {"loraflow.base_model": TINY,
                                             registry.BASE_MODEL_ID_TAG: base_models.base_model_identity(TINY)},
                    task=False)
        message = (f"{text} records no task or prompt (loraflow.task, loraflow.prompt): it was registered by an "
                   "older loraflow or by hand; train a new version.")
    before = store_state()
    assert refused("evaluate", ["--model", text, "--config", str(_eval_config(tmp_path, max_rows=4))],
                   capsys) == message
    assert store_state() == before  # no evaluation run, no loraflow.eval.* tags


# -- serve: its config, the served version, the base model -------------------------------------

def _serve_config(tmp_path: Path, drop: tuple[str, ...] = (), **changes) -> Path:
    return config_with("serve", tmp_path, drop, **{"port": free_port(), "api_key_env": "LORAFLOW_REFUSALS_API_KEY",
                                                   **changes})


@pytest.mark.parametrize("where, key", [(("runtime_env", "env_vars"), "HF_TOKEN"), (("engine_kwargs",), "hf_token")],
                         ids=["runtime_env", "engine_kwargs"])
def test_serve_refuses_a_credential_in_llm_config_and_shows_it_nowhere(tracking_uri, tmp_path, capsys, where, key):
    """LLMConfig's runtime_env and engine arguments are shown on Ray's dashboard."""

    llm_config = yaml.safe_load((ROOT / "configs/serve/default.yaml").read_text())["llm_config"]
    section = llm_config
    for name in where:
        section = section.setdefault(name, {})
    section[key] = SECRET
    path = _serve_config(tmp_path, llm_config=llm_config)
    code = entry_points.main("serve", ["--name", "viggo-serve", "--config", str(path)])
    out, err = capsys.readouterr()
    assert code == 2
    assert err == (f"error: Serving config {path}: llm_config.{'.'.join(where)}.{key} holds a credential (its name "
                   f"says so): {CREDENTIAL_FIX}; see configs/serve/default.yaml.\n")
    assert SECRET not in out + err
    nothing_written()


@pytest.mark.parametrize("changes, message", [
    ("missing", "Serving config {path} does not exist; see configs/serve/default.yaml."),
    ({"drop": ("poll_interval_s",), "workers": 2},
     "Serving config {path}: poll_interval_s is missing (seconds between the server's looks at the registry); "
     "workers is not a known key; see configs/serve/default.yaml."),
    ("[host, port]", "Serving config {path} must hold a mapping of keys to values; see configs/serve/default.yaml."),
    ({"metrics_interval_s": 0},
     "Serving config {path}: metrics_interval_s should be greater than 0, got 0; see configs/serve/default.yaml."),
    ({"metrics_export_port": "8080"},
     "Serving config {path}: metrics_export_port should be a valid integer, got '8080'; see "
     "configs/serve/default.yaml."),
    ({"allow_unauthenticated": "no", "port": 70000},
     "Serving config {path}: port should be less than or equal to 65535, got 70000; allow_unauthenticated should "
     "be a valid boolean, got 'no'; see configs/serve/default.yaml."),
    ({"traces": {"sample_rate": 2, "redact": []}},
     "Serving config {path}: traces.sample_rate should be less than or equal to 1, got 2; see "
     "configs/serve/default.yaml."),
    ({"traces": {"sample_rate": 0.1, "redact": ["[a-"]}},
     "Serving config {path}: traces.redact '[a-' is not a regular expression (unterminated character set at "
     "position 0); see configs/serve/default.yaml."),
], ids=["missing", "keys", "not_a_mapping", "metrics_interval", "metrics_port", "port_and_auth",
        "trace_rate", "trace_redact"])
def test_serve_refuses_a_bad_config_first(tracking_uri, tmp_path, capsys, changes, message):

    path = _bad_config(tmp_path, changes, _serve_config)
    assert refused("serve", ["--name", "viggo-serve", "--config", str(path)], capsys) == message.format(path=path)
    nothing_written()


@pytest.mark.parametrize("tags, message", [
    ({}, "viggo-serve v1 does not come from a loraflow train run (it has no loraflow.base_model tag)."),
    ({"loraflow.base_model": TINY}, "viggo-serve v1 has no loraflow.base_model_id tag, so its base model cannot "
                                    "be checked (it was registered by hand or by an older loraflow): train a new "
                                    "version."),
], ids=["no_base_model", "no_base_model_id"])
def test_serve_refuses_a_version_it_cannot_check_before_starting_anything(tracking_uri, tmp_path, capsys,
                                                                          monkeypatch, tags, message):
    from mlflow import MlflowClient


    version = add_version(tmp_path, "viggo-serve", tags)
    MlflowClient().set_registered_model_alias("viggo-serve", "production", version.version)
    monkeypatch.delenv("LORAFLOW_REFUSALS_API_KEY", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    before = store_state()
    assert refused("serve", ["--name", "viggo-serve", "--config", str(_serve_config(tmp_path))], capsys) == message
    assert store_state() == before
    assert "AWS_ENDPOINT_URL_S3" not in os.environ  # no LoRA store was started, nothing published


def test_serve_refuses_a_model_source_other_than_the_versions_base_model():
    """Checked on the function: in serve_forever it comes before the adapter is published or Ray starts."""
    from loraflow import adapter_store, serve

    config = serve.load_config(str(ROOT / "configs/serve/default.yaml"))
    config.llm_config["model_loading_config"]["model_source"] = "/models/another-model"
    with pytest.raises(UserError) as err:
        serve.llm_config(config, TINY, adapter_store.LoraStore("s3://loraflow-adapters/adapters", {}))
    assert str(err.value) == (
        f"The served version was trained on {TINY}, but the serving config's model_source is /models/another-model; "
        f"set it to null or to {TINY}.")


# -- promote: the gates file --------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    ("stages: {Production: {minimal: {exact_match: 0.9}}}",
     "Promotion config {path}: stages.Production.minimal is not a known key; see configs/promote/default.yaml."),
    ("stages: {Production: {compare_with_production: {max_regression: 0.05}}}",
     "Promotion config {path}: stages.Production.compare_with_production.metric is missing (the metric compared "
     "with the version in Production now); see configs/promote/default.yaml."),
    # These two were an AttributeError and a ValueError, each with a traceback:
    ("stages: {Production: {minimum: 0.5}}",
     "Promotion config {path}: stages.Production.minimum should be a valid dictionary, got 0.5; see "
     "configs/promote/default.yaml."),
    ("stages: {Production: {compare_with_production: {metric: exact_match, max_regression: lots}}}",
     "Promotion config {path}: stages.Production.compare_with_production.max_regression should be a valid number, "
     "got 'lots'; see configs/promote/default.yaml."),
], ids=["unknown_gate_key", "compare_without_metric", "minimum_not_a_mapping", "max_regression_not_a_number"])
def test_promote_refuses_a_bad_gate_and_moves_nothing(tracking_uri, tmp_path, capsys, content, message):

    add_version(tmp_path, "viggo-promote", {"loraflow.base_model": TINY})
    path = tmp_path / "gates.yaml"
    path.write_text(content)
    before = store_state()
    assert refused("promote", ["--name", "viggo-promote", "--version", "1", "--config", str(path)],
                   capsys) == message.format(path=path)
    assert store_state() == before


def test_the_promote_script_refuses_force_that_is_not_a_boolean(tracking_uri, tmp_path):
    """`-P force=maybe` through the process users start: exit 2 (not 1), nothing moved."""
    add_version(tmp_path, "viggo-promote", {"loraflow.base_model": TINY})
    before = store_state()
    proc = subprocess.run([*entry_point("promote"), "--name", "viggo-promote",
                           "--version", "1", "--force", "maybe"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=os.environ.copy())
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.endswith("error: force must be true or false, not 'maybe'.\n"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert store_state() == before


# -- pipeline: every step's config is checked before training --------------------------------

@pytest.mark.parametrize("argument, value, message", [
    ("--eval-config", "missing-eval.yaml",
     "Evaluation config {value} does not exist; see configs/evaluate/default.yaml."),
    ("--promote-config", "missing-gates.yaml",
     "Promotion config {value} does not exist; see configs/promote/default.yaml."),
    ("--promote-stage", "Prod", "Unknown stage 'Prod': use one of Staging, Production, Archived."),
], ids=["eval_config", "gates", "stage"])
def test_the_pipeline_refuses_a_later_steps_bad_input_before_training(tracking_uri, tmp_path, capsys, argument,
                                                                      value, message):

    if value.endswith(".yaml"):
        value = str(tmp_path / value)
    assert refused("pipeline", ["--train-config", str(TINY_CONFIG), argument, value], capsys) == (
        message.format(value=value))
    nothing_written()


@pytest.mark.parametrize("name, args", [
    ("train", ["--config", "configs/train/tiny.yaml"]),
    ("evaluate", ["--model", "models:/viggo-tiny-lora/1"]),
    ("promote", ["--name", "viggo-tiny-lora", "--version", "1"]),
    ("serve", ["--name", "viggo-tiny-lora"]),
])
def test_an_unreachable_tracking_server_is_named_at_once(name, args):
    """Not MLflow's minutes of retries and a traceback: exit 2 naming the server, nothing started."""
    uri = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run([*entry_point(name), *args], cwd=ROOT,
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"The tracking server {uri} cannot be reached (" in proc.stderr
    assert "start it, or point MLFLOW_TRACKING_URI at a running one." in proc.stderr
    assert "Traceback" not in proc.stderr
