"""Many adapters on one base model, one server (issue 39 item 5): requests/s and p50/p95 latency with
1, 4, 16 and 64 registered models in a uniform and a skewed (Zipf) mix of traffic, against the base
model alone and against bare vLLM (its OpenAI server with the same adapters, engine arguments,
prompts and requests), measured in one run; the cold load of an adapter; resident memory.

The adapters: the newest version of a store's registered model (benchmarks/quality.py --store leaves
one), copied N times with its lora_B matrices scaled by 1 + 0.05 i, so that each answers with weights
of its own; each copy is registered as `viggo-bench-NN` and promoted (forced: the copies are not
evaluated). loraflow: `serve` with the shipped serving config listing N of them, clients sending a
test row's input alone to `<model_id>:viggo-bench-NN` (each adapter's first request, which publishes it,
is timed apart, one client at a time). Bare vLLM: `vllm.entrypoints.openai.api_server`
with `--lora-modules` for the same N adapter folders and the shipped engine profile and LoRA slots,
asked for the same rows with the messages the server builds from the version's prompt. Every point
sends the same sequence of (adapter, row) pairs from --clients threads at temperature 0.
Run it in the train environment after ./setup.sh, with nothing else running:

    .venvs/train/bin/python benchmarks/multi_lora.py --store /tmp/quality-none-2400 \\
        --adapter /tmp/quality-none-2400/adapter --out benchmarks/results/multi-lora-cpu-amd.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))  # the task scorers (evaluation/)
import machine  # noqa: E402

from loraflow import base_models, registry, registry_changes, tasks, tracking  # noqa: E402

RUN = [sys.executable, str(ROOT / "mlproject" / "run.py")]
INFER_PYTHON = str(ROOT / ".venvs" / "infer" / "bin" / "python")
PREFIX = "viggo-bench-"
SERVE_CONFIG = yaml.safe_load((ROOT / "configs/serve/default.yaml").read_text())
MODEL_ID = SERVE_CONFIG["llm_config"]["model_loading_config"]["model_id"]
ENGINE = yaml.safe_load((ROOT / SERVE_CONFIG["engine"]).read_text())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_models(version, count: int, folder: Path, adapter: Path | None) -> list[Path]:
    """`count` registered models, each a copy of `version`'s adapter (or of the files of the folder
    `adapter`) with its lora_B scaled by 1 + 0.05 i, in Production; their adapter folders (for bare vLLM)."""
    import mlflow
    from safetensors.torch import load_file, save_file

    source = adapter or Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source,
                                                                 dst_path=str(folder / "source")))
    folders = []
    for i in range(count):
        name, copy = f"{PREFIX}{i:02d}", folder / f"{PREFIX}{i:02d}"
        copy.mkdir(parents=True)
        for file in source.iterdir():  # the adapter's files, not a training folder's checkpoints
            if file.is_file():
                shutil.copy2(file, copy / file.name)
        weights = load_file(copy / "adapter_model.safetensors")
        save_file({key: value * (1 + 0.05 * i) if ".lora_B." in key else value for key, value in weights.items()},
                  str(copy / "adapter_model.safetensors"))
        with mlflow.start_run(run_name=f"multi-lora-copy-{i:02d}"):
            mlflow.log_artifacts(str(copy), registry.ADAPTER_ARTIFACT_PATH)
            run_id = mlflow.active_run().info.run_id
        registered = registry.register_adapter(name, run_id, dict(version.tags), "multi_lora benchmark copy",
                                               registry.file_digests(copy))
        registry_changes.promote(name, str(registered.version), "Production", "multi_lora benchmark: a copy",
                                 True, str(ROOT / "configs/promote/default.yaml"))
        folders.append(copy)
    return folders


def traffic(count: int, mix: str, rows: list[str], requests: int, seed: int = 0) -> list[tuple[int, str]]:
    """The (adapter index, input) pairs every system is sent, in order: adapters drawn uniformly or
    by Zipf's law (s = 1.1, adapter 0 the most asked for)."""
    draw = random.Random(seed)
    weights = [1.0] * count if mix == "uniform" else [1 / (k + 1) ** 1.1 for k in range(count)]
    return [(draw.choices(range(count), weights)[0], rows[i % len(rows)]) for i in range(requests)]


def send(port: int, asks: list[tuple[str, list[dict]]], clients: int, sampling: dict) -> dict:
    """Each (model, messages) once, from `clients` threads; latencies and failures."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    latencies, failures, left, lock = [], [], iter(asks), threading.Lock()

    def loop() -> None:
        while True:
            with lock:
                ask = next(left, None)
            if ask is None:
                return
            started = time.monotonic()
            try:
                client.chat.completions.create(model=ask[0], messages=ask[1], **sampling)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    failures.append(repr(exc)[:300])
                continue
            with lock:
                latencies.append(time.monotonic() - started)

    started = time.monotonic()
    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    ordered = sorted(latencies)
    return {"requests": len(asks), "failed": len(failures), "errors": failures[:3], "clients": clients,
            "requests_per_s": round(len(ordered) / elapsed, 3),
            "p50_ms": round(1000 * statistics.median(ordered), 1) if ordered else None,
            "p95_ms": round(1000 * ordered[int(0.95 * (len(ordered) - 1))], 1) if ordered else None}


def session_rss_mb(leader: int) -> float:
    """Resident memory of every process in `leader`'s session (the server, Ray's and the engine's)."""
    total = 0
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == leader:  # the session id
                total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return round(total / 2**20, 1)


def start(command: list[str], log: Path, ready: str, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 900
    while ready not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise SystemExit(f"{command[1:4]} did not start; see {log}")
        time.sleep(2)
    return proc


def stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(3)  # its Ray processes and ports


def serve_loraflow(names: list[str], folder: Path, env: dict) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    config = {**SERVE_CONFIG, "port": port, "metrics_export_port": None, "models": names}
    path = folder / f"serve-{len(names)}.yaml"
    path.write_text(yaml.safe_dump(config))
    return start([*RUN, "serve", "--config", str(path)], folder / f"serve-{len(names)}.log", '"serving"', env), port


def serve_bare(base: str, adapters: list[Path], folder: Path, env: dict) -> tuple[subprocess.Popen, int]:
    """vLLM's own OpenAI server with the engine profile and the serving config's LoRA slots."""
    port = _free_port()
    engine = {**ENGINE, **SERVE_CONFIG["llm_config"]["engine_kwargs"]}
    args = [INFER_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", base, "--served-model-name",
            MODEL_ID, "--host", "127.0.0.1", "--port", str(port), "--max-lora-rank", str(engine["max_lora_rank"]),
            "--max-loras", str(engine["max_loras"]), "--max-model-len", str(engine["max_model_len"]),
            "--dtype", engine["dtype"], "--gpu-memory-utilization", str(engine["gpu_memory_utilization"]),
            "--enable-lora", "--lora-modules", *[f"{PREFIX}{i:02d}={path}" for i, path in enumerate(adapters)]]
    args += ["--enforce-eager"] * bool(engine.get("enforce_eager")) + \
        ["--enable-prefix-caching"] * bool(engine.get("enable_prefix_caching"))
    return start(args, folder / f"bare-{len(adapters)}.log", "Application startup complete", env), port


def cold_loads(port: int, names: list[str], messages: list[dict], sampling: dict) -> dict:
    """One client: each adapter asked twice in a row, after the others pushed it out of the
    engine's LoRA slots; the first answer's extra time over the second is its load."""
    extra = []
    for name in names:
        first = send(port, [(name, messages)], 1, sampling)["p50_ms"]
        second = send(port, [(name, messages)], 1, sampling)["p50_ms"]
        extra.append(first - second)
    ordered = sorted(extra)
    return {"adapters": len(names), "extra_p50_ms": round(statistics.median(ordered), 1),
            "extra_p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True, help="folder holding mlflow.db (quality.py --store)")
    parser.add_argument("--adapter", type=Path, help="the adapter's files, where the store's artifacts are gone "
                        "(quality.py --store keeps them in <store>/adapter)")
    parser.add_argument("--counts", default="1,4,16,64")
    parser.add_argument("--requests", type=int, default=48, help="per point")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    opts = parser.parse_args()
    counts = [int(c) for c in opts.counts.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="multi-lora-"))
    store = folder / "store"
    shutil.copytree(opts.store, store)  # the copies are registered in a copy: the source store stays as it was
    uri = f"sqlite:///{store / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    os.environ["MLFLOW_TRACKING_URI"] = uri
    from mlflow import MlflowClient

    import mlflow

    mlflow.set_experiment(experiment_id=mlflow.create_experiment(
        "multi-lora", artifact_location=str(folder / "artifacts")))  # the copies' files stay in the copy
    client = MlflowClient()
    [version] = sorted((v for m in client.search_registered_models() for v in client.search_model_versions(
        f"name='{m.name}'") if registry.BASE_MODEL_TAG in v.tags), key=lambda v: v.creation_timestamp)[-1:]
    _, prompt = tasks.of_version(version)
    base = base_models.base_model_source(registry.base_model(version.tags, "the source version"))
    adapters = make_models(version, max(counts), folder / "adapters", opts.adapter)
    names = [f"{PREFIX}{i:02d}" for i in range(max(counts))]
    rows = [json.loads(line)["input"] for line in (ROOT / "data/viggo/test.jsonl").read_text().splitlines()]
    sampling = yaml.safe_load((ROOT / "configs/evaluate/default.yaml").read_text())["sampling"]
    report = {"machine": machine.describe(), "matmul_gflops": machine.matmul_gflops(INFER_PYTHON),
              "git_commit": tracking.git_commit(), "source_version": f"{version.name} v{version.version}",
              "requests_per_point": opts.requests, "clients": opts.clients, "sampling": sampling,
              "engine": {**ENGINE, **SERVE_CONFIG["llm_config"]["engine_kwargs"]},
              "max_num_adapters_per_replica": SERVE_CONFIG["llm_config"]["lora_config"]["max_num_adapters_per_replica"],
              "points": {}}
    for count in counts:
        mixes = {mix: traffic(count, mix, rows, opts.requests) for mix in (("uniform",) if count == 1 else
                                                                          ("uniform", "zipf"))}
        point = report["points"][str(count)] = {}
        for system in ("loraflow", "bare"):
            proc, port = (serve_loraflow(names[:count], folder, env) if system == "loraflow"
                          else serve_bare(base, adapters[:count], folder, env))
            try:
                memory = [session_rss_mb(proc.pid)]
                # Each adapter's first request, one at a time (loraflow publishes it into its LoRA store
                # then; both engines load it): not in the timed mixes.
                point[f"{system}_first_requests"] = send(port, [
                    (f"{MODEL_ID}:{name}", [{"role": "user", "content": rows[0]}]) if system == "loraflow"
                    else (name, prompt.messages(rows[0])) for name in names[:count]], 1, sampling)
                for mix, sequence in mixes.items():
                    asks = [(f"{MODEL_ID}:{names[i]}" if system == "loraflow" else names[i],
                             [{"role": "user", "content": text}] if system == "loraflow" else prompt.messages(text))
                            for i, text in sequence]
                    point[f"{system}_{mix}"] = send(port, asks, opts.clients, sampling)
                    memory.append(session_rss_mb(proc.pid))
                    print(count, system, mix, point[f"{system}_{mix}"], flush=True)
                if count == 1:  # the base model alone, asked the same rows as the adapter
                    asks = [(MODEL_ID, prompt.messages(text)) for _, text in mixes["uniform"]]
                    point[f"{system}_base"] = send(port, asks, opts.clients, sampling)
                    point[f"{system}_one_client"] = send(port, [
                        (f"{MODEL_ID}:{names[0]}", [{"role": "user", "content": text}]) if system == "loraflow"
                        else (names[0], prompt.messages(text)) for _, text in mixes["uniform"][:12]], 1, sampling)
                    print(count, system, "base", point[f"{system}_base"], flush=True)
                if count == max(counts) and count > 4:
                    pick = [f"{MODEL_ID}:{n}" if system == "loraflow" else n for n in names[:16]]
                    point[f"{system}_cold_load"] = cold_loads(
                        port, pick, prompt.messages(rows[0]) if system == "bare"
                        else [{"role": "user", "content": rows[0]}], sampling)
                    print(count, system, "cold", point[f"{system}_cold_load"], flush=True)
                point[f"{system}_rss_mb"] = memory
            finally:
                stop(proc)
        for mix in mixes:
            ours, bare = point[f"loraflow_{mix}"], point[f"bare_{mix}"]
            point[f"ratio_{mix}"] = {"requests_per_s": round(ours["requests_per_s"] / bare["requests_per_s"], 3),
                                     "p50": round(ours["p50_ms"] / bare["p50_ms"], 3),
                                     "p95": round(ours["p95_ms"] / bare["p95_ms"], 3)}
        opts.out.write_text(json.dumps(report, indent=1) + "\n")  # after each point: a partial run keeps them
    one = report["points"]["1"]["loraflow_uniform"]["requests_per_s"] if "1" in report["points"] else None
    report["throughput_vs_one_adapter"] = {
        count: {mix: round(point[f"loraflow_{mix}"]["requests_per_s"] / one, 3)
                for mix in ("uniform", "zipf") if f"loraflow_{mix}" in point}
        for count, point in report["points"].items()} if one else None
    opts.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["throughput_vs_one_adapter"]))


if __name__ == "__main__":
    main()
