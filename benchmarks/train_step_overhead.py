"""Where the train job's per-step cost under Ray Train comes from, on this machine's CPUs.

The same short LLaMA-Factory training (the default config, --samples rows, no checkpoints) runs
in each setting below, each in a fresh process, one after the other, every one but the first with
the config's `ray_worker_env` in its environment from the start (as Ray starts the workers):
  peft_loop_plain the baseline: a plain PEFT loop (forward, backward, AdamW) under bf16 autocast
                 over the batches LLaMA-Factory's own data pipeline and collator make, with the
                 model as transformers loads it (its default attention, SDPA), nothing compiled,
                 and none of the config's environment
  peft_loop      the same loop with the config's library settings: its attention implementation
                 (`flash_attn`), its regional compilation (`torch_compile` with accelerate's
                 ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION) and its environment (the C library's
                 malloc settings): what the settings buy, without the Trainer
  bare           run_exp in a plain process's main thread (what `llamafactory-cli train` does),
                 with the train job's in-place regional compilation (loraflow.ray_training)
  bare_float32   the same in float32 (`bf16: false`): what bf16 autocast buys on this CPU
  process_group  + a gloo process group of world size 1, as Ray Train sets up (DDP mode)
  thread         run_exp in a second thread, as Ray Train runs the training function
  thread_tick    + the main thread waking every 10 ms, as a Ray worker's does to check signals
  ray_driver     a local Ray instance started, training in the driver
  ray_task       training inside a plain Ray task of 2 CPUs
  ray_train      training inside a Ray Train TorchTrainer worker, on a local instance as
                 loraflow.ray_cluster starts it (what `mlflow run . -e train` does)
  ray_train_lean the same without Ray Train's preemption watcher and metrics (two of its helper
                 actors; RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0, RAY_TRAIN_METRICS_ENABLED=0)
  train_job      `mlflow run . -e train` itself on the default config (checkpoints, MLflow logging
                 and all), its step times read from the loss's timestamps in a fresh MLflow store
For each: the median step time after the first four steps (compiling, and recompiling for a second
sequence length, happen in those), the padded tokens a step, and how often the training process
was preempted in the loop (involuntary context switches per second over all its threads; not known
for train_job). Run it in the train environment after ./setup.sh, with nothing else running:

    .venvs/train/bin/python benchmarks/train_step_overhead.py --out steps.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_overhead  # noqa: E402
import machine  # noqa: E402

from loraflow import tracking  # noqa: E402

SETTINGS = ("peft_loop_plain", "peft_loop", "bare", "bare_float32", "process_group", "thread", "thread_tick", "ray_driver", "ray_task",
            "ray_train", "ray_train_lean", "train_job")


WARM_UP_STEPS = 4


def training_args(samples: int, output_dir: str) -> dict:
    # cpu_overhead's bare side, without checkpoints: only the steps are timed; padded tokens counted.
    return {**cpu_overhead.bare_train_args(samples, output_dir), "save_steps": 10**6,
            "include_num_input_tokens_seen": "all"}


def worker_env() -> dict[str, str]:
    """The default config's ray_worker_env: what every Ray Train worker starts with."""
    from loraflow import train_config

    return dict(train_config.load(cpu_overhead.TRAIN_CONFIG).ray.ray_worker_env)


def step_statistic(steps: list[float]) -> float:
    return statistics.median(steps[WARM_UP_STEPS:])


def preemptions() -> int:
    """Involuntary context switches of every thread of this process so far."""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        for line in Path(f"/proc/self/task/{tid}/status").read_text().splitlines():
            if line.startswith("nonvoluntary_ctxt_switches"):
                total += int(line.split()[1])
    return total


def train(config: dict) -> None:
    """Runs LLaMA-Factory with a callback that times steps; writes what it saw to config['result']."""
    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback

    from loraflow.ray_training import regional_compile_callback

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.steps, self.last = [], time.perf_counter()
            self.switches, self.began = preemptions(), self.last

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.steps.append(now - self.last)
            self.last = now

        def on_train_end(self, args, state, control, **kwargs):
            write_result(config["result"], self.steps, state.num_input_tokens_seen, self.began, self.switches,
                         parallel_mode=str(args.parallel_mode))

    run_exp(config["args"], callbacks=[regional_compile_callback(), StepClock()])  # as the train job compiles


def write_result(path: str, steps: list[float], tokens: int, began: float, switches: int, **extra) -> None:
    seconds = time.perf_counter() - began
    ray_processes = sum(1 for pid in os.listdir("/proc") if pid.isdigit() and _is_ray_worker(pid))
    Path(path).write_text(json.dumps({
        "step_s": steps, "median_step_s": step_statistic(steps), "tokens_per_step": tokens / len(steps),
        "preemptions_per_s": (preemptions() - switches) / seconds, "ray_worker_processes": ray_processes, **extra,
    }))


def peft_loop_parts(args: dict):
    """LLaMA-Factory builds the model (with its LoRA adapter), the tokenized dataset and the
    collator exactly as for training; returns the model (compiled by region as accelerate does
    when the config compiles), the batches and one plain training step (forward, backward, AdamW
    under the config's autocast)."""
    import torch
    from accelerate.utils import compile_regions
    from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_dataset, get_template_and_fix_tokenizer
    from llamafactory.extras.constants import IGNORE_INDEX
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_model, load_tokenizer

    model_args, data_args, training_args, finetuning_args, _ = get_train_args(args)
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    dataset = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    model = load_model(tokenizer_module["tokenizer"], model_args, finetuning_args, is_trainable=True)
    collator = SFTDataCollatorWith4DAttentionMask(
        template=template, model=model, pad_to_multiple_of=8, label_pad_token_id=IGNORE_INDEX,
        compute_dtype=model_args.compute_dtype, **tokenizer_module)
    loader = torch.utils.data.DataLoader(
        dataset["train_dataset"], batch_size=training_args.per_device_train_batch_size, shuffle=True,
        collate_fn=collator, generator=torch.Generator().manual_seed(training_args.seed))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=training_args.learning_rate)
    dtype = torch.bfloat16 if training_args.bf16 else torch.float32
    model.train()
    if training_args.torch_compile:
        model = compile_regions(model) if os.environ.get("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION") == "1" \
            else torch.compile(model)

    def step(batch) -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=training_args.bf16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, list(loader), step


def peft_loop(config: dict) -> None:
    """The floor a Trainer step is held against: the plain loop of peft_loop_parts."""
    _, batches, step = peft_loop_parts(config["args"])
    steps, tokens, switches = [], 0, preemptions()
    began = last = time.perf_counter()
    for batch in batches:
        step(batch)
        tokens += batch["input_ids"].numel()
        now = time.perf_counter()
        steps.append(now - last)
        last = now
    write_result(config["result"], steps, tokens, began, switches, parallel_mode="none")


def train_job(samples: int, result: str) -> None:
    """`mlflow run . -e train` on the default config; step times from the loss's timestamps."""
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as store:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db"}
        overrides = json.dumps({"max_samples": samples, "include_num_input_tokens_seen": "all",
                                "output_dir": f"{store}/out"})
        subprocess.run([str(Path(sys.executable).with_name("mlflow")), "run", ".", "-e", "train", "--env-manager",
                        "local", "-P", f"overrides={overrides}"], cwd=ROOT, env=env, check=True)
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        [run] = client.search_runs(["0"])
        history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
        seen = max(client.get_metric_history(run.info.run_id, "num_input_tokens_seen"), key=lambda m: m.step)
    steps = [0.0] * history[0].step  # the steps before the first logged loss are not timed
    for before, after in zip(history, history[1:]):
        steps += [(after.timestamp - before.timestamp) / 1000 / (after.step - before.step)] * (after.step - before.step)
    Path(result).write_text(json.dumps({
        "step_s": steps, "median_step_s": step_statistic(steps), "tokens_per_step": seen.value / seen.step,
        "preemptions_per_s": None, "ray_worker_processes": None, "parallel_mode": "ray_train",
    }))


def _is_ray_worker(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::")
    except OSError:
        return False


def run_setting(setting: str, config: dict) -> None:
    if setting == "peft_loop_plain":
        peft_loop({**config, "args": {**config["args"], "flash_attn": "auto", "torch_compile": False}})
    elif setting == "peft_loop":
        peft_loop(config)
    elif setting == "bare":
        train(config)
    elif setting == "bare_float32":
        train({**config, "args": {**config["args"], "bf16": False}})
    elif setting == "process_group":
        import torch.distributed as dist

        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
        dist.init_process_group("gloo")
        train(config)
    elif setting in ("thread", "thread_tick"):
        worker = threading.Thread(target=train, args=(config,))
        worker.start()
        while worker.is_alive():
            worker.join(0.01 if setting == "thread_tick" else None)
    elif setting == "ray_driver":
        import ray

        ray.init()
        train(config)
    elif setting == "ray_task":
        import ray

        ray.init(_system_config={"worker_niceness": 0})
        ray.get(ray.remote(num_cpus=2)(train).remote(config))
    elif setting in ("ray_train", "ray_train_lean"):
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from loraflow import ray_cluster

        if setting == "ray_train_lean":
            os.environ.update(RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0", RAY_TRAIN_METRICS_ENABLED="0")
        ray_cluster.connect()
        TorchTrainer(train, train_loop_config=config,
                     scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
                     run_config=RunConfig(storage_path=tempfile.mkdtemp(prefix="ray-train-"),
                                          worker_runtime_env={"env_vars": worker_env()})).fit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--samples", type=int, default=64, help="training rows (4 a step)")
    parser.add_argument("--repeats", type=int, default=1, help="passes over the settings, order reversed each time")
    parser.add_argument("--out", type=Path, default=Path("train_step_overhead.json"))
    parser.add_argument("--log", type=Path, default=Path("train_step_overhead.log"))
    parser.add_argument("--setting", help=argparse.SUPPRESS)  # internal: run one setting here
    parser.add_argument("--result", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.setting == "train_job":
        train_job(opts.samples, opts.result)
        return
    if opts.setting:
        run_setting(opts.setting, {"args": training_args(opts.samples, tempfile.mkdtemp()), "result": opts.result})
        return

    settings = opts.settings.split(",")
    report: dict = {"machine": machine.describe(), "samples": opts.samples, "worker_env": worker_env(),
                    "git_commit": tracking.git_commit(), "command": " ".join(sys.argv),
                    "runs": {s: [] for s in settings}}
    with open(opts.log, "a") as log:
        for i in range(opts.repeats):
            for setting in settings if i % 2 == 0 else settings[::-1]:
                result = Path(tempfile.mkstemp(suffix=".json")[1])
                env = os.environ if setting == "peft_loop_plain" else {**os.environ, **worker_env()}
                subprocess.run([sys.executable, __file__, "--setting", setting, "--result", str(result),
                                "--samples", str(opts.samples)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               check=True, env=env)
                report["runs"][setting].append(json.loads(result.read_text()))
                opts.out.write_text(json.dumps(report, indent=1))
    base_name = next((b for b in ("peft_loop_plain", "peft_loop", "bare") if b in report["runs"]), None)
    base = statistics.median(r["median_step_s"] for r in report["runs"][base_name]) if base_name else None
    report["ratios"] = {}
    print(f"| setting | median step s | x {base_name} | padded tokens a step | preemptions/s | Ray worker processes |")
    print("| --- | --- | --- | --- | --- | --- |")
    for setting, runs in report["runs"].items():
        step = statistics.median(r["median_step_s"] for r in runs)
        if base:
            report["ratios"][f"{setting}/{base_name}"] = round(step / base, 3)
        ratio = f"{step / base:.3f}" if base else ""
        switches = [r["preemptions_per_s"] for r in runs if r["preemptions_per_s"] is not None]
        tokens = statistics.median(r["tokens_per_step"] for r in runs)
        switched = statistics.median(switches) if switches else float("nan")
        processes = runs[-1]["ray_worker_processes"]
        print(f"| {setting} | {step:.2f} | {ratio} | {tokens:.0f} | {switched:.0f} | {processes} |")
    opts.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
