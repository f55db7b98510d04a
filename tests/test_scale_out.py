"""Every entry point, unchanged, on the distributed setup: an `mlflow server` with a PostgreSQL
backend store and proxied artifacts on S3 (moto's S3 server), and a two-node Ray cluster
(`ray start --head` plus a second node) reached through RAY_ADDRESS. Training spreads its two
workers over both nodes and checkpoints to S3; evaluation and serving load the adapter from the
S3 LoRA store. Besides, a credential is planted in each place a user might give one (an evaluation
config's engine_env and dataset URL, train's overrides with and without `mlflow run`, the tracking URI),
each refused before any Ray work. Afterwards no secret, neither the environment's (AWS keys, HF token,
API key) nor a planted one, may appear anywhere MLflow keeps something (runs with their params, tags and
dataset inputs, experiments, registered models and versions, logged models, traces, artifacts and
everything else in the bucket), in any entry point's output, in the Ray nodes' logs, or in what Ray's
dashboard shows (actors', tasks' and jobs' runtime_env, Serve's deployments).
All servers listen on this machine, started and stopped by the test. Each step runs once, in a
module fixture that needs the steps before it, and each test checks one step's result: any test
runs alone or in any order."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import openai
import pytest
import yaml
from conftest import ROOT, TINY_CONFIG, entry_point
from google.protobuf.json_format import MessageToJson
from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from servers import Lines, free_port, mlflow_server, postgres_server, ray_cluster, ray_dashboard, s3_server

BUCKET = "loraflow-cluster"
NAME = "viggo-cluster-lora"
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIALORAFLOWTEST0001",
    "AWS_SECRET_ACCESS_KEY": "loraflow-aws-secret-do-not-log",
    "HF_TOKEN": "hf_loraflow_token_do_not_log",
    "LORAFLOW_API_KEY": "sk-loraflow-api-key-do-not-log",
}
# Credentials a user gives where they do not belong, one each (the fixture `refused`): each is refused,
# and afterwards searched for like SECRETS.
PLANTED = {
    "engine_env.HF_TOKEN": "hf_planted_engine_env_do_not_log",
    "dataset_dir (https://TOKEN@host)": "planted-dataset-url-token-do-not-log",
    "hub_token in train.py --overrides": "hf_planted_train_overrides_do_not_log",
    "hub_token in mlflow run -P overrides": "hf_planted_mlflow_run_overrides_do_not_log",
    "MLFLOW_TRACKING_URI (http://TOKEN@host)": "planted-tracking-uri-user-do-not-log",
    "MLFLOW_TRACKING_URI (?token=)": "planted-tracking-uri-query-do-not-log",
}
# `mlflow run`'s own lines around the entry point's output: the command it starts (every -P value as
# typed) and the links to the run under the tracking URI (as set).
_MLFLOW_ECHO = re.compile(r"^(?:🏃 View run \S+ at: |🧪 View experiment at: "
                          r"|.* INFO mlflow\.projects\.backend\.local: === Running command )")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with s3_server() as endpoint:
        s3_env = {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_REGION": "us-east-1",
                  "AWS_ACCESS_KEY_ID": SECRETS["AWS_ACCESS_KEY_ID"],
                  "AWS_SECRET_ACCESS_KEY": SECRETS["AWS_SECRET_ACCESS_KEY"]}
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x",
                     aws_secret_access_key="x").create_bucket(Bucket=BUCKET)
        with (postgres_server() as database,
              mlflow_server(database, f"s3://{BUCKET}/mlflow", env=s3_env) as tracking,
              ray_cluster(s3_env) as (address, dashboard, ray_logs)):
            # What a user's shell on the cluster holds: where things are, plus the secrets.
            env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
            env.update(s3_env, HF_TOKEN=SECRETS["HF_TOKEN"], LORAFLOW_API_KEY=SECRETS["LORAFLOW_API_KEY"],
                       MLFLOW_TRACKING_URI=tracking, RAY_ADDRESS=address, RAY_AUTH_MODE="token")
            yield {"env": env, "tracking": tracking, "database": database, "dashboard": dashboard, "ray_logs": ray_logs,
                   "s3": boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                      aws_access_key_id="x", aws_secret_access_key="x"),
                   "tmp": tmp_path_factory.mktemp("cluster"),
                   "outputs": []}  # every entry point's stdout + stderr, checked for secrets


def _mlflow_run(cluster, entry_point: str, *params: str, timeout: int = 900, env: dict | None = None,
                typed: str | None = None) -> subprocess.CompletedProcess:
    """`mlflow run . -e entry_point`, its output recorded for the secret search. typed: a credential the
    user typed into a -P value or MLFLOW_TRACKING_URI, which `mlflow run` itself shows back to them in its
    own lines (_MLFLOW_ECHO) before loraflow runs: those lines alone are left out of the search."""
    args = [_cli("mlflow"), "run", ".", "-e", entry_point, "--env-manager", "local", "-P", "verbose=true"]
    for param in params:
        args += ["-P", param]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env or cluster["env"])
    lines = (proc.stdout + proc.stderr).splitlines(keepends=True)
    cluster["outputs"].append("".join(line for line in lines
                                      if typed is None or typed not in line or not _MLFLOW_ECHO.match(line)))
    return proc


def _entry_point(cluster, name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python mlproject/run.py NAME`, started without `mlflow run`, its output recorded for the secret search."""
    proc = subprocess.run([*entry_point(name), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env or cluster["env"])
    cluster["outputs"].append(proc.stdout + proc.stderr)
    return proc


def _cli(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _keys(cluster, prefix: str) -> list[str]:
    pages = cluster["s3"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def _client(cluster) -> MlflowClient:
    return MlflowClient(tracking_uri=cluster["tracking"])


@pytest.fixture(scope="module")
def trained(cluster) -> subprocess.CompletedProcess:
    """Version 1, trained by two workers on two nodes, checkpointing to S3."""
    overrides = ("{ray_num_workers: 2, resources_per_worker: {CPU: 1}, placement_strategy: STRICT_SPREAD, "
                 f"ray_storage_path: 's3://{BUCKET}/ray', registered_model_name: {NAME}}}")
    proc = _mlflow_run(cluster, "train", f"config={TINY_CONFIG}", f"overrides={overrides}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def evaluated(cluster, trained) -> subprocess.CompletedProcess:
    return _mlflow_run(cluster, "evaluate", f"model=models:/{NAME}/1",
                       f"config={_eval_config(cluster, lora_store=f's3://{BUCKET}/adapters')}")


@pytest.fixture(scope="module")
def promoted(cluster, trained) -> subprocess.CompletedProcess:
    return _mlflow_run(cluster, "promote", f"name={NAME}", "version=1", "stage=Production", "force=true",
                       "reason=cluster test: the tiny model cannot pass the gate")


@pytest.fixture(scope="module")
def served(cluster, promoted) -> dict:
    """serve on the cluster, asked one question by an OpenAI client, then stopped with SIGTERM."""
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    serve_config = yaml.safe_load((ROOT / "configs" / "serve" / "default.yaml").read_text())
    serve_config.update(port=free_port(), lora_store=f"s3://{BUCKET}/adapters", poll_interval_s=1)
    serve_config["traces"]["sample_rate"] = 1.0  # every answer a trace, for the secret search to read
    path = cluster["tmp"] / "serve.yaml"
    path.write_text(yaml.safe_dump(serve_config))
    proc = subprocess.Popen(
        [*entry_point("serve"), "--name", NAME, "--config", str(path),
         "--verbose", "true"],
        cwd=ROOT, env=cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output = Lines(proc)
    try:
        started = json.loads(output.until(lambda line: line.startswith('{"serving"'), timeout=420))
        client = openai.OpenAI(base_url=started["serving"], api_key=SECRETS["LORAFLOW_API_KEY"], timeout=120)
        answer = client.chat.completions.create(
            model=started["model"], max_tokens=8,
            messages=[{"role": "user", "content": "Give me a meaning representation."}],
        )
        # While it serves: Serve's applications as Ray's dashboard shows them (each deployment's runtime_env).
        applications = json.dumps(ray_dashboard(cluster["dashboard"], "/api/serve/applications/"))
        traced = _wait_for_a_trace(cluster, timeout=90)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        try:
            cluster["outputs"].append(output.all(timeout=30))
        except AssertionError:  # serve has exited; a process it started on the cluster holds the pipe
            cluster["outputs"].append("".join(output.seen))
    return {"started": started, "answer": answer, "exit_code": code, "output": cluster["outputs"][-1],
            "applications": applications, "traced": traced}


def _wait_for_a_trace(cluster, timeout: float) -> bool:
    """Whether the server's tracer has logged a trace (in any experiment) within timeout seconds."""
    client, deadline = _client(cluster), time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(client.search_traces(locations=[e.experiment_id], max_results=1, include_spans=False)
               for e in client.search_experiments()):
            return True
        time.sleep(1)
    return False


@pytest.fixture(scope="module")
def refused(cluster) -> dict:
    """Each credential of PLANTED, given as a user would give it, against the cluster's tracking server:
    each attempt maps to (the process, its expected exit code, what its error names). None may start
    Ray work (the Ray jobs before and after). The `mlflow run -P overrides` attempt's parameter, which
    `mlflow run` logs on the server before train starts, is purged as its refusal says."""
    ray_jobs = [len(ray_dashboard(cluster["dashboard"], "/api/jobs/"))]
    store, model, attempts = f"s3://{BUCKET}/adapters", f"model=models:/{NAME}/1", {}

    config = _eval_config(cluster, store, "engine-env", engine_env={"HF_TOKEN": PLANTED["engine_env.HF_TOKEN"]})
    attempts["engine_env"] = (_mlflow_run(cluster, "evaluate", model, f"config={config}"),
                              1, "engine_env.HF_TOKEN holds a credential")
    url = f"https://{PLANTED['dataset_dir (https://TOKEN@host)']}@example.invalid/data"
    config = _eval_config(cluster, store, "dataset-url", dataset_dir=url)
    attempts["dataset_dir"] = (_mlflow_run(cluster, "evaluate", model, f"config={config}"),
                               1, "dataset_dir holds a credential (a user name in it")
    overrides = f"{{hub_token: {PLANTED['hub_token in train.py --overrides']}}}"
    attempts["train.py --overrides"] = (
        _entry_point(cluster, "train", "--config", str(TINY_CONFIG), "--overrides", overrides), 2, "hub_token in")

    secret = PLANTED["hub_token in mlflow run -P overrides"]
    proc = _mlflow_run(cluster, "train", f"config={TINY_CONFIG}", f"overrides={{hub_token: {secret}}}", typed=secret)
    attempts["mlflow run -P overrides"] = (proc, 1, "hub_token in")
    # `mlflow run` logged the overrides as its run's parameter before train started, and a tracking
    # server's database is out of loraflow's reach (tracking.erase_launch_param): the refusal says where it
    # is and how to purge it. That parameter is the one place the secret was recorded; do what the refusal
    # says, and the search then finds it nowhere, like every other.
    purge = re.search(r"mlflow runs delete --run-id (\w+)\), have the store purged \(mlflow gc on the server\)",
                      proc.stderr)
    assert purge, proc.stderr[-3000:]
    run_id = purge.group(1)
    assert secret in _client(cluster).get_run(run_id).data.params["overrides"]
    for command in (["runs", "delete", "--run-id", run_id],
                    ["gc", "--backend-store-uri", cluster["database"], "--run-ids", run_id]):
        # MLFLOW_TRACKING_URI set: gc deletes proxied artifacts through the server
        done = subprocess.run([_cli("mlflow"), *command], capture_output=True, text=True, timeout=300,
                              env=cluster["env"])
        assert done.returncode == 0, done.stderr[-3000:]
    with pytest.raises(MlflowException, match="not found"):
        _client(cluster).get_run(run_id)

    secret = PLANTED["MLFLOW_TRACKING_URI (http://TOKEN@host)"]
    env = {**cluster["env"], "MLFLOW_TRACKING_URI": cluster["tracking"].replace("://", f"://{secret}@", 1)}
    attempts["MLFLOW_TRACKING_URI http://TOKEN@host"] = (
        _mlflow_run(cluster, "train", f"config={TINY_CONFIG}", env=env, typed=secret),
        1, "MLFLOW_TRACKING_URI carries a credential (a user name in it")
    uri = f"{cluster['tracking']}/?token={PLANTED['MLFLOW_TRACKING_URI (?token=)']}"
    env = {**cluster["env"], "MLFLOW_TRACKING_URI": uri}
    attempts["MLFLOW_TRACKING_URI ?token="] = (
        _entry_point(cluster, "train", "--config", str(TINY_CONFIG), env=env),
        2, "MLFLOW_TRACKING_URI carries a credential (the query parameter token)")
    ray_jobs.append(len(ray_dashboard(cluster["dashboard"], "/api/jobs/")))
    return {"attempts": attempts, "ray_jobs": ray_jobs}


def test_train_spreads_over_two_nodes_and_stores_on_s3(cluster, trained):
    client = _client(cluster)
    [version] = client.search_model_versions(f"name='{NAME}'")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and "loss" in run.data.metrics
    # proxied artifacts: the adapter lies in the S3 bucket behind the tracking server
    assert any(k.endswith("adapter/adapter_model.safetensors") for k in _keys(cluster, "mlflow/"))
    # Ray Train's checkpoints went to ray_storage_path on S3
    assert any("checkpoint_" in k for k in _keys(cluster, "ray/"))

    # Ray's state API: the training workers ran on two different nodes
    actors = ray_dashboard(cluster["dashboard"], "/api/v0/actors?limit=1000&detail=1")["data"]["result"]["result"]
    workers = [a for a in actors if a["class_name"] == "RayTrainWorker"]
    assert len({w["node_id"] for w in workers}) == 2, workers


def test_evaluate_needs_a_lora_store_on_a_multi_node_cluster(cluster, trained):
    config = _eval_config(cluster, lora_store=None)
    proc = _mlflow_run(cluster, "evaluate", f"model=models:/{NAME}/1", f"config={config}")
    # The entry point exits 2; `mlflow run` reports any failed entry point as 1, with its output.
    assert proc.returncode == 1 and "Run (ID" in proc.stderr and "failed" in proc.stderr, proc.stderr[-3000:]
    assert "lora_store: s3://" in proc.stderr and "several nodes" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_needs_a_lora_store_on_a_multi_node_cluster(cluster, promoted):
    serve_config = yaml.safe_load((ROOT / "configs" / "serve" / "default.yaml").read_text())
    serve_config.update(port=free_port(), lora_store=None)
    path = cluster["tmp"] / "serve-local-store.yaml"
    path.write_text(yaml.safe_dump(serve_config))
    proc = subprocess.run([*entry_point("serve"), "--name", NAME, "--config", str(path)],
                          cwd=ROOT, env=cluster["env"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "several nodes" in proc.stderr and "set lora_store: s3://bucket/prefix" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_evaluate_on_the_cluster_through_the_s3_lora_store(cluster, evaluated):
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    version = _client(cluster).get_model_version(NAME, "1")
    assert float(version.tags["loraflow.eval.rows"]) == 4
    eval_run = _client(cluster).get_run(version.tags["loraflow.eval.run_id"])
    assert eval_run.info.status == "FINISHED"
    assert any(k.endswith("predictions.json") for k in _keys(cluster, "mlflow/"))
    assert f"adapters/{NAME}-v1/adapter_config.json" in _keys(cluster, "adapters/")


def test_promote_against_the_tracking_server(cluster, promoted):
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    assert _client(cluster).get_model_version_by_alias(NAME, "production").version == "1"


def test_serve_on_the_cluster_answers_an_openai_client(served):
    assert served["started"]["model"] == "smollm2-135m-instruct:production" and served["started"]["api_key_required"]
    assert served["answer"].model == f"smollm2-135m-instruct:{NAME}-v1"
    assert (served["answer"].choices[0].message.content or "").strip(), served["answer"]
    assert served["exit_code"] == 0, served["output"][-3000:]


def test_each_planted_credential_is_refused_by_name_before_any_ray_work(refused):
    for what, (proc, code, says) in refused["attempts"].items():
        # The entry point exits 2; `mlflow run` reports any failed entry point as 1, with its output.
        assert proc.returncode == code, (what, proc.stderr[-3000:])
        assert says in proc.stderr and "Traceback" not in proc.stderr, (what, proc.stderr[-3000:])
        assert code == 2 or "Run (ID" in proc.stderr and "failed" in proc.stderr, (what, proc.stderr[-3000:])
    before, after = refused["ray_jobs"]
    assert after == before  # none reached Ray


def test_no_secret_lands_in_mlflow_outputs_or_logs(cluster, evaluated, served, refused):
    client = _client(cluster)
    recorded: dict[str, str] = {}  # where -> what is kept there
    dataset_inputs, traces = [], []
    for experiment in client.search_experiments(view_type=ViewType.ALL):
        exp = experiment.experiment_id
        recorded[f"experiment {exp}"] = MessageToJson(experiment.to_proto())  # its tags too
        for found in _pages(client.search_runs, experiment_ids=[exp], run_view_type=ViewType.ALL):
            run = client.get_run(found.info.run_id)  # params, tags, metrics, dataset inputs (source, digest, tags)
            recorded[f"run {run.info.run_id}"] = MessageToJson(run.to_proto())
            dataset_inputs += run.inputs.dataset_inputs
        for trace in _pages(client.search_traces, locations=[exp], max_results=100):
            recorded[f"trace {trace.info.trace_id}"] = trace.to_json()  # request, response, spans, tags
            traces.append(trace)
        for model in _pages(client.search_logged_models, experiment_ids=[exp]):
            recorded[f"logged model {model.model_id}"] = MessageToJson(model.to_proto())
    for model in _pages(client.search_registered_models):
        recorded[f"registered model {model.name}"] = MessageToJson(model.to_proto())  # tags, description
        for version in _pages(client.search_model_versions, filter_string=f"name='{model.name}'"):
            recorded[f"model version {model.name}/{version.version}"] = MessageToJson(version.to_proto())
    # Everything in the bucket: MLflow's artifacts, Ray Train's checkpoints, the LoRA store.
    stored = {f"s3://{BUCKET}/{key}": cluster["s3"].get_object(Bucket=BUCKET, Key=key)["Body"].read()
              for key in _keys(cluster, "")}
    ray_logs = {str(path): path.read_bytes() for path in Path(cluster["ray_logs"]).rglob("*")
                if path.is_file() and not path.is_symlink() and path.stat().st_size < 50_000_000}
    # What Ray's dashboard shows anyone who can reach it (asked as a script, not a browser: unredacted).
    dashboard = {path: json.dumps(ray_dashboard(cluster["dashboard"], path))
                 for path in ("/api/v0/actors?limit=10000&detail=1", "/api/v0/tasks?limit=10000&detail=1",
                              "/api/v0/jobs?limit=10000&detail=1", "/api/v0/runtime_envs?limit=10000&detail=1",
                              "/api/jobs/")}
    dashboard["/api/serve/applications/ (while serving)"] = served["applications"]
    outputs = {f"output {i}: {text[:80]!r}": text for i, text in enumerate(cluster["outputs"])}

    # Each place is searched where something is: train, evaluate, promote, serve and six refusals at least;
    # train's dataset inputs; the served answer's trace; evaluate's engines' runtime_env and serve's ingress's.
    assert len(outputs) >= 10 and ray_logs and any(key.startswith("s3://loraflow-cluster/mlflow/") for key in stored)
    assert dataset_inputs and all(d.dataset.digest and d.dataset.source for d in dataset_inputs)
    assert served["traced"] and traces
    actors = dashboard["/api/v0/actors?limit=10000&detail=1"]
    assert "VLLM_CPU_KVCACHE_SPACE" in actors and "MLFLOW_ENABLE_ASYNC_TRACE_LOGGING" in actors
    assert "MLFLOW_ENABLE_ASYNC_TRACE_LOGGING" in served["applications"]

    texts = {**recorded, **outputs, **dashboard}
    blobs = {**stored, **ray_logs}
    for name, secret in {**SECRETS, **PLANTED}.items():
        found = [where for where, text in texts.items() if secret in text]
        found += [where for where, blob in blobs.items() if secret.encode() in blob]
        assert not found, f"{name} found in {found}"


def _pages(search, **kwargs) -> list:
    """Every result of an MLflow search, page after page."""
    found, token = [], None
    while True:
        page = search(**kwargs, page_token=token)
        found += page
        token = page.token
        if not token:
            return found


def _eval_config(cluster, lora_store: str | None, name: str = "", **changes) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "evaluate" / "default.yaml").read_text())
    # Engines on other nodes load the adapter per row from the S3 store: nothing merged here.
    config.update(max_rows=4, baseline=False, guided_decoding=False, lora_store=lora_store, merge_adapter=False,
                  **changes)
    config["sampling"]["max_tokens"] = 16
    path = cluster["tmp"] / f"eval-{name or bool(lora_store)}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
