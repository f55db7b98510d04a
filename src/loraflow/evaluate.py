"""The `evaluate` entry point: batch inference with Ray Data LLM + vLLM (base model in the
engine, the adapter chosen per row; or, with `merge_adapter`, the adapter merged into the base
model's weights first), each row asked with the prompt the version was trained with and scored by
its task (tasks.py), logged as an MLflow run nested under the train run that produced the adapter,
with the metrics also written onto the registered model version for promotion gates."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

from loraflow import (
    adapter_merge,
    adapter_store,
    base_models,
    console,
    datasets,
    job_configs,
    ray_cluster,
    registry,
    registry_lock,
    tasks,
    tracking,
)
from loraflow.envs import PROJECT_ROOT
from loraflow.errors import UserError
from loraflow.job_configs import EvaluateConfig


def job(model: str, config: str) -> None:
    """The evaluate entry point (entry_points.py)."""
    result = evaluate(model, config)
    print(json.dumps({k: round(v, 4) for k, v in result.metrics.items()}, indent=2))


LIGHT_STAGE = {"num_cpus": 0.25}  # Ray Data LLM's pre/post-processing and chat-template stages (see evaluate)


def load_config(path: str) -> EvaluateConfig:
    return job_configs.load(EvaluateConfig, path)


@dataclasses.dataclass
class Evaluation:
    run_id: str  # the evaluation's MLflow run
    metrics: dict[str, float]


def evaluate(model_ref: str, config_path: str) -> Evaluation:
    import mlflow

    config = load_config(config_path)
    tracking.configure()
    ref = registry.resolve(model_ref)
    rows = _test_rows(config)
    workdir = Path(tempfile.mkdtemp(prefix="loraflow-eval-"))
    try:
        adapter_dir = registry.download_adapter(ref.artifact_uri, str(workdir / "adapter"), ref.text)
        if ref.version is not None:  # a train run's own artifacts carry no registered digests
            registry.check_digests(ref.version, adapter_dir, f"the artifact store ({ref.artifact_uri})")
        _check_adapter(adapter_dir, ref, config)
        task, prompt = tasks.of_tags(ref.tags, ref.text)  # what each row is asked with, and scored by
        if config.guided_decoding and task.guided_regex() is None:
            raise UserError(f"{ref.text}'s task {task.name} has no pattern to constrain decoding with: set "
                            "guided_decoding: false in the evaluation config.")
        # Ray Data LLM runs pre/post-processing and the chat template as separate tasks and
        # actors of 1 CPU each besides the engine: on a 2-core machine they never all fit.
        # They are light, so each gets a quarter CPU, and the local instance declares 4 CPU slots.
        ray_cluster.connect(num_cpus=4)
        engine_adapter = _adapter_for_engines(ref, adapter_dir, config.lora_store)
        base_model = base_models.base_model_source(ref.base_model)
        started = time.monotonic()
        passes = _passes(base_model, adapter_dir, engine_adapter, workdir, config)
        merge_s = time.monotonic() - started
        tracking.use_model_experiment(train_run=ref.run_id)  # beside its train run, which it shows under
        with mlflow.start_run() as run:  # resumes the run `mlflow run` created, if any
            try:
                mlflow.set_tags({
                    "mlflow.runName": f"evaluate-{ref.label}",
                    "mlflow.parentRunId": ref.run_id,  # shows under the train run in the UI
                    registry.JOB_TAG: "evaluate",
                    registry.MODEL_REF_TAG: model_ref,
                    registry.BASE_MODEL_TAG: ref.base_model,
                    registry.TRAIN_RUN_TAG: ref.run_id,
                    registry.TASK_TAG: task.name,
                    registry.PROMPT_TAG: prompt.uri,
                })
                mlflow.MlflowClient().link_prompt_version_to_run(run.info.run_id, prompt.uri)
                mlflow.log_params(run_params(config))
                predictions, seconds = _generate(rows, passes, base_model, task, prompt, config)
                metrics = _score_and_log(predictions, seconds, task)
                if config.merge_adapter:
                    mlflow.log_metric("adapter_merge_s", merge_s)
            except KeyboardInterrupt:
                mlflow.end_run("KILLED")
                raise
        if ref.version is not None:
            record_evaluation(ref.version.name, str(ref.version.version), metrics, run.info.run_id)
        return Evaluation(run.info.run_id, metrics)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_params(config: EvaluateConfig) -> dict[str, str]:
    """The config as the run's parameters, engine_env by its variables' names only: their values are
    the engines' business, not the UI's (credentials are refused by EvaluateConfig either way)."""
    return tracking.flatten({**config.model_dump(), "engine_env": ",".join(sorted(config.engine_env))})


def _test_rows(config: EvaluateConfig) -> list[dict]:
    location = config.dataset_dir
    if not datasets.is_remote(location):
        location = str(PROJECT_ROOT / location)  # relative paths are the project's, as shipped
    [split] = datasets.load_datasets(location, [config.dataset])
    return split.rows[: config.max_rows]


def _check_adapter(adapter_dir: Path, ref: registry.AdapterRef, config: EvaluateConfig) -> None:
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    max_rank = config.engine["max_lora_rank"]
    if not config.merge_adapter and adapter_config.get("r", 0) > max_rank:
        raise UserError(
            f"{ref.text}: the adapter has LoRA rank {adapter_config['r']} but the engine's "
            f"max_lora_rank is {max_rank}; raise engine.max_lora_rank in the evaluation config."
        )
    # The files at the recorded path must be the ones it was trained on (also when missing: fails early).
    registry.check_base_model(ref.base_model_id, base_models.base_model_identity(ref.base_model), ref.text)


def _passes(base_model: str, adapter_dir: Path, engine_adapter: tuple[str, str | None], workdir: Path,
            config: EvaluateConfig) -> list[tuple[tuple[str, ...], str, tuple[str, str | None] | None]]:
    """The passes to run, each (its variants, the engine's model, the per-row adapter or None): the
    adapter, with the guided adapter's rows in the same engine when configured (sampling is per
    row), then the base model alone (baseline) when configured."""
    if config.merge_adapter:
        with console.progress_bar(None, "merging the adapter into the base model (LLaMA-Factory export)"):
            merged = str(adapter_merge.merge_into_base(base_model, adapter_dir, workdir / "merged"))
        adapter_pass = (merged, None)
    else:
        adapter_pass = (base_model, engine_adapter)
    passes = [(("adapter", "guided") if config.guided_decoding else ("adapter",), *adapter_pass)]
    if config.baseline:
        passes.append((("baseline",), base_model, None))
    return passes


def _generate(rows: list[dict], passes: list, base_model: str, task: tasks.Task, prompt: tasks.Prompt,
              config: EvaluateConfig):
    """Run `rows` through each pass, one Ray Data LLM processor (and engine) each: vLLM 0.32's
    CPU LoRA kernels applied the adapter to rows without one when both kinds shared a batch
    (measured: baseline outputs identical to the adapter's). Returns the predictions and each
    pass's seconds, by its first variant."""
    import ray

    # Quiet mode shows loraflow's own bar of finished rows instead of Ray Data's per-stage ones.
    ray.data.DataContext.get_current().enable_progress_bars = console.verbose()
    sampling = {variant: dict(config.sampling) for variant in ("adapter", "baseline")}
    if config.guided_decoding:  # vLLM's structured outputs constrain generation to the task's grammar
        sampling["guided"] = {**config.sampling, "structured_outputs": {"regex": task.guided_regex()}}
    predictions, seconds = [], {}
    for variants, model_source, lora in passes:
        processor = _processor(model_source, lora, base_model, prompt, sampling, config)
        engine_model = lora[0] if lora else model_source
        items = [{**row, "index": i, "variant": variant, "engine_model": engine_model}
                 for variant in variants for i, row in enumerate(rows)]
        # One block per batch, so that rows stream out (and the bar moves) every batch_size rows.
        blocks = max(1, len(items) // config.batch_size)
        start = time.monotonic()
        with console.progress_bar(len(items), f"evaluating ({', '.join(variants)})", unit="row") as bar:
            for row in processor(ray.data.from_items(items, override_num_blocks=blocks)).iter_rows():
                predictions.append(row)
                bar.update()
        seconds[variants[0]] = time.monotonic() - start
    return sorted(predictions, key=lambda r: (r["variant"], r["index"])), seconds


def _processor(model_source: str, lora: tuple[str, str | None] | None, base_model: str, prompt: tasks.Prompt,
               sampling: dict[str, dict], config: EvaluateConfig):
    """A Ray Data LLM processor whose engine holds `model_source`, with LoRA enabled when the
    rows name an adapter (`lora`: its path or id, and the store it is loaded from); each row is
    sampled with its variant's parameters."""
    from ray.data.llm import build_processor

    return build_processor(
        processor_config(model_source, lora, base_model, config),
        preprocess=lambda row: {
            "model": row["engine_model"],
            "messages": prompt.messages(row["input"]),
            "sampling_params": sampling[row["variant"]],
        },
        postprocess=lambda row: {
            "variant": row["variant"], "index": row["index"], "input": row["input"],
            "expected": row["output"], "generated": row["generated_text"],
            "num_input_tokens": row["num_input_tokens"],
            "num_generated_tokens": row["num_generated_tokens"],
        },
        preprocess_map_kwargs=LIGHT_STAGE,
        postprocess_map_kwargs=LIGHT_STAGE,
    )


def processor_config(model_source: str, lora: tuple[str, str | None] | None, base_model: str,
                     config: EvaluateConfig):
    """Ray Data LLM's own config of one pass (its checks apply): `config` is an evaluation config."""
    from ray.data.llm import vLLMEngineProcessorConfig

    engine_kwargs = dict(config.engine)
    if lora:
        engine_kwargs.update(enable_lora=True, max_loras=1)
    else:
        engine_kwargs.pop("max_lora_rank")
    # A merged model folder is used for its weights only: prompts are templated and tokenized
    # by the base model's own tokenizer in every pass (the prompt training used).
    engine_kwargs["tokenizer"] = base_model
    bundle = config.resources_per_engine
    # runtime_env and engine_kwargs are shown on Ray's dashboard: EvaluateConfig refuses credentials in them.
    return vLLMEngineProcessorConfig(
        model_source=model_source,
        engine_kwargs=engine_kwargs,
        runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1", **config.engine_env,
                                  **adapter_store.s3_settings()}},
        dynamic_lora_loading_path=lora[1] if lora else None,
        batch_size=config.batch_size,
        concurrency=config.concurrency,
        accelerator_type=config.accelerator_type,
        # The default asks for a GPU per engine, which never comes on a CPU-only cluster.
        placement_group_config={"bundles": [bundle], "strategy": "PACK"} if bundle else None,
        chat_template_stage={**LIGHT_STAGE, "model_source": base_model},
        # vLLM tokenizes prompts and detokenizes outputs itself; separate stages would only add
        # two more actor processes competing with the engine for the CPUs.
        tokenize_stage=False,
        detokenize_stage=False,
    )


def _adapter_for_engines(ref, adapter_dir: Path, lora_store: str | None) -> tuple[str, str | None]:
    """What the engines load the adapter from: the local folder on one machine; on a cluster the
    engines may run on other nodes, so it goes through the S3 LoRA store (`lora_store`)."""
    if lora_store:
        return adapter_store.LoraStore(lora_store).upload(ref.label, adapter_dir), lora_store.rstrip("/")
    if ray_cluster.alive_nodes() > 1:
        raise UserError("This Ray cluster has several nodes, and the vLLM engines may run on one that cannot "
                        f"see {adapter_dir}: set lora_store: s3://bucket/prefix (the same store serve uses) "
                        "and merge_adapter: false in the evaluation config.")
    return str(adapter_dir), None


def _score_and_log(predictions: list[dict], seconds: dict[str, float], task: tasks.Task) -> dict[str, float]:
    import mlflow
    import pandas as pd

    frame = pd.DataFrame(predictions)
    frame["correct"] = frame["expected"] == frame["generated"]
    frame["parse_ok"] = [task.is_valid(given, answer) for given, answer in zip(frame["input"], frame["generated"])]
    metrics: dict[str, float] = {}
    for variant, group in frame.groupby("variant"):
        prefix = "" if variant == "adapter" else f"{variant}_"
        columns = group["input"].tolist(), group["expected"].tolist(), group["generated"].tolist()
        metrics.update({prefix + k: v for k, v in task.score(*columns).items()})
        if variant == "adapter":
            for label, by in tasks.score_slices(task, *columns).items():
                metrics[f"{task.slice_name}_{label}_{task.headline}"] = by[task.headline]
                metrics[f"{task.slice_name}_{label}_rows"] = by["rows"]
    metrics[f"{task.headline}_lift"] = metrics[task.headline] - metrics.get(f"baseline_{task.headline}", 0.0)
    adapter_rows = frame[frame["variant"] == "adapter"]
    _log_slice_views(adapter_rows, metrics, task)
    # Throughput of the adapter's engine, start included, over every row it answered (the guided ones too).
    answered = frame[frame["variant"].isin(["adapter", "guided"])]
    metrics["rows_per_s"] = len(answered) / seconds["adapter"]
    metrics["generated_tokens_per_s"] = float(answered["num_generated_tokens"].sum()) / seconds["adapter"]
    mlflow.log_metrics(metrics)
    mlflow.log_table(frame, artifact_file="predictions.json")
    with tempfile.TemporaryDirectory() as tmp:
        frame.to_csv(Path(tmp) / "predictions.csv", index=False)
        mlflow.log_artifact(str(Path(tmp) / "predictions.csv"))
    return metrics


def _log_slice_views(rows, metrics: dict[str, float], task: tasks.Task) -> None:
    """Two artifacts the run's page shows: the headline metric per slice (ViGGO: exact match per
    intent) as a chart, and which slice was predicted for which (a confusion table; `unparseable`
    when the answer has none)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt
    import mlflow
    import pandas as pd

    def slices(column: str) -> list[str]:
        return [task.slice_of(given, text) or "unparseable" for given, text in zip(rows["input"], rows[column])]

    labels = {"expected": slices("expected"), "predicted": slices("generated")}
    confusion = pd.DataFrame(labels).value_counts().rename("rows").reset_index().sort_values(["expected", "predicted"])
    mlflow.log_table(confusion, artifact_file=f"{task.slice_name}_confusion.json")
    prefix, suffix = f"{task.slice_name}_", f"_{task.headline}"
    by_slice = {key[len(prefix):-len(suffix)]: value for key, value in metrics.items()
                if key.startswith(prefix) and key.endswith(suffix)}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(list(by_slice), list(by_slice.values()), color="#4c72b0")
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"{task.headline.replace('_', ' ')} ({metrics['rows']:.0f} rows, overall "
                  f"{metrics[task.headline]:.3f})")
    ax.invert_yaxis()
    fig.tight_layout()
    mlflow.log_figure(fig, f"{task.headline}_by_{task.slice_name}.png")
    plt.close(fig)


def record_evaluation(name: str, number: str, metrics: dict[str, float], eval_run_id: str) -> None:
    """The figures promotion gates check, onto the version, under the registry lock. The evaluation's
    run tag is removed first and written last: the figures count only with it (registry.eval_metrics),
    so writes cut short leave a version with no evaluation, to evaluate again, not a mix of two."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    with registry_lock.locked(client, name):
        with contextlib.suppress(MlflowException):  # not evaluated before
            client.delete_model_version_tag(name, number, registry.EVAL_RUN_TAG)
        stale = [key for key in client.get_model_version(name, number).tags
                 if key.startswith(registry.EVAL_TAG_PREFIX) and key[len(registry.EVAL_TAG_PREFIX):] not in metrics]
        for key in stale:
            client.delete_model_version_tag(name, number, key)
        for key in tasks.recordable_metrics():  # what promotion gates may check
            if key in metrics:
                client.set_model_version_tag(name, number, registry.EVAL_TAG_PREFIX + key, f"{metrics[key]:.6f}")
        client.set_model_version_tag(name, number, registry.EVAL_RUN_TAG, eval_run_id)
