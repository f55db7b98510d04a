"""The `train` entry point: validate the config and data, train on Ray, track everything in one
MLflow run and register the adapter as a new model version.

Nothing is registered unless training and logging finished: a failure ends the run FAILED, an
interrupt (Ctrl-C, SIGTERM) ends it KILLED.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import yaml

from loraflow import (
    base_models,
    datasets,
    processes,
    ray_cluster,
    ray_training,
    registry,
    tasks,
    tracking,
    train_config,
)
from loraflow.envs import PROJECT_ROOT
from loraflow.errors import UserError
from loraflow.registry import (
    ADAPTER_ARTIFACT_PATH,
    BASE_MODEL_ID_TAG,
    BASE_MODEL_TAG,
    DRIVER_TAG,
    JOB_TAG,
    RAY_RUN_TAG,
    REGISTERED_MODEL_TAG,
    RESUMED_BY_TAG,
    RESUMED_FROM_TAG,
    register_adapter,
)

OUTPUTS_DIR = PROJECT_ROOT / "outputs"
_CONFIG_ARTIFACT = "config/train_config.yaml"  # the resolved config, as the run used it
RUN_MARKER = "loraflow_run_id"  # written into output_dir: which run owns the files there
_TRAINING_FILES = (  # LLaMA-Factory's logs and results; everything else it writes is the adapter
    "trainer_log.jsonl", "all_results.json", "train_results.json", "eval_results.json",
    "trainer_state.json", "training_args.bin", RUN_MARKER, ray_training.FINAL_MARKER,
)


def job(config: str, overrides: str, resume: str) -> None:
    """The train entry point (entry_points.py)."""
    version = train(config, train_config.parse_overrides(overrides), resume=resume or None)
    print(f"registered {version.name} version {version.version} (run {version.run_id})")


def train(config_path: str, overrides: dict[str, Any] | None = None, resume: str | None = None):
    import mlflow

    tracking.configure()
    if resume:
        (cfg, ray_name), config_path = _continuation_of(resume), f"runs:/{resume}/{_CONFIG_ARTIFACT}"
    else:
        cfg, ray_name = _load_config(config_path, overrides), None
    lf_args = _resolve_paths(cfg.llamafactory)
    if "://" not in cfg.ray.ray_storage_path:
        cfg.ray.ray_storage_path = str(Path(cfg.ray.ray_storage_path).expanduser().resolve())
        _check_writable(Path(cfg.ray.ray_storage_path), "ray_storage_path")
    _check_writable(Path(lf_args["output_dir"]) if lf_args.get("output_dir") else OUTPUTS_DIR, "output_dir")
    data = _check_data(lf_args)
    trained_on = [text for item in data if item.name in datasets.split_names(lf_args["dataset"])
                  for text in item.instructions()]
    instruction = tasks.instruction_of(trained_on, f"dataset {lf_args['dataset']}")  # the prompt the version keeps

    tracking.use_model_experiment(cfg.registered_model_name, train_run=resume)  # a continuation beside its run
    with mlflow.start_run() as run:  # resumes the run `mlflow run` created (MLFLOW_RUN_ID)
        try:
            mlflow.set_tag(DRIVER_TAG, processes.identity())
            # Ray Train continues a run of the same name from its last checkpoint: unique per
            # training, kept by every run that continues it.
            ray_name = ray_name or f"{cfg.ray.ray_run_name}-{run.info.run_id[:8]}"
            return _train_in_run(run, cfg, lf_args, data, instruction, config_path, ray_name, resumes=resume)
        except KeyboardInterrupt:
            mlflow.end_run("KILLED")
            raise


def _load_config(config_path: str, overrides: dict[str, Any] | None) -> train_config.TrainConfig:
    try:
        return train_config.load(config_path, overrides)
    except UserError as refused:
        if not tracking.credentials_in(overrides or {}):
            raise
        # `mlflow run` logged the overrides as its run's parameter before this job started: a refused
        # credential must not stay there.
        left = tracking.erase_launch_param("overrides")
        raise UserError(f"{refused} {left}" if left else str(refused)) from None


def _continuation_of(run_id: str) -> tuple[train_config.TrainConfig, str]:
    """The config a killed or failed training ran with, and its Ray Train run's name, to continue it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow.MlflowClient().get_run(run_id)
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/{_CONFIG_ARTIFACT}")
    except MlflowException:
        raise UserError(f"resume={run_id}: there is no training run with that id and a logged config in "
                        f"{tracking.display_uri(mlflow.get_tracking_uri())}.") from None
    if run.info.status == "FINISHED":
        registered = run.data.tags.get(registry.REGISTERED_VERSION_TAG, "see its run")
        raise UserError(f"resume={run_id}: that training finished ({registered}); there is nothing to "
                        "continue. Start a new training instead.")
    if REGISTERED_MODEL_TAG not in run.data.tags or run.data.tags.get(JOB_TAG) != "train":
        raise UserError(f"resume={run_id}: that run was not started by loraflow's train (it has no "
                        f"{REGISTERED_MODEL_TAG} tag), so it cannot be continued; start a new training instead.")
    if run.info.status == "RUNNING":
        _refuse_unless_driver_gone(run)
    if RESUMED_BY_TAG in run.data.tags:
        raise UserError(f"resume={run_id}: run {run.data.tags[RESUMED_BY_TAG]} already continues that training; "
                        "resume that run instead, if it did not finish.")
    # Stopped after it registered its version, before it could say so on the run: it is done.
    registered = mlflow.MlflowClient().search_model_versions(f"run_id='{run_id}'")
    if registered:
        raise UserError(f"resume={run_id}: that training registered {registered[0].name} version "
                        f"{registered[0].version} before it was stopped; there is nothing to continue. Evaluate that "
                        "version, or start a new training.")
    raw = yaml.safe_load(text)
    raw.pop("output_dir", None)  # the new run gets its own
    raw["run_name"] = f"{run.info.run_name}-resumed"
    raw["registered_model_name"] = run.data.tags[REGISTERED_MODEL_TAG]
    raw["task"] = run.data.tags.get(registry.TASK_TAG)
    ray_name = run.data.tags[RAY_RUN_TAG]  # tagged with REGISTERED_MODEL_TAG, checked above
    return train_config.from_dict(raw, source=f"the config of run {run_id}"), ray_name


def _refuse_unless_driver_gone(run) -> None:
    """A RUNNING run is continued only once the process that ran it is known to be gone: two
    drivers on one training would write the same checkpoints."""
    run_id, driver = run.info.run_id, run.data.tags.get(DRIVER_TAG)
    if driver is None:
        raise UserError(f"resume={run_id}: that run is still marked RUNNING and records no driver process, so "
                        "loraflow cannot tell whether it still trains. Stop it first, or wait until it ends.")
    alive = processes.alive(driver)
    if alive is None:
        raise UserError(f"resume={run_id}: that run is still marked RUNNING by a driver on host "
                        f"{processes.host_of(driver)}; resume it there, where loraflow can check that the "
                        "driver is gone.")
    if alive:
        raise UserError(f"resume={run_id}: that training is still running (pid {processes.pid_of(driver)} on "
                        "this host); wait for it to end, or stop it (Ctrl-C, or kill that pid), then resume.")


def _hand_over(previous: str, run_id: str) -> None:
    """Link the continued run to its continuation; one whose driver died is left RUNNING: end it FAILED."""
    import mlflow

    client = mlflow.MlflowClient()
    client.set_tag(previous, RESUMED_BY_TAG, run_id)
    if client.get_run(previous).info.status == "RUNNING":
        client.set_terminated(previous, "FAILED")


def _train_in_run(run, cfg, lf_args, data, instruction: str, config_path, ray_name: str, resumes: str | None):
    import llamafactory
    import mlflow

    run_id = run.info.run_id
    lf_args = llamafactory_arguments(lf_args, run_id, lf_args.get("run_name") or f"train-{Path(config_path).stem}")
    output_dir = Path(lf_args["output_dir"])
    _claim_output_dir(output_dir, run_id)

    base_model = base_models.portable_base_model(lf_args["model_name_or_path"])
    base_model_id = base_models.base_model_identity(lf_args["model_name_or_path"])
    data_digest = _combined_digest([d for d in data if d.name in datasets.split_names(lf_args["dataset"])])
    mlflow.set_tags({
        "mlflow.runName": lf_args["run_name"],
        JOB_TAG: "train",
        BASE_MODEL_TAG: base_model,
        BASE_MODEL_ID_TAG: base_model_id,
        registry.LLAMAFACTORY_VERSION_TAG: llamafactory.__version__,
        registry.GIT_COMMIT_TAG: tracking.git_commit() or "unknown",
        REGISTERED_MODEL_TAG: cfg.registered_model_name,
        registry.TASK_TAG: cfg.task,
        registry.DATA_DIGEST_TAG: data_digest,
        RAY_RUN_TAG: ray_name,
    })
    mlflow.log_params(tracking.flatten(lf_args))
    # Worker environment variables by name only: values stay out of the params the UI shows and
    # compares (credential-like names are refused by train_config; the config artifact keeps the
    # values, which resuming needs).
    ray_params = {**vars(cfg.ray), "ray_worker_env": ",".join(sorted(cfg.ray.ray_worker_env))}
    mlflow.log_params(tracking.flatten(ray_params, prefix="ray."))
    _log_lineage(data, lf_args)
    mlflow.log_text(yaml.safe_dump({**lf_args, **vars(cfg.ray)}, sort_keys=False), _CONFIG_ARTIFACT)
    if resumes:  # from here on this run can itself be resumed
        mlflow.set_tag(RESUMED_FROM_TAG, resumes)
        _hand_over(resumes, run_id)

    # Ray Train's TorchTrainer needs torch (4 s to import on the lent H200 machine): it loads while
    # Ray starts, which mostly waits for its new processes.
    threading.Thread(target=importlib.import_module, args=("torch",), name="import-torch").start()
    ray_cluster.connect()
    ray_cluster.check_feasible(
        cfg.ray.ray_num_workers, cfg.ray.resources_per_worker, cfg.ray.placement_strategy
    )
    worker_env = {  # set by the training function (ray_worker_env is the worker's runtime_env)
        "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"],
        "MLFLOW_RUN_ID": run_id,
        "MLFLOW_MAX_LOG_PARAMS": "0",  # the config is logged above, under the user's own key names
    }
    finished = ray_training.run(lf_args, cfg.ray, ray_name, worker_env, datasets.expected_digests(data))
    try:
        results, adapter_sha256 = _log_outputs(finished)
    finally:
        shutil.rmtree(finished, ignore_errors=True)

    prompt = tasks.register_prompt(tasks.get(cfg.task), instruction, run_id)
    mlflow.set_tag(registry.PROMPT_TAG, prompt.uri)
    version = register_adapter(
        cfg.registered_model_name,
        run_id,
        tags={
            registry.TASK_TAG: cfg.task,
            registry.PROMPT_TAG: prompt.uri,
            BASE_MODEL_TAG: base_model,
            BASE_MODEL_ID_TAG: base_model_id,
            registry.DATA_DIGEST_TAG: data_digest,
            registry.LORA_RANK_TAG: str(lf_args.get("lora_rank", 8)),
            registry.TEMPLATE_TAG: str(lf_args.get("template")),
            registry.TRAIN_LOSS_TAG: str(results.get("train_loss")),
        },
        description=f"LoRA adapter on {base_model}, trained by run {run_id} from {config_path}.",
        adapter_sha256=adapter_sha256,
    )
    mlflow.set_tag(registry.REGISTERED_VERSION_TAG, f"{version.name}/{version.version}")
    return version


def _looks_like_path(value: str) -> bool:
    # Hub ids are "org/name"; anything else with a slash, or starting with . or ~, is a path.
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or Path(value).exists()


def _resolve_paths(lf_args: dict[str, Any]) -> dict[str, Any]:
    """Make local paths absolute (Ray workers run in another cwd) and check that they exist."""
    args = dict(lf_args)
    model = args.get("model_name_or_path")
    if not model:
        raise UserError("model_name_or_path is missing from the config; set it to a model folder or hub id.")
    if _looks_like_path(model):
        path = Path(model).expanduser().resolve()
        if not (path / "config.json").is_file():
            hint = " Run ./setup.sh to build the default models." if ".cache/models" in str(path) else ""
            raise UserError(
                f"model_name_or_path {model!r} is not a model folder ({path} has no config.json).{hint}"
            )
        args["model_name_or_path"] = str(path)
    if not args.get("dataset"):
        raise UserError("dataset is missing from the config; name datasets from dataset_info.json.")
    dataset_dir = args.get("dataset_dir", "data")
    args["dataset_dir"] = dataset_dir if datasets.is_remote(dataset_dir) else str(Path(dataset_dir).resolve())
    if args.get("output_dir"):
        args["output_dir"] = str(Path(args["output_dir"]).expanduser().resolve())
    return args


def _check_writable(folder: Path, key: str) -> None:
    """A folder the training cannot write is refused before the run, not deep inside it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UserError(f"{key} {folder} cannot be written ({exc.strerror}); set {key} in the config to a "
                        "folder this user can write to, with free space.") from None


def _check_data(lf_args: dict[str, Any]) -> list[datasets.DatasetFile]:
    names = datasets.split_names(lf_args["dataset"]) + datasets.split_names(lf_args.get("eval_dataset"))
    return datasets.load_datasets(lf_args["dataset_dir"], list(dict.fromkeys(names)))


def llamafactory_arguments(llamafactory: dict[str, Any], run_id: str, run_name: str) -> dict[str, Any]:
    """The LLaMA-Factory arguments a training hands `run_exp` on its Ray Train workers, which add only
    their own copy of the dataset and the checkpoint they continue from: a train config's
    LLaMA-Factory keys with local paths made absolute, loraflow's defaults and its MLflow reporting.
    benchmarks/gpu_e2e.py runs bare LLaMA-Factory on the same."""
    args = {"stage": "sft", "do_train": True, "finetuning_type": "lora", "plot_loss": True,
            **_resolve_paths(llamafactory)}
    reporters = args.get("report_to") or []
    reporters = [reporters] if isinstance(reporters, str) else list(reporters)
    # MLflow is always on, through ray_training's callback rather than report_to.
    args["report_to"] = [r for r in reporters if r not in ("none", "mlflow")] or "none"
    args["run_name"] = run_name
    args.setdefault("output_dir", str(OUTPUTS_DIR / run_id))
    # loraflow checks output_dir ownership itself (below) and resumes through Ray checkpoints.
    args["overwrite_output_dir"] = True
    return args


def _claim_output_dir(output_dir: Path, run_id: str) -> None:
    marker = output_dir / RUN_MARKER
    owner = marker.read_text().strip() if marker.exists() else None
    adapter_files = ("adapter_config.json", "adapter_model.safetensors")
    occupied = any((output_dir / name).exists() for name in adapter_files) or any(
        output_dir.glob("checkpoint-*")
    )
    if occupied and owner != run_id:
        raise UserError(
            f"output_dir {output_dir} already holds an adapter from "
            f"{'run ' + owner if owner else 'another training'}; choose a new output_dir "
            f"(or leave it unset for outputs/<run id>), or remove that folder."
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(run_id + "\n")


def _combined_digest(files: list[datasets.DatasetFile]) -> str:
    return hashlib.sha256("".join(sorted(f.sha256 for f in files)).encode()).hexdigest()


def _log_lineage(data: list[datasets.DatasetFile], lf_args: dict[str, Any]) -> None:
    import mlflow
    import pandas as pd

    train_names = datasets.split_names(lf_args["dataset"])
    for item in data:
        dataset = mlflow.data.from_pandas(pd.DataFrame(item.rows), source=item.source, name=item.name)
        mlflow.log_input(
            dataset,
            context="training" if item.name in train_names else "evaluation",
            tags={"sha256": item.sha256, "rows": str(len(item.rows)),
                  "max_samples": str(lf_args.get("max_samples"))},
        )


def _log_outputs(finished: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Log the adapter, LLaMA-Factory's logs, plots and final results; return the results and
    the SHA-256 of each adapter file as logged."""
    import mlflow

    adapter_items = []
    for item in sorted(finished.iterdir()):
        if item.suffix == ".png" or item.name in _TRAINING_FILES:
            if item.name not in (RUN_MARKER, ray_training.FINAL_MARKER):
                mlflow.log_artifact(str(item), "training")
        else:
            mlflow.log_artifact(str(item), ADAPTER_ARTIFACT_PATH)
            adapter_items.append(item)
    results = _read_json(finished / "all_results.json")
    last_step = _read_json(finished / "trainer_state.json").get("global_step", 0)
    numbers = {k: float(v) for k, v in results.items() if isinstance(v, (int, float))}
    if "train_runtime" in numbers:  # what the UI compares recipes by: learning per training minute
        numbers["train_minutes"] = numbers["train_runtime"] / 60
        numbers["samples_seen"] = round(numbers.get("train_samples_per_second", 0.0) * numbers["train_runtime"])
    mlflow.log_metrics(numbers, step=last_step)
    return results, registry.file_digests(finished, adapter_items)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}
