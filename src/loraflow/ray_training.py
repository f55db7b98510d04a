"""LLaMA-Factory SFT inside Ray Train's TorchTrainer.

LLaMA-Factory 0.9.5's own USE_RAY path is no longer Ray Train (plain remote tasks, 10 CPUs each),
so we run its `run_exp` as the training function of a TorchTrainer: Ray Train sets up the
process group, restarts failed workers (FailureConfig) and persists checkpoints
(RayTrainReportCallback) under RunConfig's storage path. The finished adapter comes back to the
driver as the last reported checkpoint, which also works when workers live on other nodes.
transformers is imported on the workers only: the driver has no use for it, and its import took
16 s of the driver's start-up on the lent H200 machine (benchmarks/gpu_e2e.py --stacks).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from loraflow import compat, console, ray_cluster
from loraflow.errors import JobFailed, UserError
from loraflow.registry import RESUMED_FROM_STEP_TAG
from loraflow.train_config import RaySettings

FINAL_MARKER = "loraflow_final.json"  # present only in the checkpoint that holds the finished adapter
COMPILED_GRAPHS_METRIC = "torch_compile_graphs"


def run(lf_args: dict[str, Any], ray: RaySettings, run_name: str, worker_env: dict[str, str],
        data_sha256: dict[str, str]) -> Path:
    """Train on Ray and return a local folder with the adapter and LLaMA-Factory's outputs. Each worker
    trains only on the data the driver checked: `data_sha256` (datasets.expected_digests)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    board = None if console.verbose() else _progress_board()  # verbose: the trainer's own bars stream
    trainer = TorchTrainer(
        train_loop_per_worker=_train_worker,
        train_loop_config={"lf_args": lf_args, "env": worker_env, "progress": board, "data_sha256": data_sha256},
        scaling_config=ScalingConfig(
            num_workers=ray.ray_num_workers,
            use_gpu=ray.uses_gpu,
            resources_per_worker=ray.resources_per_worker,
            placement_strategy=ray.placement_strategy,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=ray.ray_storage_path,
            failure_config=FailureConfig(max_failures=ray.ray_max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # In the worker process from its start: some switches (the C library's malloc
            # settings) are read only then. Credential-like names are refused by train_config.
            worker_runtime_env={"env_vars": dict(ray.ray_worker_env)},
        ),
    )
    try:
        with _progress_shown(board):
            result = trainer.fit()
    except Exception as exc:  # Ray wraps the worker's exception; show the user its message
        raise TrainingFailed(_root_message(exc) + ray_cluster.worker_logs_hint()) from exc
    if result.checkpoint is None:
        raise TrainingFailed("training finished without reporting the trained adapter")
    out = Path(tempfile.mkdtemp(prefix="loraflow-adapter-"))
    result.checkpoint.to_directory(str(out))
    if not (out / FINAL_MARKER).exists():
        raise TrainingFailed(f"the last checkpoint in {result.checkpoint.path} is not a finished adapter")
    return out


class TrainingFailed(JobFailed):
    what = "training"


def _root_message(exc: BaseException) -> str:
    """The innermost cause's message: Ray nests the worker's error several levels deep."""
    seen = exc
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen).strip() or type(seen).__name__
    return text.splitlines()[-1] if "Traceback" in text else text


def _train_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    from llamafactory.train.tuner import run_exp
    from ray.train import Checkpoint
    from ray.train.huggingface.transformers import RayTrainReportCallback

    from loraflow.datasets import materialize, verify_digests

    os.environ.update(config["env"])  # MLflow run id and tracking URI for report_to: mlflow
    args = dict(config["lf_args"])
    args["dataset_dir"] = str(materialize(args["dataset_dir"]))
    verify_digests(Path(args["dataset_dir"]), config["data_sha256"])  # this node's copy, read now
    resume = ray.train.get_checkpoint()
    if resume is not None:  # a restarted worker continues from the last committed checkpoint
        local = Path(tempfile.mkdtemp(prefix="loraflow-resume-"))
        resume.to_directory(str(local))
        args["resume_from_checkpoint"] = str(local / RayTrainReportCallback.CHECKPOINT_NAME)
        _record_resumed_step(Path(args["resume_from_checkpoint"]))

    run_exp(args, callbacks=_worker_callbacks(config["progress"]))
    import mlflow

    if mlflow.active_run():  # rank 0 logged into the driver's run; hand it back to the driver
        mlflow.end_run()

    # Every worker must report; rank 0 hands the finished adapter back to the driver.
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report({"finished": 1})
        return
    with tempfile.TemporaryDirectory() as staging:
        _copy_outputs(Path(args["output_dir"]), Path(staging))
        (Path(staging) / FINAL_MARKER).write_text('{"finished": true}\n')
        ray.train.report({"finished": 1}, checkpoint=Checkpoint.from_directory(staging))


def _worker_callbacks(progress) -> list:
    """The worker's Trainer callbacks: checkpoints through Ray Train, metrics into the run, progress."""
    from ray.train.huggingface.transformers import RayTrainReportCallback
    from transformers import TrainerCallback
    from transformers.integrations import MLflowCallback

    class CommittedReportCallback(RayTrainReportCallback):
        """Ray Train's report callback, then a wait until the controller has committed the
        checkpoint. A report only queues the checkpoint; the controller takes it on its next poll
        (every 2 s), so a worker killed in between restarted from an older checkpoint, or from
        step 0. Waiting here makes every later step's log a promise that this checkpoint counts."""

        def on_save(self, args, state, control, **kwargs):
            super().on_save(args, state, control, **kwargs)
            import ray.train

            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

    class RunKeepingMLflowCallback(MLflowCallback):
        """transformers' MLflowCallback (metrics per logging step into the run named by
        MLFLOW_RUN_ID), except that it keeps the run open at train end: LLaMA-Factory evaluates after
        training, and the stock callback would log those metrics into a new run."""

        def on_train_end(self, args, state, control, **kwargs):
            pass

    class ProgressCallback(TrainerCallback):
        """Rank 0 posts its step and loss to the driver's progress board."""

        def __init__(self, board):
            self.board = board

        def on_step_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.board.update.remote(step=state.global_step, total=state.max_steps)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "loss" in logs:
                self.board.update.remote(loss=logs["loss"])

    callbacks = [CommittedReportCallback(), RunKeepingMLflowCallback(), regional_compile_callback()]
    if progress is not None:
        callbacks.append(ProgressCallback(progress))
    return callbacks


def regional_compile_callback():
    """A Trainer callback that compiles each repeated block of the model in place when the config
    asks for regional compilation (`torch_compile: true` with ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION=1).

    accelerate 1.11 (LLaMA-Factory 0.9.5 allows no later one) compiles regions into a copy of the
    model whose forward, under mixed precision, stays bound to the original: the compiled layers
    never run (huggingface/accelerate#4188, #4253). Compiled in place, with accelerate's own
    in-place helper and the Trainer's compile settings, they run whichever object is called.

    On a GPU the loss is compiled too: it is no module, so no region holds it, and run eagerly it
    writes the logits out again in float32, then their log-softmax, and reads both back for the
    gradient; compiled, it reads the bfloat16 logits and writes their gradient (docs/benchmarks-log.md
    part 5). On the CPU that traffic is not what a step waits for: no gain was measured there."""
    import torch
    from accelerate.utils import TorchDynamoPlugin, compile_regions_deepspeed
    from transformers import TrainerCallback

    class RegionalCompileCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if args.torch_compile and os.environ.get("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION") == "1":
                compile_kwargs = TorchDynamoPlugin(backend=args.torch_compile_backend,
                                                   mode=args.torch_compile_mode).to_kwargs()
                compile_regions_deepspeed(model, **compile_kwargs)
                if args.device.type == "cuda":
                    # the model under PEFT's wrapper, which has no loss of its own
                    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
                    causal_lm.loss_function = torch.compile(causal_lm.loss_function, **compile_kwargs)

        def on_train_end(self, args, state, control, **kwargs):
            """How many graphs torch.compile made: 0 with torch_compile on means the model ran uncompiled."""
            import mlflow

            if args.torch_compile and state.is_world_process_zero and mlflow.active_run():
                mlflow.log_metric(COMPILED_GRAPHS_METRIC, compat.compiled_graph_count(), step=state.global_step)

    return RegionalCompileCallback()


def _record_resumed_step(checkpoint: Path) -> None:
    """Tag the run with the step a restarted worker continues from (rank 0 only)."""
    import ray.train
    from mlflow import MlflowClient

    if ray.train.get_context().get_world_rank() != 0:
        return
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    MlflowClient().set_tag(os.environ["MLFLOW_RUN_ID"], RESUMED_FROM_STEP_TAG, str(state["global_step"]))


def _progress_board():
    """A tiny actor that workers on any node can post training progress to."""
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        def __init__(self):
            self.state = {"step": 0, "total": None, "loss": None}

        def update(self, **values):
            self.state.update(values)

        def get(self):
            return self.state

    return ProgressBoard.remote()


@contextlib.contextmanager
def _progress_shown(board):
    """Draws the board as a progress bar on the driver while training runs."""
    if board is None:
        yield
        return
    stop = threading.Event()
    thread = threading.Thread(target=_draw_progress, args=(board, stop), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def _draw_progress(board, stop: threading.Event) -> None:
    import ray

    bar = console.progress_bar(None, "training", unit="step")
    shown = None
    try:
        while True:
            stopping = stop.wait(1.0)
            state = ray.get(board.get.remote())
            if state == shown and not console.live() and not stopping:
                continue  # in a log file, a line per change rather than per second
            shown = dict(state)
            bar.total = state["total"] or bar.total
            bar.n = state["step"]
            if state["loss"] is not None:
                bar.set_postfix(loss=f"{state['loss']:.4f}", refresh=False)
            bar.refresh()
            if stopping:
                return
    except Exception:  # the bar is a convenience; Ray shutting down must not break training
        return
    finally:
        bar.close()


def _copy_outputs(output_dir: Path, dest: Path) -> None:
    """LLaMA-Factory's outputs without the intermediate checkpoint-N folders."""
    for item in output_dir.iterdir():
        if item.is_file():
            shutil.copy2(item, dest / item.name)
    if not (dest / "adapter_config.json").exists():
        raise UserError(f"training wrote no adapter_config.json into {output_dir}")
