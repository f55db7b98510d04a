"""Every entry point, unchanged, on the distributed setup: an `mlflow server` with a PostgreSQL
backend store and proxied artifacts on S3 (moto's S3 server), and a two-node Ray cluster
(`ray start --head` plus a second node) reached through RAY_ADDRESS. Training spreads its two
workers over both nodes and checkpoints to S3; evaluation and serving load the adapter from the
S3 LoRA store. Afterwards no secret (AWS keys, HF token, API key) may appear in MLflow's params,
tags, descriptions or artifacts, in any entry point's output, or in the Ray nodes' logs.
All servers listen on this machine, started and stopped by the test. Each step runs once, in a
module fixture that needs the steps before it, and each test checks one step's result: any test
runs alone or in any order."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import boto3
import openai
import pytest
import yaml
from conftest import ROOT, TINY_CONFIG
from mlflow import MlflowClient
from servers import Lines, free_port, mlflow_server, postgres_server, ray_cluster, ray_dashboard, s3_server

BUCKET = "loraflow-cluster"
NAME = "viggo-cluster-lora"
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIALORAFLOWTEST0001",
    "AWS_SECRET_ACCESS_KEY": "loraflow-aws-secret-do-not-log",
    "HF_TOKEN": "hf_loraflow_token_do_not_log",
    "LORAFLOW_API_KEY": "sk-loraflow-api-key-do-not-log",
}


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
            yield {"env": env, "tracking": tracking, "dashboard": dashboard, "ray_logs": ray_logs,
                   "s3": boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                      aws_access_key_id="x", aws_secret_access_key="x"),
                   "tmp": tmp_path_factory.mktemp("cluster"),
                   "outputs": []}  # every entry point's stdout + stderr, checked for secrets


def _mlflow_run(cluster, entry_point: str, *params: str, timeout: int = 900) -> subprocess.CompletedProcess:
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    args = [str(mlflow_cli), "run", ".", "-e", entry_point, "--env-manager", "local", "-P", "verbose=true"]
    for param in params:
        args += ["-P", param]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=cluster["env"])
    cluster["outputs"].append(proc.stdout + proc.stderr)
    return proc


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
    path = cluster["tmp"] / "serve.yaml"
    path.write_text(yaml.safe_dump(serve_config))
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "mlproject" / "serve.py"), "--name", NAME, "--config", str(path),
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
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        try:
            cluster["outputs"].append(output.all(timeout=30))
        except AssertionError:  # serve has exited; a process it started on the cluster holds the pipe
            cluster["outputs"].append("".join(output.seen))
    return {"started": started, "answer": answer, "exit_code": code, "output": cluster["outputs"][-1]}


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
    assert served["answer"].choices[0].message.content is not None
    assert served["exit_code"] == 0, served["output"][-3000:]


def test_no_secret_lands_in_mlflow_outputs_or_logs(cluster, evaluated, served):
    client = _client(cluster)
    recorded: list[str] = []
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            recorded += [json.dumps(run.data.params), json.dumps(run.data.tags)]
    for model in client.search_registered_models():
        recorded += [json.dumps(model.tags), model.description or ""]
    for version in client.search_model_versions(f"name='{NAME}'"):
        recorded += [json.dumps(version.tags), version.description or ""]
    artifacts = [cluster["s3"].get_object(Bucket=BUCKET, Key=key)["Body"].read()
                 for key in _keys(cluster, "mlflow/")]
    ray_logs = [path.read_bytes() for path in Path(cluster["ray_logs"]).rglob("*")
                if path.is_file() and not path.is_symlink() and path.stat().st_size < 50_000_000]
    outputs = cluster["outputs"]
    assert len(outputs) >= 4 and ray_logs and artifacts  # train, evaluate, promote, serve at least
    for name, secret in SECRETS.items():
        assert not any(secret in text for text in recorded + outputs), f"{name} found in MLflow or output"
        assert not any(secret.encode() in blob for blob in artifacts + ray_logs), f"{name} in artifacts/logs"


def _eval_config(cluster, lora_store: str | None) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "evaluate" / "default.yaml").read_text())
    # Engines on other nodes load the adapter per row from the S3 store: nothing merged here.
    config.update(max_rows=4, baseline=False, guided_decoding=False, lora_store=lora_store, merge_adapter=False)
    config["sampling"]["max_tokens"] = 16
    path = cluster["tmp"] / f"eval-{bool(lora_store)}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
