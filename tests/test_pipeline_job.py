"""`mlflow run . -e pipeline`: the tiny model trained, evaluated (real vLLM through Ray Data LLM)
and promoted in one command, which then says where to look; then the MLflow UI checked in a real
browser (headless Chromium): the runs, their comparison and the registered version's stage. The
refused gate's branch runs the pipeline's promotion step alone, on a registered, evaluated version."""

import json
import os
import subprocess
import sys

from browser import chromium, page_text
from conftest import ROOT, TINY_CONFIG, config_with
from mlflow import MlflowClient
from servers import mlflow_server

from loraflow import pipeline


def test_pipeline_trains_evaluates_promotes_and_links(tracking_uri, tmp_path):
    eval_config = config_with("evaluate", tmp_path, max_rows=4, baseline=False, guided_decoding=False,
                              sampling={"temperature": 0.0, "max_tokens": 16})
    # The tiny model has random weights: a gate it can pass, to exercise the promotion step.
    (tmp_path / "gates.yaml").write_text("stages: {Production: {minimum: {rows: 4}}}")

    mlflow_cli = os.path.join(os.path.dirname(sys.executable), "mlflow")
    proc = subprocess.run(
        [mlflow_cli, "run", ".", "-e", "pipeline", "--env-manager", "local",
         "-P", f"train_config={TINY_CONFIG}", "-P", f"overrides={{output_dir: {tmp_path / 'out'}}}",
         "-P", f"eval_config={eval_config}", "-P", f"promote_config={tmp_path / 'gates.yaml'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.rindex("\n{"):])
    assert summary["version"] == "1" and summary["evaluated"] and summary["promoted_to"] == "Production"
    assert summary["gate"] == "passed" and summary["evaluate_exit_code"] == 0
    assert summary["start_ui"] == f"mlflow ui --backend-store-uri {tracking_uri}"
    assert summary["model_version"].endswith("/#/models/viggo-tiny-lora/versions/1")

    client = MlflowClient()
    version = client.get_model_version("viggo-tiny-lora", "1")
    assert version.current_stage == "Production" and version.tags["loraflow.promotion.gate"] == "passed"
    assert version.tags["loraflow.eval.run_id"] == summary["eval_run_id"]
    eval_run = client.get_run(summary["eval_run_id"])
    assert eval_run.data.tags["mlflow.parentRunId"] == summary["train_run_id"]
    # what the evaluate step handed back is what its run holds
    assert "exact_match" in summary["metrics"] and summary["metrics"].items() <= eval_run.data.metrics.items()

    with mlflow_server(tracking_uri, str(tmp_path / "artifacts")) as url, chromium() as browser:
        train_run = client.get_run(summary["train_run_id"])
        experiment = train_run.info.experiment_id
        train_name, eval_name = train_run.info.run_name, eval_run.info.run_name
        page_text(browser, f"{url}/#/experiments/{experiment}?workflowType=machine_learning",
                  [train_name, "Run Name"], "mlflow-runs.png")
        runs = json.dumps([summary["train_run_id"], summary["eval_run_id"]])
        page_text(browser, f"{url}/#/compare-runs?runs={runs}&experiments={json.dumps([experiment])}",
                  [train_name, eval_name, "Run details", "exact_match"], "mlflow-compare.png")
        page_text(browser, summary["model_version"].replace("http://127.0.0.1:5000", url),
                  ["Production", "@ production", train_name, "gate passed"], "mlflow-model-version.png")
        page_text(browser, f"{url}/#/models/viggo-tiny-lora", ["Version 1", "@ production"], "mlflow-model.png")


def test_a_refused_gate_is_a_result_the_version_stays_registered(tracking_uri, tmp_path, capsys):
    """The pipeline's last step, after its evaluation: the gate asks for more rows than were
    evaluated, so the summary says refused and why, and the version stays registered, evaluated,
    in no stage (the pipeline then exits 0: its exit code is the evaluation's)."""
    from test_promote import add_version

    version = add_version("viggo-tiny-lora", {"parse_validity": 0.99, "slot_f1": 0.91, "exact_match": 0.64,
                                              "rows": 4}, tmp_path)
    (tmp_path / "gates.yaml").write_text("stages: {Production: {minimum: {rows: 5}}}")
    assert pipeline.promote_step("viggo-tiny-lora", version, "Production", str(tmp_path / "gates.yaml")) == {
        "gate": "refused", "promoted_to": None}
    assert "[pipeline] not promoted: viggo-tiny-lora v1 does not pass the Production gate (rows)" in \
        capsys.readouterr().out
    stored = MlflowClient().get_model_version("viggo-tiny-lora", version)
    assert stored.current_stage == "None" and stored.aliases == []
    assert stored.tags["loraflow.eval.rows"] == "4.000000" and "loraflow.promotion.gate" not in stored.tags
