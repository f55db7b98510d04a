"""What the instruction costs a CPU training step: the default config's training (LLaMA-Factory's
run_exp with the train job's regional compilation and worker environment, as
train_step_overhead.py's `bare` setting runs it) over the same rows carrying each instruction of
recipe_search.py (the seed's 159-token one, a short one, none), each in a fresh process, the order
reversed on every pass. Reported: the median step after the compiling steps, the padded tokens a
step, and each step time as a ratio to the seed instruction's, all from this one run.
What each instruction learns per sample is recipe_search.py's `prompt-*` grids (on a GPU).
Run it in the train environment after ./setup.sh, with nothing else running:

    .venvs/train/bin/python benchmarks/prompt_step_time.py --out benchmarks/results/prompt-step-time-amd.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402
import recipe_search  # noqa: E402
import train_step_overhead  # noqa: E402

from loraflow import tracking  # noqa: E402


def data_folder(instruction: str, rows: int) -> Path:
    """The first `rows` train rows with `instruction`, in LLaMA-Factory's layout."""
    folder = Path(tempfile.mkdtemp(prefix=f"prompt-{instruction}-"))
    recipe_search.write_train_data(folder, instruction, rows)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instructions", default=",".join(recipe_search.INSTRUCTIONS))
    parser.add_argument("--samples", type=int, default=96, help="training rows (4 a step)")
    parser.add_argument("--repeats", type=int, default=2, help="passes, the order reversed on each")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--log", type=Path, default=Path("prompt_step_time.log"))
    parser.add_argument("--instruction", help=argparse.SUPPRESS)  # internal: train with this one here
    parser.add_argument("--result", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.instruction:
        args = {**train_step_overhead.training_args(opts.samples, tempfile.mkdtemp()),
                "dataset_dir": str(data_folder(opts.instruction, opts.samples))}
        train_step_overhead.train({"args": args, "result": opts.result})
        return

    names = opts.instructions.split(",")
    report = {"machine": machine.describe(), "git_commit": tracking.git_commit(), "command": " ".join(sys.argv),
              "samples": opts.samples, "warm_up_steps": train_step_overhead.WARM_UP_STEPS,
              "instructions": {n: recipe_search.INSTRUCTIONS[n] for n in names}, "runs": {n: [] for n in names}}
    env = {**os.environ, **train_step_overhead.worker_env()}
    with open(opts.log, "a") as log:
        for i in range(opts.repeats):
            for name in names if i % 2 == 0 else names[::-1]:
                result = Path(tempfile.mkstemp(suffix=".json")[1])
                subprocess.run([sys.executable, __file__, "--instruction", name, "--result", str(result),
                                "--samples", str(opts.samples), "--out", str(opts.out)],
                               cwd=recipe_search.ROOT, stdout=log, stderr=subprocess.STDOUT, check=True, env=env)
                run = json.loads(result.read_text())
                report["runs"][name].append({k: run[k] for k in ("median_step_s", "tokens_per_step", "step_s")})
                opts.out.write_text(json.dumps(report, indent=1))
    step = {n: statistics.median(r["median_step_s"] for r in runs) for n, runs in report["runs"].items()}
    base = step.get("seed")
    report["median_step_s"] = step
    report["step_time_ratio_to_seed"] = {n: round(s / base, 3) for n, s in step.items()} if base else {}
    opts.out.write_text(json.dumps(report, indent=1))
    print("| instruction | median step s | x seed | padded tokens a step |")
    print("| --- | --- | --- | --- |")
    for name, runs in report["runs"].items():
        tokens = statistics.median(r["tokens_per_step"] for r in runs)
        print(f"| {name} | {step[name]:.2f} | {report['step_time_ratio_to_seed'].get(name, float('nan')):.2f} "
              f"| {tokens:.0f} |")


if __name__ == "__main__":
    main()
