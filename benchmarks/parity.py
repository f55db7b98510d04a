"""Served answers against evaluate's per-row predictions, for a trained version (issue 37 item 2).

A store that holds a registered version (benchmarks/quality.py --store leaves one) is evaluated on
the first --rows test rows by the evaluate entry point, with the shipped evaluation config
(`shipped`: the adapter merged into the base weights, as configs/evaluate/default.yaml has it) and
with the adapter applied per row as the server applies it (`per_row`: merge_adapter false). Then
`serve` pins that version with the shipped serving config and the openai client asks for each row
sending only its input, at evaluate's sampling (temperature 0). Reported: for each evaluation, the
share of rows whose served answer equals its prediction byte for byte, and the share asked with as
many prompt tokens (the same messages), with the first rows that differ.
Run it in the train environment after ./setup.sh, with nothing else running:

    .venvs/train/bin/python benchmarks/parity.py --store /tmp/quality-default --rows 100 \\
        --out benchmarks/results/parity-default.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

from loraflow import tracking  # noqa: E402

RUN = [sys.executable, str(ROOT / "mlproject" / "run.py")]
VARIANTS = {"shipped": {}, "per_row": {"merge_adapter": False}}


def written(source: str, folder: Path, **changes) -> str:
    config = yaml.safe_load((ROOT / source).read_text())
    config.update(changes)
    path = folder / f"{Path(source).parent.name}-{len(list(folder.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def predictions(version, rows: int, changes: dict, folder: Path, env: dict, log) -> list[dict]:
    """evaluate on the version's train run (the version's own figures stay as they are)."""
    from mlflow import MlflowClient

    config = written("configs/evaluate/default.yaml", folder, max_rows=rows, **changes)
    subprocess.run([*RUN, "evaluate", "--model", version.run_id, "--config", config], cwd=ROOT, env=env,
                   stdout=log, stderr=subprocess.STDOUT, check=True)
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`loraflow.model_ref` = '{version.run_id}'", order_by=["start_time DESC"])
    table = json.loads(Path(client.download_artifacts(runs[0].info.run_id, "predictions.json", str(folder))).read_text())
    return sorted((dict(zip(table["columns"], row)) for row in table["data"]), key=lambda row: row["index"])


def serve(version, folder: Path, env: dict, log_path: Path) -> tuple[subprocess.Popen, int]:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = written("configs/serve/default.yaml", folder, port=port, metrics_export_port=None)
    proc = subprocess.Popen([*RUN, "serve", "--name", version.name, "--version", str(version.version),
                             "--config", config], cwd=ROOT, env=env, stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while '"serving"' not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"serve did not start; see {log_path}")
        time.sleep(2)
    return proc, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True, help="folder holding mlflow.db (quality.py --store)")
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True)
    opts = parser.parse_args()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{opts.store.resolve() / 'mlflow.db'}"}
    os.environ.update(MLFLOW_TRACKING_URI=env["MLFLOW_TRACKING_URI"])
    from mlflow import MlflowClient

    [version] = sorted(MlflowClient().search_model_versions(), key=lambda v: int(v.version))[-1:]
    folder = Path(tempfile.mkdtemp(prefix="parity-"))
    sampling = yaml.safe_load((ROOT / "configs/evaluate/default.yaml").read_text())["sampling"]
    with open(folder / "jobs.log", "w") as log:
        predicted = {name: predictions(version, opts.rows, changes, folder, env, log)
                     for name, changes in VARIANTS.items()}
    proc, port = serve(version, folder, env, folder / "serve.log")
    try:
        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        served = []
        for row in predicted["shipped"]:
            answer = client.chat.completions.create(model=f"smollm2-135m-instruct:{version.name}-v{version.version}",
                                                    messages=[{"role": "user", "content": row["input"]}], **sampling)
            served.append((answer.choices[0].message.content, answer.usage.prompt_tokens))
    finally:  # SIGTERM: serve stops on it as on Ctrl-C, and a shell's nohup does not ignore it
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=180)
    report = {"machine": machine.describe(), "git_commit": tracking.git_commit(), "version": f"{version.name} v{version.version}", "rows": opts.rows, "sampling": sampling,
              "variants": {}}
    for name, rows in predicted.items():
        same = [answer == row["generated"] for (answer, _), row in zip(served, rows)]
        tokens = [count == row["num_input_tokens"] for (_, count), row in zip(served, rows)]
        report["variants"][name] = {
            "evaluate_changes": VARIANTS[name], "answers_equal": sum(same) / len(rows),
            "prompt_tokens_equal": sum(tokens) / len(rows),
            "first_differences": [{"index": row["index"], "evaluate": row["generated"], "served": answer}
                                  for (answer, _), row, ok in zip(served, rows, same) if not ok][:5],
        }
        print(f"{name}: {sum(same)}/{len(rows)} answers equal, {sum(tokens)}/{len(rows)} prompt token counts equal")
    opts.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
