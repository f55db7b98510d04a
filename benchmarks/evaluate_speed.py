"""How long `mlflow run . -e evaluate` takes with each way of applying the adapter, measured side by
side in one run: the adapter merged into the base model's weights (`merge_adapter: true`, the CPU
default) against vLLM's per-row LoRA (`merge_adapter: false`, the baseline of the ratios), and
the cost of the baseline and guided passes (without per_row, the ratios are to the first setting). Each setting is configs/evaluate/default.yaml with
the changes named, on the same registered version, one after the other, in the order given
(repeat a name to alternate). Wall time is the whole command (engine starts and the merge
included); rows_per_s and the scores are the evaluation run's own metrics. Writes
benchmarks/results/evaluate-speed-<label>.json. Run it in the train environment after
./setup.sh, with nothing else running (the times are the result):

    .venvs/train/bin/python benchmarks/evaluate_speed.py --tracking-uri sqlite:///mlflow.db \\
        --model models:/viggo-smollm2-lora/1 --rows 1083 --settings per_row,merged --label full-split
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

MLFLOW = ROOT / ".venvs" / "train" / "bin" / "mlflow"
RESULTS = ROOT / "benchmarks" / "results"
SETTINGS = {
    "per_row": {"merge_adapter": False},
    "merged": {"merge_adapter": True},
    "merged_baseline": {"merge_adapter": True, "baseline": True},
    "merged_guided": {"merge_adapter": True, "guided_decoding": True},
}
REPORTED = ("rows", "exact_match", "intent_accuracy", "slot_f1", "parse_validity", "rows_per_s", "adapter_merge_s",
            "baseline_exact_match", "guided_exact_match", "guided_parse_validity")


def evaluate(model: str, changes: dict, rows: int, env: dict, log) -> dict:
    from mlflow import MlflowClient

    config = {**yaml.safe_load((ROOT / "configs/evaluate/default.yaml").read_text()), "max_rows": rows, **changes}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=ROOT / ".cache", delete=False) as file:
        yaml.safe_dump(config, file)
    started = time.monotonic()
    command = [str(MLFLOW), "run", ".", "-e", "evaluate", "--env-manager", "local",
               "-P", f"model={model}", "-P", f"config={file.name}"]
    done = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall_s = time.monotonic() - started
    os.unlink(file.name)
    if done.returncode != 0:
        raise SystemExit(f"evaluate with {changes} failed (exit {done.returncode}); see {log.name}")
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.`loraflow.job` = 'evaluate'", order_by=["start_time DESC"],
                              max_results=1)
    metrics = runs[0].data.metrics
    return {"wall_s": round(wall_s, 1), "run_id": runs[0].info.run_id,
            **{key: metrics[key] for key in REPORTED if key in metrics}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", required=True, help="the store that holds --model")
    parser.add_argument("--model", required=True, help="a registered version, e.g. models:/viggo-smollm2-lora/1")
    parser.add_argument("--rows", type=int, default=1083, help="test rows per evaluation (1,083: the whole split)")
    parser.add_argument("--settings", default="per_row,merged", help=f"comma-separated, of {sorted(SETTINGS)}")
    parser.add_argument("--label", required=True, help="names the result file")
    opts = parser.parse_args()
    names = opts.settings.split(",")
    unknown = set(names) - set(SETTINGS)
    if unknown:
        parser.error(f"unknown settings {sorted(unknown)}; choose from {sorted(SETTINGS)}")
    os.environ["MLFLOW_TRACKING_URI"] = opts.tracking_uri
    env = {**os.environ}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "src", "configs"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    runs = []
    with open(ROOT / ".cache" / f"evaluate-speed-{opts.label}.log", "w") as log:
        for name in names:
            runs.append({"setting": name, "changes": SETTINGS[name],
                         **evaluate(opts.model, SETTINGS[name], opts.rows, env, log)})
            print(json.dumps(runs[-1]), flush=True)

    def mean_wall(name: str) -> float | None:
        walls = [run["wall_s"] for run in runs if run["setting"] == name]
        return sum(walls) / len(walls) if walls else None

    base_name = "per_row" if "per_row" in names else names[0]  # the ratios' baseline
    baseline = mean_wall(base_name)
    report = {
        "what": __doc__.split("\n\n")[0].replace("\n", " "),
        "model": opts.model, "rows": opts.rows, "git_commit": commit, "git_dirty": dirty,
        "machine": machine.describe(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "runs": runs,
        "wall_s_mean": {name: mean_wall(name) for name in dict.fromkeys(names)},
        f"ratio_to_{base_name}": {name: round(mean_wall(name) / baseline, 3) for name in dict.fromkeys(names)},
    }
    out = RESULTS / f"evaluate-speed-{opts.label}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
