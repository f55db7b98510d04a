"""Where the train job's per-step cost under Ray Train comes from, on this machine's CPUs.

The same short LLaMA-Factory training (the default config, --samples rows, no checkpoints) runs
in each setting below, each in a fresh process, one after the other:
  bare           run_exp in a plain process's main thread (what `llamafactory-cli train` does)
  process_group  + a gloo process group of world size 1, as Ray Train sets up (DDP mode)
  thread         run_exp in a second thread, as Ray Train runs the training function
  thread_tick    + the main thread waking every 10 ms, as a Ray worker's does to check signals
  ray_driver     a local Ray instance started, training in the driver
  ray_task       training inside a plain Ray task of 2 CPUs
  ray_train      training inside a Ray Train TorchTrainer worker (what `mlflow run . -e train` does)
For each: the mean step time after the first two steps, and how often the training process was
preempted in the loop (involuntary context switches per second over all its threads). Run it in
the train environment after ./setup.sh, with nothing else running:

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

SETTINGS = ("bare", "process_group", "thread", "thread_tick", "ray_driver", "ray_task", "ray_train")


def training_args(samples: int, output_dir: str) -> dict:
    # cpu_overhead's bare side, without checkpoints: only the steps are timed.
    return {**cpu_overhead.bare_train_args(samples, output_dir), "save_steps": 10**6}


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

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.steps, self.last = [], time.perf_counter()
            self.switches, self.began = preemptions(), self.last

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.steps.append(now - self.last)
            self.last = now

        def on_train_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self.began
            ray_processes = sum(1 for pid in os.listdir("/proc") if pid.isdigit() and _is_ray_worker(pid))
            Path(config["result"]).write_text(json.dumps({
                "step_s": self.steps, "mean_step_s_after_2": statistics.mean(self.steps[2:]),
                "preemptions_per_s": (preemptions() - self.switches) / seconds,
                "ray_worker_processes": ray_processes, "parallel_mode": str(args.parallel_mode),
            }))

    run_exp(config["args"], callbacks=[StepClock()])


def _is_ray_worker(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::")
    except OSError:
        return False


def run_setting(setting: str, config: dict) -> None:
    if setting == "bare":
        train(config)
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

        ray.init()
        ray.get(ray.remote(num_cpus=2)(train).remote(config))
    elif setting == "ray_train":
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        ray.init()
        TorchTrainer(train, train_loop_config=config,
                     scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
                     run_config=RunConfig(storage_path=tempfile.mkdtemp(prefix="ray-train-"))).fit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--samples", type=int, default=40, help="training rows (4 a step)")
    parser.add_argument("--repeats", type=int, default=1, help="passes over the settings, order reversed each time")
    parser.add_argument("--out", type=Path, default=Path("train_step_overhead.json"))
    parser.add_argument("--log", type=Path, default=Path("train_step_overhead.log"))
    parser.add_argument("--setting", help=argparse.SUPPRESS)  # internal: run one setting here
    parser.add_argument("--result", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.setting:
        run_setting(opts.setting, {"args": training_args(opts.samples, tempfile.mkdtemp()), "result": opts.result})
        return

    settings = opts.settings.split(",")
    report: dict = {"machine": f"{os.cpu_count()} CPUs", "samples": opts.samples, "runs": {s: [] for s in settings}}
    with open(opts.log, "a") as log:
        for i in range(opts.repeats):
            for setting in settings if i % 2 == 0 else settings[::-1]:
                result = Path(tempfile.mkstemp(suffix=".json")[1])
                subprocess.run([sys.executable, __file__, "--setting", setting, "--result", str(result),
                                "--samples", str(opts.samples)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               check=True)
                report["runs"][setting].append(json.loads(result.read_text()))
                opts.out.write_text(json.dumps(report, indent=1))
    base = statistics.median(r["mean_step_s_after_2"] for r in report["runs"].get("bare", [])) \
        if "bare" in report["runs"] else None
    print("| setting | mean step s | x bare | preemptions/s | Ray worker processes |")
    print("| --- | --- | --- | --- | --- |")
    for setting, runs in report["runs"].items():
        step = statistics.median(r["mean_step_s_after_2"] for r in runs)
        ratio = f"{step / base:.3f}" if base else ""
        print(f"| {setting} | {step:.2f} | {ratio} | {statistics.median(r['preemptions_per_s'] for r in runs):.0f} "
              f"| {runs[-1]['ray_worker_processes']} |")


if __name__ == "__main__":
    main()
