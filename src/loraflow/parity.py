"""The parity check before live traffic: a version, served by its version id from a server started
for the purpose (the serve entry point pinned to it, with the serving config's engine and prompt
path), is asked the first rows of its evaluation again at the evaluation's sampling; its answers
must equal the evaluation's predictions. It catches what offline figures cannot: an adapter the
server does not apply, a prompt that drifted between evaluation and serving, engines that differ.

Every prompt must have as many tokens as evaluate's (the same messages); answers must be equal byte
for byte in at least `min_equal` of the rows: a single request and a batch round near-ties apart
(benchmarks/results/parity-default.json: 97-98% equal on the CPU; gpu-inference-3-h100-multi-lora.json:
91.3% on an H100)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from loraflow.envs import PROJECT_ROOT
from loraflow.job_configs import ParityCheck

START_TIMEOUT_S = 900


@dataclass
class ParityReport:
    rows: int
    equal: int
    prompt_tokens_equal: int
    min_equal: float
    differences: list[dict] = field(default_factory=list)  # the first rows that differ

    @property
    def passed(self) -> bool:
        return self.rows > 0 and self.prompt_tokens_equal == self.rows and self.equal >= self.min_equal * self.rows

    def summary(self) -> str:
        text = (f"{self.equal}/{self.rows} served answers equal the evaluation's (at least {self.min_equal:.0%} "
                f"needed), {self.prompt_tokens_equal}/{self.rows} prompts of as many tokens")
        for row in self.differences:
            text += (f"\n  row {row['index']}: evaluated {row['evaluated']!r} ({row['evaluated_tokens']} prompt "
                     f"tokens), served {row['served']!r} ({row['served_tokens']})")
        return text

    def as_record(self) -> dict:
        """For the version's delivery record (a registry tag: short)."""
        short = [{key: value[:200] if isinstance(value, str) else value for key, value in row.items()}
                 for row in self.differences[:3]]
        return {**asdict(self), "differences": short, "passed": self.passed}


def check(version, eval_run_id: str, sampling: dict, settings: ParityCheck, log: Path) -> ParityReport:
    """Serve `version` pinned, ask it the evaluation's first rows, compare. The server's output goes
    to `log`; a server that does not start raises RuntimeError with its last lines."""
    rows = _predictions(eval_run_id)[:settings.rows]
    with _server(version, settings.serve_config, log) as (client, model):
        served = []
        for row in rows:
            answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": row["input"]}],
                                                    **sampling)
            served.append((answer.choices[0].message.content, answer.usage.prompt_tokens))
    report = ParityReport(len(rows), 0, 0, settings.min_equal)
    for row, (answer, tokens) in zip(rows, served):
        same_answer, same_prompt = answer == row["generated"], tokens == row["num_input_tokens"]
        report.equal += same_answer
        report.prompt_tokens_equal += same_prompt
        if not (same_answer and same_prompt) and len(report.differences) < 5:
            report.differences.append({"index": row["index"], "evaluated": row["generated"], "served": answer,
                                       "evaluated_tokens": row["num_input_tokens"], "served_tokens": tokens})
    return report


def _predictions(eval_run_id: str) -> list[dict]:
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as folder:
        path = MlflowClient().download_artifacts(eval_run_id, "predictions.json", folder)
        table = json.loads(Path(path).read_text())
    return sorted((dict(zip(table["columns"], row)) for row in table["data"]), key=lambda row: row["index"])


class _server:
    """`serve --name NAME --version N` on a free loopback port with its own API key; stopped (its
    process group) on exit."""

    def __init__(self, version, serve_config: str, log: Path):
        self.version, self.log = version, log
        self.config = yaml.safe_load(Path(serve_config).read_text())
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.config.update(host="127.0.0.1", port=self.port, models=[version.name], metrics_export_port=None)
        self.config.setdefault("traces", {})["sample_rate"] = 0.0  # not clients' traffic

    def __enter__(self):
        import openai

        self.folder = tempfile.TemporaryDirectory(prefix="loraflow-parity-")
        config = Path(self.folder.name) / "serve.yaml"
        config.write_text(yaml.safe_dump(self.config))
        key = secrets.token_urlsafe(16)
        env = {**os.environ, self.config.get("api_key_env") or "LORAFLOW_API_KEY": key}
        env.pop("MLFLOW_RUN_ID", None)  # a serving run of its own
        self.proc = subprocess.Popen(
            [sys.executable, str(PROJECT_ROOT / "mlproject" / "run.py"), "serve", "--name", self.version.name,
             "--version", str(self.version.version), "--config", str(config)],
            cwd=PROJECT_ROOT, env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while '"serving"' not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
                raise RuntimeError(f"the parity check's server did not start (its log: {self.log}):\n{tail}")
            time.sleep(2)
        model_id = self.config["llm_config"]["model_loading_config"]["model_id"]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=2, timeout=300)
        return client, f"{model_id}:{self.version.name}-v{self.version.version}"

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:  # SIGTERM: serve shuts down as on Ctrl-C
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=180)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.folder.cleanup()
