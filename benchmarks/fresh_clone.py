"""README command 1 on a fresh clone, timed, and the version it registers scored the way the
quality issue's "done when" says: clone this repository's HEAD into a new folder, then in it

    ./setup.sh
    .venvs/train/bin/mlflow run . -e train --env-manager local
    .venvs/train/bin/mlflow run . -e evaluate --env-manager local -P model=models:/viggo-smollm2-lora/1

each timed, with the clone's own MLflow store (mlflow.db) read afterwards. Writes
benchmarks/results/fresh-clone-default.json. Run it with nothing else running (the times are the
result); the pip cache of the machine is used as on any machine, unless --cold.

    python3 benchmarks/fresh_clone.py --dest /tmp/loraflow-fresh [--cold]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODEL = "viggo-smollm2-lora"


def timed(command: list[str], cwd: Path, log, env: dict | None = None) -> float:
    started = time.monotonic()
    log.write(f"\n$ {' '.join(command)}\n")
    log.flush()
    done = subprocess.run(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}); see {log.name}")
    return time.monotonic() - started


def figures(store: Path) -> dict:
    """The registered version's train run's metrics and, once evaluated, its evaluation's, from the SQLite store."""
    db = sqlite3.connect(store)
    tags = dict(db.execute("select key, value from model_version_tags where name = ? and version = 1", (MODEL,)))
    train_run = db.execute("select run_id from model_versions where name = ? and version = 1", (MODEL,)).fetchone()[0]

    def metrics(run_id: str) -> dict:
        rows = db.execute("select key, value, step from latest_metrics where run_uuid = ?", (run_id,))
        return {key: value for key, value, _ in rows}

    return {"train": metrics(train_run), "evaluate": metrics(tags["loraflow.eval.run_id"]) if "loraflow.eval.run_id" in tags else {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, required=True, help="an empty or absent folder for the clone")
    parser.add_argument("--out", type=Path, default=RESULTS / "fresh-clone-default.json")
    parser.add_argument("--cold", action="store_true", help="as on a machine that never ran it: an empty pip "
                        "cache for ./setup.sh and an empty torch.compile cache for the training")
    opts = parser.parse_args()
    env = dict(os.environ)
    if opts.cold:
        caches = Path(tempfile.mkdtemp(prefix="fresh-clone-caches-"))
        env.update(PIP_CACHE_DIR=str(caches / "pip"), TORCHINDUCTOR_CACHE_DIR=str(caches / "torchinductor"))
    if opts.dest.exists():
        shutil.rmtree(opts.dest)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    log_path = ROOT / ".cache" / "fresh-clone.log"
    log_path.parent.mkdir(exist_ok=True)
    report = {
        "config": "configs/train/default.yaml",
        "git_commit": commit,
        "commands": ["./setup.sh", ".venvs/train/bin/mlflow run . -e train --env-manager local",
                     f".venvs/train/bin/mlflow run . -e evaluate --env-manager local -P model=models:/{MODEL}/1"],
        "machine": machine.describe(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cold_caches": opts.cold,
    }

    def save(**figures_so_far) -> None:  # after every phase: a run stopped later keeps what it measured
        report.update(figures_so_far)
        opts.out.write_text(json.dumps(report, indent=1) + "\n")

    with open(log_path, "w") as log:
        timed(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(opts.dest)], ROOT, log)
        setup_s = timed(["./setup.sh"], opts.dest, log, env)
        python = str(opts.dest / ".venvs" / "train" / "bin" / "python")
        save(setup_minutes=setup_s / 60, matmul_bf16_gflops_before=machine.matmul_gflops(python))
        mlflow = str(opts.dest / ".venvs" / "train" / "bin" / "mlflow")
        train_s = timed([mlflow, "run", ".", "-e", "train", "--env-manager", "local"], opts.dest, log, env)
        trained = figures(opts.dest / "mlflow.db")["train"]
        save(train_command_minutes=train_s / 60, command_1_minutes=(setup_s + train_s) / 60,
             train_minutes=trained["train_runtime"] / 60, samples_seen=trained.get("samples_seen"),
             matmul_bf16_gflops_after=machine.matmul_gflops(python))
        evaluate_s = timed([mlflow, "run", ".", "-e", "evaluate", "--env-manager", "local",
                            "-P", f"model=models:/{MODEL}/1"], opts.dest, log, env)
    scores = figures(opts.dest / "mlflow.db")["evaluate"]
    save(evaluate_command_minutes=evaluate_s / 60,
         **{key: scores[key] for key in ("rows", "exact_match", "intent_accuracy", "slot_f1", "parse_validity",
                                         "rows_per_s")})
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
