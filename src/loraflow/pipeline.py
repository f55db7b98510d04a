"""The `pipeline` entry point: train -> evaluate -> promote (only when the gate passes), then say
where to look. Each step is the same code as its own entry point and hands back its result:
training the version, evaluation (in the infer environment, as a child process) its run id and
metrics, promotion whether the gate passed. Every config is checked before training starts. A refused
gate is a result (exit 0, `promoted_to: null`); a step that fails ends the pipeline with that
step's exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from loraflow import evaluate, promotion_gates, registry, registry_changes, tracking, train, train_config
from loraflow.envs import PROJECT_ROOT


def job(train_config: str, overrides: str, eval_config: str, promote_config: str, promote_stage: str) -> int:
    """The pipeline entry point (entry_points.py); its exit code is the evaluation's."""
    summary = run(train_config, overrides, eval_config, promote_config, promote_stage)
    print(json.dumps(summary, indent=2))
    return summary["evaluate_exit_code"]


def run(train_config_path: str, overrides: str, eval_config: str, promote_config: str, stage: str) -> dict:
    # Bad input of a later step is refused before minutes of training (UserError, exit 2).
    evaluate.load_config(eval_config)
    promotion_gates.load(promote_config)
    stage = registry.stage_named(stage)
    uri = tracking.configure()
    version = train.train(train_config_path, train_config.parse_overrides(overrides))
    print(f"[pipeline] trained and registered {version.name} v{version.version}", flush=True)

    code = _evaluate(f"models:/{version.name}/{version.version}", eval_config)
    summary = {"registered_model": version.name, "version": str(version.version), "train_run_id": version.run_id,
               "evaluated": code == 0, "evaluate_exit_code": code, "promoted_to": None, "gate": None}
    if code == 0:
        summary.update(_evaluation_of(version.name, str(version.version)))
        summary.update(promote_step(version.name, str(version.version), stage, promote_config))
    summary.update(_where_to_look(uri, version, summary.get("eval_run_id")))
    return summary


def _evaluate(model: str, eval_config: str) -> int:
    """The evaluate entry point in the infer environment; its exit code."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}  # a run of its own, nested
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "mlproject" / "run.py"), "evaluate", "--model", model,
                           "--config", eval_config], check=False, env=env, cwd=PROJECT_ROOT).returncode


def _evaluation_of(name: str, number: str) -> dict:
    """The evaluation the version now carries (evaluate records it there): its run id and metrics."""
    from mlflow import MlflowClient

    client = MlflowClient()
    run_id = client.get_model_version(name, number).tags[registry.EVAL_RUN_TAG]
    return {"eval_run_id": run_id, "metrics": client.get_run(run_id).data.metrics}


def promote_step(name: str, number: str, stage: str, promote_config: str) -> dict:
    """Promote the evaluated version behind its gate; a refused gate is a result, not an error."""
    promotion = registry_changes.promote(name, number, stage, "pipeline: gate passed", False, promote_config)
    print(f"[pipeline] not promoted: {promotion.message}" if promotion.refused else promotion.message, flush=True)
    return {"gate": promotion.gate, "promoted_to": None if promotion.refused else stage}


def _where_to_look(uri: str, version, eval_run_id: str | None) -> dict:
    """Links into the MLflow UI: the tracking server's own, or the one `mlflow ui` serves locally."""
    from mlflow import MlflowClient

    experiment = MlflowClient().get_run(version.run_id).info.experiment_id
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    links = {
        "ui": base,
        # The runs table; MLflow 3's UI opens experiments on its GenAI view otherwise.
        "experiment": f"{base}/#/experiments/{experiment}?workflowType=machine_learning",
        "train_run": f"{base}/#/experiments/{experiment}/runs/{version.run_id}",
        "model_version": f"{base}/#/models/{version.name}/versions/{version.version}",
    }
    if eval_run_id:
        links["eval_run"] = f"{base}/#/experiments/{experiment}/runs/{eval_run_id}"
    if not uri.startswith("http"):
        links["start_ui"] = f"mlflow ui --backend-store-uri {uri}"
    return links
