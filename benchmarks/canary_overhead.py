"""What a canary rollout costs a served request, measured side by side in one run on one server.

Three phases of the same load (concurrent clients, one-token chat answers, client-side latency):
- `stable`: every request asks for the stable name `<model_id>:production`, no rollout (the baseline);
- `canary`: the same, with v2 as a 50% canary (the server splits, counts and scores each answer);
- `by_id`:  no rollout; each request asks for v1's or v2's own id at random, 50/50: the engine
            serves the same mix of two adapters as under the canary, without the split.
canary / stable is what a user sees when a rollout starts (two adapters in the engine included);
canary / by_id is the cost of the routing and the live figures alone. The phases alternate
and each round starts with another one, so that drift over the run favours none; the figures pool
every round.

By default two versions of the tiny test model (configs/train/tiny.yaml, two seeds) are trained
into a fresh SQLite store first: its answers are fast, so loraflow's own per-request work weighs
the most there. Writes benchmarks/results/canary-overhead-<label>.json. Run it in the train
environment after ./setup.sh, with nothing else running (the times are the result):

    .venvs/train/bin/python benchmarks/canary_overhead.py --label tiny
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import machine
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
RESULTS = ROOT / "benchmarks" / "results"
NAME = "viggo-tiny-lora"
MODEL_ID = "tiny"


def train_two_versions(env: dict, log) -> None:
    for overrides in ("{}", "{seed: 7, learning_rate: 3.0e-2}"):
        done = subprocess.run([sys.executable, str(ROOT / "mlproject/run.py"), "train", "--config",
                               str(ROOT / "configs/train/tiny.yaml"), "--overrides", overrides],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise SystemExit(f"training failed (exit {done.returncode}); see {log.name}")


def promote(*args: str) -> None:
    from loraflow import entry_points

    # The tiny model is not evaluated: the gates are forced, which the audit records.
    if entry_points.main("promote", ["--name", NAME, *args, "--force", "true", "--reason", "canary benchmark"]) != 0:
        raise SystemExit(f"promote {args} failed")


def status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as answer:
        listed = {m["id"]: m for m in json.load(answer)["data"]}
    return listed[f"{MODEL_ID}:production"]["metadata"]["loraflow"]


def wait_for(port: int, done, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if done(status(port)):
                return
        except (OSError, KeyError, ValueError):  # not up yet
            pass
        time.sleep(1)
    raise SystemExit(f"the server did not {what} in {timeout:.0f} s")


def load(port: int, models: list[str], requests: int, clients: int) -> list[float]:
    """`requests` one-token chat answers from `clients` threads, each asking for a model drawn from
    `models`; returns the latencies in seconds. Any failure ends the benchmark."""
    import openai

    latencies, failures, left = [], [], iter(range(requests))
    lock = threading.Lock()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)

    def loop() -> None:
        while True:
            with lock:
                if next(left, None) is None:
                    return
            started = time.monotonic()
            try:
                client.chat.completions.create(model=random.choice(models), max_tokens=1, temperature=0.0,
                                               messages=[{"role": "user", "content": "Blizzard North made Diablo II."}])
            except Exception as exc:  # noqa: BLE001 - reported below
                failures.append(repr(exc))
            with lock:
                latencies.append(time.monotonic() - started)

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"{len(failures)} requests failed: {failures[:3]}")
    return latencies


def summary(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    return {"requests": len(ordered), "p50_ms": round(1000 * statistics.median(ordered), 2),
            "p95_ms": round(1000 * ordered[int(0.95 * (len(ordered) - 1))], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--requests", type=int, default=200, help="per phase and round")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=6, help="rounds of the three phases (a multiple of 3)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="canary-bench-"))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    os.environ["MLFLOW_TRACKING_URI"] = uri
    import mlflow

    mlflow.set_tracking_uri(uri)
    log = open(work / "log.txt", "w")
    print(f"work folder {work}", flush=True)
    train_two_versions(env, log)
    promote("--version", "1")

    config = yaml.safe_load((ROOT / "configs/serve/default.yaml").read_text())
    port = _free_port()
    config.update(port=port, poll_interval_s=1)
    config["llm_config"]["model_loading_config"]["model_id"] = MODEL_ID
    (work / "serve.yaml").write_text(yaml.safe_dump(config))
    (work / "promote.yaml").write_text(yaml.safe_dump({
        **yaml.safe_load((ROOT / "configs/promote/default.yaml").read_text()),
        "rollout": {"weight": 0.5, "steps": [], "min_requests": 10 ** 9}}))  # never judged: the split alone
    server = subprocess.Popen([sys.executable, str(ROOT / "mlproject/run.py"), "serve", "--name", NAME, "--config",
                               str(work / "serve.yaml")], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        wait_for(port, lambda s: s["serving"] == f"{NAME}-v1", "come up", timeout=900)
        stable = [f"{MODEL_ID}:production"]
        by_id = [f"{MODEL_ID}:{NAME}-v1", f"{MODEL_ID}:{NAME}-v2"]
        canary_config = str(work / "promote.yaml")

        def run_phase(phase: str, requests: int) -> list[float]:
            if phase == "canary":
                promote("--version", "2", "--stage", "Canary", "--weight", "0.5", "--config", canary_config)
                wait_for(port, lambda s: s["canary"] is not None, "start the canary")
            latencies = load(port, by_id if phase == "by_id" else stable, requests, args.clients)
            if phase == "canary":
                promote("--version", "2", "--stage", "Canary", "--weight", "0")
                wait_for(port, lambda s: s["canary"] is None, "stop the canary")
            return latencies

        order = ["stable", "canary", "by_id"]
        for phase in order:  # warm-up: v2 published (by the canary) and both adapters loaded
            run_phase(phase, 40)
        phases: dict[str, list[float]] = {phase: [] for phase in order}
        rounds = []
        for round_ in range(args.repeats):
            # Each round starts with another phase, so that drift over the run favours none.
            rotated = order[round_ % 3:] + order[:round_ % 3]
            medians = {}
            for phase in rotated:
                latencies = run_phase(phase, args.requests)
                phases[phase] += latencies
                medians[phase] = round(1000 * statistics.median(latencies), 2)
            rounds.append({"order": rotated, "p50_ms": medians})
            print(f"round {round_ + 1}: {rotated} p50 ms {medians}", flush=True)
        live = status(port)["live"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=120)
    figures = {phase: summary(latencies) for phase, latencies in phases.items()}
    result = {
        "what": "client-side latency of one-token chat answers on one server, three phases alternating",
        "machine": machine.describe(), "date": datetime.date.today().isoformat(),
        "model": "tiny (configs/train/tiny.yaml), two versions", "clients": args.clients,
        "requests_per_phase_and_round": args.requests, "rounds": rounds, "phases": figures,
        "ratios": {
            "canary_p50_over_stable_p50": round(figures["canary"]["p50_ms"] / figures["stable"]["p50_ms"], 3),
            "canary_p50_over_by_id_p50": round(figures["canary"]["p50_ms"] / figures["by_id"]["p50_ms"], 3),
        },
        "server_live_figures_at_the_end": live,
        "command": "benchmarks/canary_overhead.py " + " ".join(sys.argv[1:]),
    }
    out = RESULTS / f"canary-overhead-{args.label}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios"]), f"-> {out.relative_to(ROOT)}")


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    main()
