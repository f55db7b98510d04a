"""What loraflow's wrapping costs on top of the engines it drives, measured side by side in one run.

On the small model of the embedded default, on this machine's CPUs:
- train:    `mlflow run . -e train` vs bare `llamafactory-cli train` on the same LLaMA-Factory
            arguments (wall clock of each command, start to exit);
- evaluate: `mlflow run . -e evaluate` (Ray Data LLM) vs a bare vLLM `LLM.chat` over the same rows,
            the same adapter and the same sampling (rows per second of wall clock, engine start in);
- serve:    `mlflow run . -e serve` (Ray Serve LLM) vs a bare vLLM OpenAI server of the same model
            and adapter: latency p50/p99 and throughput at 1, 8 and 32 concurrent clients.
The two sides of each part run one after the other, alternating order on repeats, and nothing
else should run meanwhile. Run it in the train environment after ./setup.sh:

    .venvs/train/bin/python benchmarks/cpu_overhead.py --out cpu_overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import machine
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

VENVS = ROOT / ".venvs"
BASE_MODEL = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
TRAIN_CONFIG = ROOT / "configs" / "train" / "default.yaml"
TRAIN_SAMPLES = 48  # 12 optimizer steps: a bit over 100 s of training here (--train-samples)
CLIENTS = (1, 8, 32)
REQUESTS_PER_LEVEL = {1: 24, 8: 64, 32: 128}
MAX_TOKENS = 32


def run_timed(command: list[str], env: dict, log) -> float:
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:6])} ... failed (exit {done.returncode}); see the log")
    return time.monotonic() - started


def alternate(repeats: int, first, second) -> None:
    """Runs the two sides `repeats` times, swapping which goes first, so drift hits both alike."""
    for i in range(repeats):
        for side in ((first, second) if i % 2 == 0 else (second, first)):
            side()


def bare_train_args(samples: int, output_dir: str) -> dict:
    """LLaMA-Factory's arguments for the default config with `samples` rows, run without the project."""
    from loraflow import train_config

    args = dict(train_config.load(TRAIN_CONFIG, {"max_samples": samples}).llamafactory)
    args.update(model_name_or_path=str(BASE_MODEL), dataset_dir=str(ROOT / "data" / "viggo"),
                output_dir=output_dir, overwrite_output_dir=True, report_to="none")
    return args


def bench_train(work: Path, env: dict, log, repeats: int, samples: int) -> dict:
    overrides = {"max_samples": samples}
    bare_yaml = work / "bare-train.yaml"
    bare_yaml.write_text(yaml.safe_dump(bare_train_args(samples, str(work / "bare-train"))))
    project = [str(VENVS / "train/bin/mlflow"), "run", ".", "-e", "train", "--env-manager", "local",
               "-P", f"config={TRAIN_CONFIG}", "-P", f"overrides={json.dumps(overrides)}"]
    bare = [str(VENVS / "train/bin/llamafactory-cli"), "train", str(bare_yaml)]
    times = {"project": [], "bare": []}
    # LLaMA-Factory's own train_runtime on each side: wall clock minus it is what each side spends
    # around the training loop, which separates the wrapper's cost from run-to-run engine speed.
    engine = {"project": [], "bare": []}

    def run_project() -> None:
        times["project"].append(run_timed(project, env, log))
        engine["project"].append(_last_train_runtime())

    def run_bare() -> None:
        times["bare"].append(run_timed(bare, env, log))
        engine["bare"].append(json.loads((work / "bare-train" / "all_results.json").read_text())["train_runtime"])

    alternate(repeats, run_project, run_bare)
    around = {side: [t - e for t, e in zip(times[side], engine[side])] for side in times}
    return {**_ratio(times, higher_is_better=False), "overrides": overrides, "train_runtime": engine,
            "around_training_s": around}


def _last_train_runtime() -> float:
    from mlflow import MlflowClient

    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    [run] = client.search_runs(experiments, "tags.`loraflow.job` = 'train'", order_by=["start_time DESC"],
                               max_results=1)
    return run.data.metrics["train_runtime"]


def bench_evaluate(work: Path, env: dict, log, repeats: int, version: str, rows: int | None) -> dict:
    from loraflow import evaluate as project_evaluate

    config = project_evaluate.load_config(str(ROOT / "configs" / "evaluate" / "default.yaml"))
    rows = rows or config.max_rows  # the default evaluation's rows unless told otherwise
    config = config.model_copy(update=dict(max_rows=rows, baseline=False, guided_decoding=False))  # the adapter only
    config_path = work / "eval.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump()))
    adapter = _download_adapter(version, work / "adapter")
    project = [str(VENVS / "train/bin/mlflow"), "run", ".", "-e", "evaluate", "--env-manager", "local",
               "-P", f"model=models:/{_model_name()}/{version}", "-P", f"config={config_path}"]
    bare = [str(VENVS / "infer/bin/python"), __file__, "--bare-evaluate", str(adapter), "--config", str(config_path)]
    times = {"project": [], "bare": []}
    alternate(repeats, lambda: times["project"].append(run_timed(project, env, log)),
              lambda: times["bare"].append(run_timed(bare, env, log)))
    rates = {side: [rows / s for s in seconds] for side, seconds in times.items()}
    return {**_ratio(rates, higher_is_better=True), "rows": rows, "seconds": times}


def bare_evaluate(adapter: str, config_path: str) -> None:
    """The same rows, engine settings and sampling as the project's evaluate, straight into vLLM."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from loraflow import evaluate as project_evaluate

    config = project_evaluate.load_config(config_path)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # what the project's engines get
    rows = project_evaluate._test_rows(config)  # the project's own choice of rows, so they are the same
    llm = LLM(model=str(BASE_MODEL), enable_lora=True, max_loras=1, **config.engine)
    outputs = llm.chat([_trained_messages(r) for r in rows],
                       SamplingParams(**config.sampling), lora_request=LoRARequest("adapter", 1, adapter))
    assert len(outputs) == len(rows)


def _trained_messages(row: dict) -> list[dict]:
    """The messages the version was trained with (the row's instruction and input), as evaluate sends them."""
    from loraflow.tasks import Prompt

    return Prompt("", row["instruction"]).messages(row["input"])


class _NoStore:
    uri, settings = "s3://unused/adapters", {}


def bench_serve(work: Path, env: dict, log, version: str, save, order: list[str]) -> dict:
    """Ratios per client count; `save(partial)` is called after every level, since the whole part
    takes about 25 minutes on 2 cores."""
    from loraflow import serve

    serve_config = yaml.safe_load((ROOT / "configs" / "serve" / "default.yaml").read_text())
    engine = serve.llm_config(serve.load_config(ROOT / "configs/serve/default.yaml"), str(BASE_MODEL),
                              _NoStore())["engine_kwargs"]  # the profile and serving's own, as serve builds them
    adapter = _download_adapter(version, work / "adapter")
    project_port, bare_port = _free_port(), _free_port()
    serve_config["port"] = project_port
    config_path = work / "serve.yaml"
    config_path.write_text(yaml.safe_dump(serve_config))
    servers = {
        "project": [str(VENVS / "train/bin/mlflow"), "run", ".", "-e", "serve", "--env-manager", "local",
                    "-P", f"name={_model_name()}", "-P", f"version={version}", "-P", f"config={config_path}"],
        "bare": [str(VENVS / "infer/bin/python"), "-m", "vllm.entrypoints.openai.api_server",
                 "--host", "127.0.0.1", "--port", str(bare_port), "--model", str(BASE_MODEL),
                 "--enable-lora", "--lora-modules", f"adapter={adapter}", "--dtype", engine["dtype"],
                 "--max-model-len", str(engine["max_model_len"]), "--max-lora-rank", str(engine["max_lora_rank"]),
                 "--max-loras", str(engine["max_loras"]), "--enforce-eager",
                 "--gpu-memory-utilization", str(engine["gpu_memory_utilization"]),
                 "--enable-prefix-caching" if engine.get("enable_prefix_caching") else "--no-enable-prefix-caching"],
    }
    ports = {"project": project_port, "bare": bare_port}
    rows = _test_rows(max(REQUESTS_PER_LEVEL.values()))
    # The project's server puts the version's prompt around a client's input itself; vLLM's is sent the same messages.
    prompts = {"project": [[{"role": "user", "content": r["input"]}] for r in rows],
               "bare": [_trained_messages(r) for r in rows]}
    results: dict[str, dict] = {}
    for side in order:
        command = servers[side]
        started = time.monotonic()
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            model = _wait_for_adapter(ports[side], server)
            results[side] = {"startup_s": time.monotonic() - started}
            for c in CLIENTS:
                results[side][c] = _load(ports[side], model, prompts[side], c, REQUESTS_PER_LEVEL[c])
                save({"levels": results})
        finally:
            with contextlib.suppress(ProcessLookupError):  # gone already if it failed to start
                os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=120)
    return {
        "order": order,
        "startup_s": {side: results[side]["startup_s"] for side in servers},
        **{str(c): {
            "project": results["project"][c], "bare": results["bare"][c],
            "p50_ratio": results["project"][c]["p50_s"] / results["bare"][c]["p50_s"],
            "p99_ratio": results["project"][c]["p99_s"] / results["bare"][c]["p99_s"],
            "throughput_ratio": results["project"][c]["requests_per_s"] / results["bare"][c]["requests_per_s"],
        }
        for c in CLIENTS},
    }


def _wait_for_adapter(port: int, server: subprocess.Popen) -> str:
    """The served adapter's model id, once the server answers (Ray Serve takes a minute or two)."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server on port {port} exited ({server.returncode}); see the log")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as answer:
                ids = [m["id"] for m in json.load(answer)["data"]]
            adapter = [i for i in ids if i == "adapter" or i.endswith(":production") or "-v" in i]
            if adapter:
                return adapter[0]
        except OSError:
            pass
        time.sleep(2)
    raise SystemExit(f"server on port {port} did not come up in 10 minutes; see the log")


def _load(port: int, model: str, prompts: list[list[dict]], clients: int, requests: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=300)
    latencies: list[float] = []
    tokens = 0

    async def ask(messages: list[dict]) -> None:
        nonlocal tokens
        started = time.monotonic()
        answer = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        latencies.append(time.monotonic() - started)
        tokens += answer.usage.completion_tokens

    async def one_client(mine: list[str]) -> None:
        for prompt in mine:
            await ask(prompt)

    async def main() -> float:
        await ask(prompts[0])  # warm-up: first request loads the adapter
        latencies.clear()
        started = time.monotonic()
        await asyncio.gather(*(one_client(prompts[i:requests:clients]) for i in range(clients)))
        seconds = time.monotonic() - started
        await client.close()  # inside the loop: closing it after asyncio.run ends raises
        return seconds

    seconds = asyncio.run(main())
    tokens_total = tokens
    ordered = sorted(latencies)
    return {
        "requests": len(latencies), "seconds": seconds,
        "p50_s": statistics.median(ordered), "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "requests_per_s": len(latencies) / seconds, "completion_tokens_per_s": tokens_total / seconds,
    }


def _ratio(values: dict[str, list[float]], higher_is_better: bool) -> dict:
    project, bare = statistics.median(values["project"]), statistics.median(values["bare"])
    return {"project": values["project"], "bare": values["bare"], "ratio": project / bare,
            "better_when": "higher" if higher_is_better else "lower"}


@functools.cache
def _model_name() -> str:
    from loraflow import train_config

    return train_config.load(TRAIN_CONFIG).registered_model_name


def _latest_version() -> str:
    from mlflow import MlflowClient

    versions = MlflowClient().search_model_versions(f"name='{_model_name()}'")
    return str(max(int(v.version) for v in versions))


def _download_adapter(version: str, dest: Path) -> Path:
    from mlflow import MlflowClient

    from loraflow import registry

    if dest not in _downloaded:
        source = MlflowClient().get_model_version(_model_name(), version).source
        _downloaded[dest] = registry.download_adapter(source, str(dest), f"{_model_name()} v{version}")
    return _downloaded[dest]


_downloaded: dict[Path, Path] = {}


def _test_rows(count: int) -> list[dict]:
    lines = (ROOT / "data" / "viggo" / "test.jsonl").read_text().splitlines()[:count]
    return [json.loads(line) for line in lines]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def print_table(report: dict) -> None:
    if "train" in report:
        t = report["train"]
        print(f"train: project {statistics.median(t['project']):.1f} s, bare {statistics.median(t['bare']):.1f} s, "
              f"ratio {t['ratio']:.3f}x (target <= 1.05); around the training loop: project "
              f"{statistics.median(t['around_training_s']['project']):.1f} s, bare "
              f"{statistics.median(t['around_training_s']['bare']):.1f} s")
    if "evaluate" in report:
        e = report["evaluate"]
        print(f"evaluate ({e['rows']} rows): project {statistics.median(e['project']):.3f} rows/s, bare "
              f"{statistics.median(e['bare']):.3f} rows/s, ratio {e['ratio']:.3f}x (target >= 0.9)")
    if "serve" in report:
        print("| clients | p50 project/bare s | p50 ratio | p99 project/bare s | p99 ratio | req/s project/bare "
              "| ratio |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for c, s in report["serve"].items():
            if c in ("startup_s", "order"):
                continue
            p, b = s["project"], s["bare"]
            print(f"| {c} | {p['p50_s']:.2f} / {b['p50_s']:.2f} | {s['p50_ratio']:.2f} | {p['p99_s']:.2f} / "
                  f"{b['p99_s']:.2f} | {s['p99_ratio']:.2f} | {p['requests_per_s']:.2f} / {b['requests_per_s']:.2f} "
                  f"| {s['throughput_ratio']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="train,evaluate,serve")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side of train and evaluate")
    parser.add_argument("--serve-order", default="project,bare", help="which server is measured first")
    parser.add_argument("--train-samples", type=int, default=TRAIN_SAMPLES,
                        help="max_samples of the training compared (4 per step, about 8 s a step here)")
    parser.add_argument("--eval-rows", type=int,
                        help="test rows evaluated (default: max_rows of configs/evaluate/default.yaml)")
    parser.add_argument("--version", help="registered version to evaluate and serve (default: the one trained here)")
    parser.add_argument("--out", type=Path, default=Path("cpu_overhead.json"))
    parser.add_argument("--log", type=Path, default=Path("cpu_overhead.log"))
    parser.add_argument("--bare-evaluate", metavar="ADAPTER", help=argparse.SUPPRESS)  # internal
    parser.add_argument("--config", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.bare_evaluate:
        bare_evaluate(opts.bare_evaluate, opts.config)
        return

    work = Path(tempfile.mkdtemp(prefix="loraflow-bench-"))
    env = {k: v for k, v in os.environ.items() if k not in ("LORAFLOW_API_KEY", "LORAFLOW_VERBOSE")}
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    parts = opts.parts.split(",")
    report = {"machine": machine.describe(), "tracking_uri": env["MLFLOW_TRACKING_URI"]}
    with open(opts.log, "a") as log:
        if "train" in parts:
            report["train"] = bench_train(work, env, log, opts.repeats, opts.train_samples)
            opts.out.write_text(json.dumps(report, indent=1))
        version = opts.version or _latest_version()
        if "evaluate" in parts:
            report["evaluate"] = bench_evaluate(work, env, log, opts.repeats, version, opts.eval_rows)
            opts.out.write_text(json.dumps(report, indent=1))
        if "serve" in parts:
            def save(partial: dict) -> None:
                opts.out.write_text(json.dumps({**report, "serve": partial}, indent=1, default=str))

            report["serve"] = bench_serve(work, env, log, version, save, opts.serve_order.split(","))
            opts.out.write_text(json.dumps(report, indent=1))
    print_table(report)


if __name__ == "__main__":
    main()
