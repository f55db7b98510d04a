"""The train entry point end to end: real LLaMA-Factory training on Ray Train into a real MLflow
store, and every bad input refused with a clear message and nothing registered."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import ROOT, TINY_CONFIG, config_with, entry_point, registered_versions, run_train
from mlflow import MlflowClient

from loraflow import compat, registry


def _all_runs() -> list:
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _only_run(experiment: str | None = None):
    runs = MlflowClient().search_runs([experiment]) if experiment else _all_runs()
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def test_mlflow_run_train_logs_everything_and_registers(tracking_uri, tmp_path):
    """`mlflow run . -e train` with the tiny model: the command users run. With
    configs/train/default.yaml's CPU speed settings: its ray_worker_env (plus one of the test's) is
    in the worker process's environment from its start (glibc reads its malloc settings only
    then), and with torch_compile and regional compilation the compiled layers really run
    (accelerate 1.11 alone compiles a copy of the model that never runs under mixed precision)."""
    default = yaml.safe_load((ROOT / "configs" / "train" / "default.yaml").read_text())
    speed = {k: default[k] for k in ("flash_attn", "torch_compile", "ray_worker_env", "bf16", "use_cpu")}
    assert speed["torch_compile"] and speed["ray_worker_env"]["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"] == "1"
    worker_env = {**speed["ray_worker_env"], "LORAFLOW_PROBE": "probe-value-7"}
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    config = tmp_path / "train.yaml"  # the worker environment in the file: `-P` values are mlflow run's params
    config.write_text(yaml.safe_dump({**yaml.safe_load(TINY_CONFIG.read_text()), **speed, "ray_worker_env": worker_env,
                                      "eval_strategy": "no"}))  # evaluation compiles again: the two-workers test
    proc = subprocess.Popen(
        [str(mlflow_cli), "run", ".", "-e", "train", "--env-manager", "local",
         "--experiment-name", "viggo", "-P", f"config={config}",
         "-P", f"overrides={{output_dir: {tmp_path / 'out'}}}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        started_with = _worker_start_environment(proc)
        _, stderr = proc.communicate(timeout=900)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert {k: started_with.get(k) for k in worker_env} == worker_env
    # quiet by default: the driver's progress bar, not the Ray workers' own log lines
    assert "training: 100%" in stderr and "loss=" in stderr
    assert "RayTrainWorker" not in stderr and "LlamaConfig" not in stderr
    client = MlflowClient()
    run = _only_run(client.get_experiment_by_name("viggo").experiment_id)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"

    # per-step metrics while training, and the loss fell
    loss = [m.value for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)]
    assert len(loss) >= 3 and loss[-1] < loss[0]
    for name in ("learning_rate", "grad_norm", "epoch", "train_loss", "train_runtime"):
        assert name in run.data.metrics, name
    # what the UI compares recipes by: samples seen (tiny.yaml: 16 rows, one epoch) and minutes
    assert run.data.metrics["samples_seen"] == 16
    assert run.data.metrics["train_minutes"] == pytest.approx(run.data.metrics["train_runtime"] / 60)

    # params: the resolved LLaMA-Factory config and the Ray settings
    params = run.data.params
    assert params["lora_rank"] == "8" and params["template"] == "smollm2"
    assert params["torch_compile"] == "True" and params["flash_attn"] == "disabled"
    assert run.data.metrics["torch_compile_graphs"] >= 1  # 0: the layers ran uncompiled
    assert params["ray.ray_num_workers"] == "1" and params["ray.resources_per_worker.CPU"] == "2"
    assert params["output_dir"] == str(tmp_path / "out")
    # worker environment variables by name, never their values
    assert params["ray.ray_worker_env"] == ",".join(sorted(worker_env))
    assert not [k for k, v in params.items() if "probe-value-7" in v]

    # artifacts: adapter under a fixed path, logs, loss plot, resolved config
    def listing(path):
        return {Path(a.path).name for a in client.list_artifacts(run_id, path)}

    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= listing("adapter")
    assert {"trainer_log.jsonl", "training_loss.png", "all_results.json"} <= listing("training")
    assert listing("config") == {"train_config.yaml"}
    local = client.download_artifacts(run_id, "adapter/adapter_config.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["r"] == 8

    # lineage, tags
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"viggo-train", "viggo-val"}
    tags = {t.key: t.value for t in inputs["viggo-train"].tags}
    assert tags["mlflow.data.context"] == "training" and len(tags["sha256"]) == 64
    # portable: the project's folder relative to the project, plus what its files are
    assert run.data.tags["loraflow.base_model"] == "./.cache/models/tiny-smollm2"
    assert re.fullmatch(r"tiny-smollm2@sha256:[0-9a-f]{16}", run.data.tags["loraflow.base_model_id"])
    assert run.data.tags["loraflow.llamafactory_version"] == "0.9.5"
    assert len(run.data.tags["loraflow.git_commit"]) == 40

    # one registered version, pointing at this run
    [version] = registered_versions()
    assert (version.name, str(version.version), version.run_id) == ("viggo-tiny-lora", "1", run_id)
    assert version.source == f"runs:/{run_id}/adapter"
    assert version.tags["loraflow.base_model"] == run.data.tags["loraflow.base_model"]
    assert version.tags["loraflow.base_model_id"] == run.data.tags["loraflow.base_model_id"]
    assert version.tags["loraflow.data_digest"] == run.data.tags["loraflow.data_digest"]
    # the task and the prompt it trained with: the rows' instruction, in the Prompt Registry, linked to the run
    assert (version.tags["loraflow.task"], run.data.tags["loraflow.task"]) == ("viggo-mr", "viggo-mr")
    assert version.tags["loraflow.prompt"] == run.data.tags["loraflow.prompt"] == "prompts:/viggo-mr-instruction/1"
    assert json.loads(run.data.tags["mlflow.linkedPrompts"]) == [{"name": "viggo-mr-instruction", "version": "1"}]
    instruction = json.loads((ROOT / "data/viggo/train.jsonl").open().readline())["instruction"]
    assert MlflowClient().load_prompt("prompts:/viggo-mr-instruction/1").format(input="x") \
        == [{"role": "user", "content": f"{instruction}\nx"}]
    downloaded = mlflow.artifacts.download_artifacts("models:/viggo-tiny-lora/1", dst_path=str(tmp_path / "v1"))
    assert (Path(downloaded) / "adapter_model.safetensors").is_file()
    # every adapter file's SHA-256 as registered, equal to what the artifact store returns
    recorded = json.loads(version.tags["loraflow.adapter_sha256"])
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(recorded)
    assert recorded == registry.file_digests(Path(downloaded))


def test_two_ray_workers_with_their_logs_streamed(tracking_uri, tmp_path):
    """Two Ray Train workers, evaluated as they train; --verbose true streams the workers' own log
    lines (quiet mode, the default, keeps them in Ray's log files: the mlflow run test)."""
    proc = run_train("--config", str(TINY_CONFIG), "--overrides",
                     "{ray_num_workers: 2, resources_per_worker: {CPU: 1}}", "--verbose", "true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RayTrainWorker" in proc.stderr
    run = _only_run()
    assert run.info.status == "FINISHED" and run.data.params["ray.ray_num_workers"] == "2"
    # started without `mlflow run`, nor an experiment chosen: the registered model's own experiment
    assert MlflowClient().get_experiment(run.info.experiment_id).name == "viggo-tiny-lora"
    assert "train_loss" in run.data.metrics
    assert len(MlflowClient().get_metric_history(run.info.run_id, "eval_loss")) >= 2  # tiny.yaml: every 2 steps
    [version] = registered_versions()
    assert version.run_id == run.info.run_id


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_worker_compiles_the_loss_on_a_gpu_only_and_it_computes_the_same_loss(monkeypatch, device):
    """The train job's compile callback on the tiny model under PEFT, as LLaMA-Factory hands it to
    the Trainer: on a GPU it compiles the model's loss as well (the eager one writes the logits out
    again in float32), on the CPU it leaves transformers' loss as it is; the compiled loss gives
    the eager loss and gradients. (The device is what the Trainer's arguments say; the tensors stay
    on this machine's CPU, where torch.compile runs the same way.)"""
    import types

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.loss.loss_utils import ForCausalLMLoss

    from loraflow.ray_training import regional_compile_callback

    monkeypatch.setenv("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "1")
    base = AutoModelForCausalLM.from_pretrained(ROOT / ".cache" / "models" / "tiny-smollm2")
    model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear"))
    model.train()
    ids = torch.randint(0, base.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :10] = -100  # the prompt's tokens, as LLaMA-Factory masks them

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    eager_loss, eager_grads = loss_and_grads()
    args = types.SimpleNamespace(torch_compile=True, torch_compile_backend="inductor", torch_compile_mode=None,
                                 device=torch.device(device))
    regional_compile_callback().on_train_begin(args, None, None, model=model)
    if device == "cpu":
        assert base.loss_function is ForCausalLMLoss
        return
    assert base.loss_function is not ForCausalLMLoss and base.loss_function.__wrapped__ is ForCausalLMLoss
    graphs = compat.compiled_graph_count()
    compiled_loss, compiled_grads = loss_and_grads()
    assert compat.compiled_graph_count() > graphs  # the loss (and the layers) ran compiled
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    for eager, compiled in zip(eager_grads, compiled_grads, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


def _worker_start_environment(proc: subprocess.Popen) -> dict[str, str]:
    """The environment the Ray Train worker of `proc`'s training started with (/proc/PID/environ
    holds a process's initial environment, not later changes to os.environ)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        for pid in _descendants(proc.pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    return dict(p.decode().split("=", 1) for p in pairs if b"=" in p)
        time.sleep(0.5)
    pytest.fail("no Ray Train worker started")


def _write_config(tmp_path, **changes):
    return str(config_with(TINY_CONFIG, tmp_path, **changes))


def _damage(viggo: Path, how: str) -> None:
    if how == "missing_file":
        (viggo / "train.jsonl").unlink()
    elif how == "malformed":
        lines = (viggo / "train.jsonl").read_text().splitlines()
        lines[6] = '{"instruction": "x", "input": '
        (viggo / "train.jsonl").write_text("\n".join(lines) + "\n")
    elif how == "missing_columns":
        rows = [json.loads(line) for line in (viggo / "train.jsonl").read_text().splitlines()]
        rows[9].pop("output")
        (viggo / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize(
    "changes, damage, message",
    [
        ({"lora_rnak": 8}, None, "unknown key 'lora_rnak'"),
        ({"learning_rate": "fast"}, None, "learning_rate: expected a number"),
        ({"dataset": "viggo-trian"}, None, "Unknown dataset 'viggo-trian'"),
        ({}, "missing_file", "Data file for dataset 'viggo-train' is missing"),
        ({}, "malformed", "train.jsonl:7: malformed JSON Lines row"),
        ({}, "missing_columns", "train.jsonl row 10: missing column(s) ['output']"),
        ({"model_name_or_path": "/nonexistent/model"}, None, "is not a model folder"),
        ({"resources_per_worker": {"GPU": 1}}, None, "Ray can never schedule this training"),
        ({"ray_num_workers": 3, "resources_per_worker": {"CPU": 1}}, None, "room for 2 worker(s)"),
    ],
    ids=["unknown_key", "wrong_type", "unknown_dataset", "missing_file", "malformed_row",
         "missing_columns", "missing_model", "gpu_on_cpu_cluster", "too_many_workers"],
)
def test_bad_input_is_refused_and_nothing_registered(tracking_uri, tmp_path, viggo_copy, changes, damage, message):
    _damage(viggo_copy, damage)
    proc = run_train("--config", _write_config(tmp_path, dataset_dir=str(viggo_copy), **changes))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert registered_versions() == []
    for run in _all_runs():
        assert run.info.status != "FINISHED"


def test_output_dir_of_another_run_is_refused(tracking_uri, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    (out / "loraflow_run_id").write_text("0123456789abcdef\n")
    proc = run_train("--config", str(TINY_CONFIG), "--overrides", f"{{output_dir: {out}}}")
    assert proc.returncode == 2
    assert f"output_dir {out} already holds an adapter from run 0123456789abcdef" in proc.stderr
    assert (out / "adapter_config.json").read_text() == "{}"  # untouched
    assert registered_versions() == []


def test_failure_inside_llamafactory_marks_run_failed(tracking_uri, tmp_path):
    proc = run_train("--config", _write_config(tmp_path, template="no_such_template"))
    assert proc.returncode == 1
    assert "training failed" in proc.stderr and "no_such_template" in proc.stderr
    # quiet mode points at the workers' logs
    assert "RayTrainWorker" not in proc.stderr and "verbose=true" in proc.stderr
    run = _only_run()
    assert run.info.status == "FAILED"
    assert registered_versions() == []


LONGER = "{max_samples: 96, save_steps: 4, eval_steps: 12}"  # 24 steps, a checkpoint every 4


@pytest.fixture
def start_train():
    """Starts the train script as a process; whatever a test started is stopped when it ends, so a
    failed test leaves no training behind to confuse the next one."""
    started: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        proc = subprocess.Popen([*entry_point("train"), *args], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            ray_processes = _descendants(proc.pid)
            proc.kill()
            proc.communicate(timeout=60)
            _wait_until_gone(ray_processes)


def _wait_for_step(proc: subprocess.Popen, step: int) -> str:
    """Wait until the (only) training run has logged the loss of `step`; returns its run id."""
    return _wait_for_run_step(proc, lambda run: True, step)


def _wait_for_run_step(proc: subprocess.Popen, which, step: int) -> str:
    """Wait until the training run for which which(run) holds has logged the loss of `step`."""
    client = MlflowClient()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for run in _all_runs():
            if which(run) and max((m.step for m in client.get_metric_history(run.info.run_id, "loss")),
                                  default=0) >= step:
                return run.info.run_id
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    pytest.fail(f"training never reached step {step}")


def _loss_steps(run_id: str, after_ms: int = 0, until_ms: int | None = None) -> list[int]:
    """Every logged step of the loss, in order, repeats included."""
    history = MlflowClient().get_metric_history(run_id, "loss")
    return sorted(m.step for m in history if m.timestamp > after_ms and (until_ms is None or m.timestamp <= until_ms))


def _kill_the_worker(proc: subprocess.Popen) -> None:
    """SIGKILL the Ray Train worker of the training `proc` started (its local Ray's processes are
    its descendants)."""
    ours = _descendants(proc.pid)
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    [pid] = [int(line.split()[0]) for line in ps.splitlines()
             if "ray::RayTrainWorker" in line and int(line.split()[0]) in ours]
    os.kill(pid, signal.SIGKILL)


def _descendants(pid: int) -> set[int]:
    rows = [line.split() for line in subprocess.run(["ps", "-eo", "pid,ppid"], capture_output=True,
                                                       text=True).stdout.splitlines()[1:]]
    found, grew = {pid}, True
    while grew:
        more = {int(child) for child, parent in rows if int(parent) in found}
        grew, found = not more <= found, found | more
    return found - {pid}


def _wait_until_gone(pids: set[int]) -> None:
    """Ray's local processes share the fate of the driver that started them: wait for their end."""
    deadline = time.monotonic() + 120
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        assert time.monotonic() < deadline, "Ray's processes outlived their driver by 2 minutes"
        time.sleep(1)


def _assert_continued(first: str, checkpoint_at_least: int) -> str:
    """The one registered version comes from a run that continued `first` from a checkpoint."""
    [version] = registered_versions()
    second = MlflowClient().get_run(version.run_id)
    assert second.info.status == "FINISHED" and second.data.tags["loraflow.resumed_from"] == first
    assert MlflowClient().get_run(first).data.tags["loraflow.resumed_by"] == second.info.run_id
    resumed_from = int(second.data.tags["loraflow.resumed_from_step"])
    assert resumed_from % 4 == 0 and resumed_from >= checkpoint_at_least
    assert _loss_steps(second.info.run_id) == list(range(resumed_from + 1, 25))
    return second.info.run_id


def test_a_killed_worker_resumes_and_stopped_or_dead_drivers_runs_are_resumed(tracking_uri, start_train):
    """A (ray_max_failures: 1): its Ray Train worker SIGKILLed mid-run is restarted by Ray Train
    and continues from the last committed checkpoint in the same run, every step once. A
    checkpoint is committed before the next step runs, so once step 6 is logged the checkpoint of
    step 4 is known to survive the kill. Resume is refused while A's driver lives. A's driver is
    then stopped (SIGTERM, as Ctrl-C): exit 130, A ends KILLED, nothing registered. B resumes A;
    B's driver is SIGKILLed, which leaves B RUNNING. C resumes B from its last checkpoint, ends B
    FAILED, finishes and registers; each run is linked to the one it continues, a run already
    continued is not resumed twice, and a finished one not at all. (A run that fails, as one whose
    worker dies with no restarts left does, ends FAILED: test_failure_inside_llamafactory_marks_run_failed.)"""
    proc = start_train("--config", str(TINY_CONFIG), "--overrides", LONGER[:-1] + ", ray_max_failures: 1}")
    a = _wait_for_step(proc, 6)
    alive = run_train("--resume", a)
    assert alive.returncode == 2, alive.stderr[-3000:]
    assert alive.stderr.strip().splitlines()[-1] == (
        f"error: resume={a}: that training is still running (pid {proc.pid} on this host); wait for it to end, "
        "or stop it (Ctrl-C, or kill that pid), then resume.")
    assert len(_all_runs()) == 1  # the refusal made no run
    _kill_the_worker(proc)
    killed_at_ms = int(time.time() * 1000)
    _wait_for_run_step(proc, lambda run: "loraflow.resumed_from_step" in run.data.tags, max(_loss_steps(a)) + 2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "marked KILLED" in stderr, stderr[-3000:]
    assert MlflowClient().get_run(a).info.status == "KILLED" and registered_versions() == []
    before, after = _loss_steps(a, until_ms=killed_at_ms), _loss_steps(a, after_ms=killed_at_ms)
    last = before[-1]
    assert before == list(range(1, last + 1))  # nothing logged twice before the kill
    # The worker continued from a checkpoint (every 4 steps): the last one committed before the
    # kill, which is the one at or below the last logged step (at it only if it was committed);
    # then each step after it once, until the driver was stopped.
    resumed_from = int(MlflowClient().get_run(a).data.tags["loraflow.resumed_from_step"])
    assert resumed_from % 4 == 0 and (last - 1) // 4 * 4 <= resumed_from <= last
    assert after == list(range(resumed_from + 1, resumed_from + 1 + len(after))) and after[-1] > last, after
    print(f"worker killed after step {last}, resumed from the checkpoint at step {resumed_from}")

    proc = start_train("--resume", a)
    target = min(after[-1] + 5, 22)  # of 24 steps: B does not finish
    b = _wait_for_run_step(proc, lambda run: run.data.tags.get("loraflow.resumed_from") == a, target)
    ray_processes = _descendants(proc.pid)
    proc.kill()
    proc.communicate(timeout=60)
    _wait_until_gone(ray_processes)
    assert MlflowClient().get_run(b).info.status == "RUNNING"

    done = run_train("--resume", b, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    c = _assert_continued(b, checkpoint_at_least=(target - 1) // 4 * 4)
    assert MlflowClient().get_run(b).info.status == "FAILED"  # its driver died: ended by its continuation
    assert MlflowClient().get_run(c).info.run_name.endswith("-resumed")
    assert MlflowClient().get_run(a).data.tags["loraflow.resumed_by"] == b
    assert MlflowClient().get_run(c).data.tags["loraflow.ray_run"] == MlflowClient().get_run(a).data.tags[
        "loraflow.ray_run"]  # one Ray Train run, whose checkpoints each continuation took up
    again = run_train("--resume", a)
    assert again.returncode == 2, again.stderr[-3000:]
    assert again.stderr.strip().splitlines()[-1] == (
        f"error: resume={a}: run {b} already continues that training; resume that run instead, if it did not "
        "finish.")
    finished = run_train("--resume", c)
    assert finished.returncode == 2 and "there is nothing to continue" in finished.stderr


@pytest.mark.parametrize("kind, message", [
    ("unknown", "there is no training run with that id and a logged config in"),
    ("not_loraflow", "that run was not started by loraflow's train (it has no loraflow.registered_model tag), so it "
                     "cannot be continued; start a new training instead."),
])
def test_resume_of_what_is_not_a_loraflow_training_is_refused(tracking_uri, kind, message):
    run_id = "0123456789abcdef0123456789abcdef"
    if kind == "not_loraflow":  # a failed run with a config file, made by something else
        with mlflow.start_run() as run:
            mlflow.log_text(TINY_CONFIG.read_text(), "config/train_config.yaml")
        MlflowClient().set_terminated(run.info.run_id, "FAILED")
        run_id = run.info.run_id
    proc = run_train("--resume", run_id)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"resume={run_id}: {message}" in proc.stderr
    assert "Traceback" not in proc.stderr and registered_versions() == []
