"""What a shipped training config teaches, measured the way a user gets it: `mlflow run . -e train`
on the config, then `mlflow run . -e evaluate` of the registered version on the full test split,
both in a fresh MLflow store. Writes benchmarks/results/quality-<config name>.json with the
figures the README quotes (those the version's task records: for viggo-mr exact match, intent
accuracy, slot F1, parse validity; for viggo-nlg BLEU and the slot error rate; training minutes,
samples seen) and how long each job took. Run it in the train environment after
./setup.sh, with nothing else running (the times are part of the result):

    .venvs/train/bin/python benchmarks/quality.py --config configs/train/default.yaml

A store trained elsewhere (benchmarks/gpu_e2e.py's smollm2 part on a lent GPU brings its SQLite
store back, at the path it had there) is evaluated here as it is, without training again:

    cat smollm2-store.tar.part-* | tar xf - -C /
    .venvs/train/bin/python benchmarks/quality.py --config configs/train/smollm2-gpu.yaml \
        --store /tmp/loraflow-smollm2-e2e --experiment smollm2-gpu-e2e \
        --train-machine "1x NVIDIA H200 (...)" --train-git-commit <commit> --out <result file>

(--no-evaluate reports the version's last evaluation in the store instead of evaluating again.)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))  # evaluation/, where the tasks live
MLFLOW = ROOT / ".venvs" / "train" / "bin" / "mlflow"
RESULTS = ROOT / "benchmarks" / "results"


def run_job(entry: str, params: dict[str, str], env: dict, log, experiment: str | None = None) -> None:
    """One entry point through `mlflow run`, as README's commands start it."""
    command = [str(MLFLOW), "run", ".", "-e", entry, "--env-manager", "local"]
    if experiment:
        command += ["--experiment-name", experiment]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    done = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"mlflow run -e {entry} failed (exit {done.returncode}); see {log.name}")


def run_minutes(run) -> float:
    return (run.info.end_time - run.info.start_time) / 60000


def recipe(config: str) -> dict:
    """The training settings that decide what is learnt per sample (tests/test_train_config.py)."""
    from loraflow import train_config

    lf = train_config.load(ROOT / config).llamafactory
    return {k: lf.get(k) for k in ("max_samples", "learning_rate", "lora_rank", "lora_alpha",
                               "per_device_train_batch_size", "num_train_epochs", "bf16")}


def trained_steps(run_id: str) -> int | None:
    """The optimizer steps of a train run, from LLaMA-Factory's trainer_state.json in its artifacts."""
    import mlflow

    try:
        state = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/training/trainer_state.json"))
    except Exception:  # noqa: BLE001 - an older run without the file: no figure
        return None
    return state.get("max_steps") or state.get("global_step")


def git_dirty() -> bool | None:
    """Whether tracked files differ from HEAD; None outside a git checkout."""
    done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    return bool(done.stdout.strip()) if done.returncode == 0 else None


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**30
    return f"{os.cpu_count()} CPU cores ({model}), {memory} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training config, e.g. configs/train/default.yaml")
    parser.add_argument("--eval-config", default="configs/evaluate/default.yaml")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/quality-<config name>.json")
    parser.add_argument("--store", type=Path, help="keep the MLflow store here (default: a temporary folder); "
                        "a store that already holds this script's trained version is evaluated again, not retrained")
    parser.add_argument("--experiment", help="MLflow experiment of both jobs (default: the store's default one)")
    parser.add_argument("--train-machine", help="where a store given with --store was trained, when not here")
    parser.add_argument("--train-git-commit", help="the commit that trained it, when not this checkout's HEAD")
    parser.add_argument("--no-evaluate", action="store_true", help="report the version's last evaluation in "
                        "--store instead of running the evaluate job again")
    opts = parser.parse_args()
    out = opts.out or RESULTS / f"quality-{Path(opts.config).stem}.json"
    import mlflow
    from mlflow import MlflowClient

    log_path = ROOT / ".cache" / f"{out.stem}.log"
    log_path.parent.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack, open(log_path, "a") as log:
        store = opts.store or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loraflow-quality-")))
        store.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{store}/mlflow.db"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        client = MlflowClient(uri)
        mlflow.set_tracking_uri(uri)  # for trained_steps' artifact read
        if not (store / "mlflow.db").exists() or not client.search_model_versions():
            run_job("train", {"config": opts.config, "overrides": f"{{output_dir: {store}/adapter}}"}, env, log,
                    opts.experiment)
        [version] = client.search_model_versions()
        train_run = client.get_run(version.run_id)
        if not opts.no_evaluate:
            run_job("evaluate", {"model": f"models:/{version.name}/{version.version}", "config": opts.eval_config},
                    env, log, opts.experiment)
        tags = client.get_model_version(version.name, version.version).tags
        eval_run = client.get_run(tags["loraflow.eval.run_id"])  # the version's last evaluation
    from loraflow import tasks

    task = tasks.get(tags["loraflow.task"])
    headline = (*task.recorded, "rows_per_s")
    prefix, suffix = f"{task.slice_name}_", f"_{task.headline}"
    train_metrics, scores = train_run.data.metrics, eval_run.data.metrics
    report = {
        "config": opts.config,
        "eval_config": opts.eval_config,
        "git_commit": opts.train_git_commit or subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT,
                                                               capture_output=True, text=True).stdout.strip(),
        "git_dirty": git_dirty(),
        "task": task.name,
        **{key: scores[key] for key in headline},
        "train_minutes": train_metrics["train_runtime"] / 60,  # LLaMA-Factory's training loop
        "train_run_minutes": run_minutes(train_run),  # the MLflow run: checks, Ray, training, registration
        "evaluate_run_minutes": run_minutes(eval_run),  # engine start, generation, scoring, logging
        "samples_seen": train_metrics["samples_seen"],  # the train run's own metric
        "recipe": recipe(opts.config),
        "steps": int(train_metrics.get("total_steps", 0)) or trained_steps(train_run.info.run_id),
        "train_loss": train_metrics.get("train_loss"),
        f"{task.headline}_by_{task.slice_name}": {k[len(prefix):-len(suffix)]: v for k, v in scores.items()
                                                  if k.startswith(prefix) and k.endswith(suffix)},
        "machine": f"training: {opts.train_machine}; evaluation: {machine()}" if opts.train_machine else machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("config", *headline, "train_minutes", "train_run_minutes",
                                             "evaluate_run_minutes")}, indent=1))


if __name__ == "__main__":
    main()
