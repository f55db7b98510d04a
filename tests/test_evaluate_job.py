"""The evaluate entry point: real vLLM (CPU build) through real Ray Data LLM, on an adapter that
the train entry point trained and registered, scored by evaluation/viggo.py."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, config_with, copy_store, entry_point
from mlflow import MlflowClient

SMALL_EVAL = {"max_rows": 6, "sampling": {"temperature": 0.0, "max_tokens": 24}}


@pytest.fixture(scope="module")
def trained(tiny_trainings, tmp_path_factory) -> str:
    """This module's copy of the session's tiny trainings (viggo-tiny-lora v1, v2): its tracking URI."""
    return copy_store(tiny_trainings, tmp_path_factory.mktemp("store"))


@pytest.fixture
def store(trained, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained)
    mlflow.set_tracking_uri(trained)
    return MlflowClient()


def _config(tmp_path, **changes):
    return str(config_with("evaluate", tmp_path, **{**SMALL_EVAL, **changes}))


def run_evaluate(model, config, timeout=900):
    return subprocess.run([*entry_point("evaluate"), "--model", model,
                           "--config", config], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy())


FLOAT32_ENGINE = {**yaml.safe_load((ROOT / "configs/engines/smollm2-cpu.yaml").read_text()), "dtype": "float32"}


@pytest.fixture(scope="module")
def per_row(trained, tmp_path_factory) -> dict:
    """One evaluation with the adapter applied per row by vLLM (the guided rows on the same engine),
    plus the baseline pass, in float32 (where merged and per-row weights round alike): what the
    tests below check."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": trained}
    config = _config(tmp_path_factory.mktemp("per-row"), baseline=True, guided_decoding=True, merge_adapter=False,
                     engine=FLOAT32_ENGINE)
    proc = subprocess.run([*entry_point("evaluate"), "--model", "models:/viggo-tiny-lora/1",
                           "--config", config], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    version = MlflowClient(tracking_uri=trained).get_model_version("viggo-tiny-lora", "1")
    return {"run_id": version.tags["loraflow.eval.run_id"], "version": version}


def test_evaluate_logs_predictions_and_metrics(store, per_row, tmp_path):
    version = per_row["version"]
    eval_run = store.get_run(per_row["run_id"])
    assert eval_run.info.status == "FINISHED" and eval_run.info.run_name == "evaluate-viggo-tiny-lora-v1"
    assert eval_run.data.tags["mlflow.parentRunId"] == version.run_id  # nested under the train run
    assert eval_run.data.tags["loraflow.job"] == "evaluate"
    metrics = eval_run.data.metrics
    for name in ("exact_match", "intent_accuracy", "slot_precision", "slot_recall", "slot_f1",
                 "parse_validity", "baseline_exact_match", "exact_match_lift", "rows_per_s",
                 "generated_tokens_per_s"):
        assert name in metrics, name
    assert metrics["rows"] == 6 and metrics["baseline_rows"] == 6 and metrics["guided_rows"] == 6
    assert float(version.tags["loraflow.eval.exact_match"]) == pytest.approx(metrics["exact_match"])

    local = store.download_artifacts(eval_run.info.run_id, "predictions.json", str(tmp_path))
    table = json.loads(Path(local).read_text())
    columns = table["columns"]
    assert {"input", "expected", "generated", "correct", "parse_ok", "num_generated_tokens",
            "variant"} <= set(columns)
    assert len(table["data"]) == 18  # 6 rows each: adapter, baseline, guided adapter
    guided = [dict(zip(columns, row)) for row in table["data"] if row[columns.index("variant")] == "guided"]
    assert metrics["guided_parse_validity"] == pytest.approx(sum(r["parse_ok"] for r in guided) / 6)
    # The grammar can only end on a complete meaning representation: every guided answer that
    # stopped before max_tokens parses.
    stopped = [r for r in guided if r["num_generated_tokens"] < SMALL_EVAL["sampling"]["max_tokens"]]
    assert all(r["parse_ok"] for r in stopped), stopped
    artifacts = {a.path for a in store.list_artifacts(eval_run.info.run_id)}
    assert {"predictions.csv", "exact_match_by_intent.png", "intent_confusion.json"} <= artifacts
    local = store.download_artifacts(eval_run.info.run_id, "intent_confusion.json", str(tmp_path))
    confusion = json.loads(Path(local).read_text())
    assert confusion["columns"] == ["expected", "predicted", "rows"]
    assert sum(row[2] for row in confusion["data"]) == 6  # every adapter row, once


def _answers(store, tmp_path, run_id: str, variant: str) -> list[str]:
    table = json.loads(Path(store.download_artifacts(run_id, "predictions.json", str(tmp_path))).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    return [row["generated"] for row in sorted(rows, key=lambda r: r["index"]) if row["variant"] == variant]


def test_the_merged_adapter_answers_as_the_adapter_applied_per_row(store, per_row, tmp_path):
    """merge_adapter (the CPU default) must not change what is scored: the same greedy answers
    as vLLM's per-row LoRA. In float32, where the two orders of summing round alike."""
    proc = run_evaluate("models:/viggo-tiny-lora/1", _config(tmp_path, merge_adapter=True, engine=FLOAT32_ENGINE))
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = store.get_run(store.get_model_version("viggo-tiny-lora", "1").tags["loraflow.eval.run_id"])
    applied = store.get_run(per_row["run_id"])
    assert (merged.data.params["merge_adapter"], applied.data.params["merge_adapter"]) == ("True", "False")
    assert "adapter_merge_s" in merged.data.metrics and "adapter_merge_s" not in applied.data.metrics
    answers = _answers(store, tmp_path, merged.info.run_id, "adapter")
    assert len(answers) == SMALL_EVAL["max_rows"]
    assert answers == _answers(store, tmp_path, applied.info.run_id, "adapter")


def test_the_merged_model_holds_the_adapters_update(store, tmp_path):
    """LLaMA-Factory's export, as evaluate calls it, writes base + (alpha / r) * B @ A into every
    adapted weight. (The tiny model's greedy answers are the same with and without its adapter,
    so the comparison of answers above cannot show this.)"""
    import torch
    from safetensors.torch import load_file

    from loraflow import adapter_merge, base_models

    version = store.get_model_version("viggo-tiny-lora", "1")
    adapter = Path(store.download_artifacts(version.run_id, "adapter", str(tmp_path)))
    base = base_models.base_model_source(version.tags["loraflow.base_model"])
    merged = adapter_merge.merge_into_base(base, adapter, tmp_path / "merged")
    lora = load_file(adapter / "adapter_model.safetensors")
    settings = json.loads((adapter / "adapter_config.json").read_text())
    base_weights, merged_weights = load_file(Path(base) / "model.safetensors"), load_file(merged / "model.safetensors")
    adapted = sorted(key[len("base_model.model."):-len(".lora_A.weight")] for key in lora
                     if key.endswith(".lora_A.weight"))
    assert len(adapted) == 7 * 2  # every linear layer of both blocks (lora_target: all)
    for name in adapted:
        update = settings["lora_alpha"] / settings["r"] * (
            lora[f"base_model.model.{name}.lora_B.weight"] @ lora[f"base_model.model.{name}.lora_A.weight"])
        assert update.abs().max() > 0, name  # trained: B is no longer zero
        torch.testing.assert_close(merged_weights[f"{name}.weight"], base_weights[f"{name}.weight"] + update)


@pytest.mark.parametrize(
    "model, changes, message",
    [
        ("models:/no-such-model/1", {}, "There is no registered model 'no-such-model' in sqlite:///"),
        ("models:/viggo-tiny-lora/7", {}, "viggo-tiny-lora has no version 7; it has versions 1, 2."),
        ("models:/viggo-tiny-lora/Production", {}, "viggo-tiny-lora has no version in stage Production yet: promote "
                                                   "one first, e.g. `mlflow run . -e promote -P name=viggo-tiny-lora "
                                                   "-P version=N -P stage=Production`."),
        ("0123456789abcdef0123456789abcdef", {}, "Model reference '0123456789abcdef0123456789abcdef': there is no "
                                                 "run with that id in sqlite:///"),
        ("models:/viggo-tiny-lora/1", {"merge_adapter": False,
                                       "engine": {"max_lora_rank": 4, "dtype": "float32",
                                                  "max_model_len": 1024, "enforce_eager": True}},
         "the adapter has LoRA rank 8 but the engine's max_lora_rank is 4"),
        ("models:/viggo-tiny-lora/1", {"dataset": "viggo-nothing"}, "Unknown dataset 'viggo-nothing'"),
    ],
    ids=["unknown_model", "unknown_version", "empty_stage", "unknown_run", "rank_too_large",
         "unknown_test_set"],
)
def test_bad_input_is_refused(store, tmp_path, model, changes, message):
    before = len(store.search_runs([e.experiment_id for e in store.search_experiments()]))
    proc = run_evaluate(model, _config(tmp_path, **changes), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr
    runs = store.search_runs([e.experiment_id for e in store.search_experiments()])
    assert len(runs) == before  # nothing logged as an evaluation


def test_empty_or_malformed_test_set(store, tmp_path, viggo_copy):
    (viggo_copy / "test.jsonl").write_text("")
    proc = run_evaluate("models:/viggo-tiny-lora/1", _config(tmp_path, dataset_dir=str(viggo_copy)), timeout=300)
    assert proc.returncode == 2 and "test.jsonl holds no rows" in proc.stderr
    (viggo_copy / "test.jsonl").write_text('{"instruction": "x", "input": "y", "output": "z"}\n{oops\n')
    proc = run_evaluate("models:/viggo-tiny-lora/1", _config(tmp_path, dataset_dir=str(viggo_copy)), timeout=300)
    assert proc.returncode == 2 and "test.jsonl:2: malformed JSON Lines row" in proc.stderr


def test_adapter_for_another_base_model(store, tmp_path):
    store.set_model_version_tag("viggo-tiny-lora", "1", "loraflow.base_model",
                                str(ROOT / ".cache/models/SmolLM2-135M-Instruct"))
    try:
        proc = run_evaluate("models:/viggo-tiny-lora/1", _config(tmp_path), timeout=300)
    finally:
        run = store.get_run(store.get_model_version("viggo-tiny-lora", "1").run_id)
        store.set_model_version_tag("viggo-tiny-lora", "1", "loraflow.base_model", run.data.tags["loraflow.base_model"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert ("models:/viggo-tiny-lora/1 was trained on tiny-smollm2@sha256:" in proc.stderr
            and ", but the base model here is SmolLM2-135M-Instruct@sha256:" in proc.stderr
            and "; give it the base model it was trained on (those files)." in proc.stderr), proc.stderr[-3000:]
