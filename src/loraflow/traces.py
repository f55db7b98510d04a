"""Served requests as MLflow traces, and logged traces as the next dataset.

- A server logs a sample of the requests it answers (serving config `traces`: `sample_rate`,
  default 0, and `redact`: regular expressions whose matches are replaced by [REDACTED] in what is
  logged) as MLflow 3 traces in its serving run, tagged with the version that answered, how the
  request reached it and whether the task's grammar accepts the answer (registry.TRACE_*_TAG).
  One background thread logs them, one at a time (serve turns MLflow's own concurrent export off
  in the ingress): a request never waits on the tracking server, the tracking server never gets
  more than one trace at once from a server, and when the queue is full a trace is dropped
  rather than a request slowed. Every string is cut to TRACED_CHARS before any pattern runs, and
  the queue is bounded by characters as well as by count, so that one huge request costs the
  server no more than a normal one (a regular expression holds the GIL, the request path's too).
- `mlflow run . -e export_traces` writes a registered model's logged chat traces to a folder in
  LLaMA-Factory's layout (dataset_info.json and a JSON Lines file in alpaca columns: the
  instruction of the version that answered, the client's input, the answer), which `train` takes
  as its dataset_dir. Only traces whose source run is a server's
  (tagged loraflow.job=serve) are read: a trace anyone logs elsewhere is no training row.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import queue
import random
import re
import shutil
import tempfile
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from loraflow import registry, tasks, tracking
from loraflow.errors import UserError
from loraflow.job_configs import TracesConfig

logger = logging.getLogger("loraflow.serve")
REDACTED = "[REDACTED]"
_QUEUE_SIZE = 1000  # traces waiting to be logged; beyond it they are dropped
_QUEUE_CHARS = 16 * 2**20  # ... and the characters they hold
TRACED_CHARS = 8192  # of each string; the rest is cut before any pattern runs
_ALPACA = {"prompt": "instruction", "query": "input", "response": "output"}


class Tracer:
    """Logs a sample of a server's answered requests as traces of its MLflow run."""

    def __init__(self, settings: TracesConfig, run_id: str, experiment_id: str):
        self._settings, self._run, self._experiment = settings, run_id, experiment_id
        self._redact = [re.compile(pattern) for pattern in settings.redact]
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUE_SIZE)
        self._lock = threading.Lock()  # offer and the logging thread both change what is queued
        self._queued_chars = 0
        self.dropped = 0
        if settings.sample_rate > 0:
            threading.Thread(target=self._log_queued, daemon=True).start()

    def offer(self, endpoint: str, request: dict, answer: str | None, adapter: str, route: str, valid: bool | None,
              started_ns: int, ended_ns: int, error: str | None = None) -> None:
        """Queue this answered (or failed) request for logging, if the sample takes it."""
        if random.random() >= self._settings.sample_rate:
            return
        request, answer, error = (_each_string(part, _cut) for part in (request, answer, error))  # O(cap) a string
        chars = _chars((request, answer, error))
        with self._lock:
            if self._queued_chars + chars > _QUEUE_CHARS:
                self.dropped += 1
                return
            try:
                self._queue.put_nowait((endpoint, request, answer, adapter, route, valid, started_ns, ended_ns, error,
                                        chars))
            except queue.Full:
                self.dropped += 1
                return
            self._queued_chars += chars

    def _log_queued(self) -> None:
        from mlflow import MlflowClient

        client = MlflowClient()
        while True:
            endpoint, request, answer, adapter, route, valid, started_ns, ended_ns, error, chars = self._queue.get()
            name, number = registry.parse_adapter_id(adapter)  # the adapter's own model: a store may hold others'
            tags = {registry.TRACE_MODEL_TAG: name, registry.TRACE_VERSION_TAG: number,
                    registry.TRACE_ADAPTER_TAG: adapter, registry.TRACE_ROUTE_TAG: route,
                    registry.TRACE_VALID_TAG: "error" if error else str(bool(valid)).lower()}
            span = None
            try:
                span = client.start_trace(endpoint, span_type="LLM", inputs=self._scrub(request), tags=tags,
                                          experiment_id=self._experiment, start_time_ns=started_ns, run_id=self._run)
                client.end_trace(span.trace_id, outputs=None if error else {"text": self._scrub(answer)},
                                 attributes={"error": self._scrub(error)} if error else None,
                                 status="ERROR" if error else "OK", end_time_ns=ended_ns)
            except Exception as exc:  # noqa: BLE001 - a trace is lost, serving goes on
                logger.warning("could not log a trace to run %s: %s", self._run, exc)
                if span is not None:  # not left IN_PROGRESS
                    with contextlib.suppress(Exception):
                        client.end_trace(span.trace_id, status="ERROR")
            finally:
                with self._lock:
                    self._queued_chars -= chars
                self._queue.task_done()

    def flush(self) -> None:
        """Wait until every queued trace is written to the tracking store."""
        import mlflow

        self._queue.join()
        mlflow.flush_trace_async_logging()

    def _scrub(self, value: Any) -> Any:
        return _each_string(value, self._redacted)

    def _redacted(self, text: str) -> str:
        for pattern in self._redact:
            text = pattern.sub(REDACTED, text)
        return text


def _each_string(value: Any, change) -> Any:
    """value (a request: dicts and lists of strings, numbers...) with change applied to each string."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, dict):
        return {key: _each_string(item, change) for key, item in value.items()}
    if isinstance(value, list):
        return [_each_string(item, change) for item in value]
    return value


def _chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(map(_chars, value.values()))
    if isinstance(value, (list, tuple)):
        return sum(map(_chars, value))
    return 0


def _cut(text: str) -> str:
    """text's first TRACED_CHARS characters, less the word the cut falls in (a cut e-mail address
    would no longer match its pattern), and how many characters were cut."""
    if len(text) <= TRACED_CHARS:
        return text
    head = text[:TRACED_CHARS]
    if not text[TRACED_CHARS].isspace():
        space = re.search(r"\s", head[::-1])  # the last whitespace; none: the whole head is one word
        head = head[:len(head) - space.start()] if space else ""
    return f"{head}[... {len(text) - len(head):,} characters cut]"


# -- export -------------------------------------------------------------------------------------
def export(name: str, out: str, version: str | None = None, since: str | None = None, valid_only: bool = False,
           dataset: str = "served") -> dict[str, Any]:
    """Write the registered model's logged chat traces to `out` in LLaMA-Factory's layout; returns
    what was written. Nothing is written when no trace matches."""
    from mlflow import MlflowClient

    target = Path(out).expanduser().resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{target} already exists and is not an empty folder: choose another out, or remove it.")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", dataset):
        raise UserError(f"dataset {dataset!r} must be a plain name such as served (letters, digits, _ . -).")
    if "'" in name:
        raise UserError(f"Registered model names with a quote cannot be searched for in traces: {name!r}.")
    client = MlflowClient()
    registry.registered_model(client, name)
    if version is not None:
        registry.find_version(name, number=version, client=client)  # a version that does not exist is named
    conditions = [f"tags.`{registry.TRACE_MODEL_TAG}` = '{name}'", "status = 'OK'"]
    if version is not None:
        conditions.append(f"tags.`{registry.TRACE_VERSION_TAG}` = '{int(version)}'")
    if valid_only:
        conditions.append(f"tags.`{registry.TRACE_VALID_TAG}` = 'true'")
    if since:
        conditions.append(f"timestamp_ms >= {_epoch_ms(since)}")
    rows, skipped, versions = [], 0, set()

    @functools.cache
    def instruction_of(number: str) -> str:
        return tasks.of_version(registry.find_version(name, number=number, client=client))[1].instruction

    for trace in _search(client, " AND ".join(conditions), _serving_runs()):
        row = _alpaca_row(trace, instruction_of)
        if row is None:
            skipped += 1
        else:
            rows.append(row)
            versions.add(int(trace.info.tags[registry.TRACE_VERSION_TAG]))
    if not rows:
        raise UserError(f"No logged chat traces of {name} from a server's run (tagged {registry.JOB_TAG}=serve) "
                        f"match ({' AND '.join(conditions)}; {skipped} others). "
                        "A server logs traces when its serving config sets traces.sample_rate above 0.")
    rows.sort(key=lambda row: row.pop("_at"))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with open(staging / f"{dataset}.jsonl", "w", encoding="utf-8") as written:
            written.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        info = {dataset: {"file_name": f"{dataset}.jsonl", "formatting": "alpaca", "columns": _ALPACA}}
        (staging / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")
        if target.exists():
            target.rmdir()
        staging.rename(target)  # a complete dataset, or none
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    written = {"dataset_dir": str(target), "dataset": dataset, "rows": len(rows), "skipped": skipped,
               "filter": " AND ".join(conditions), "versions": sorted(versions),
               "sha256": hashlib.sha256((target / f"{dataset}.jsonl").read_bytes()).hexdigest()}
    written["run_id"] = _record_export(name, written)
    return written


def _record_export(name: str, written: dict[str, Any]) -> str:
    """The export as a run (the one `mlflow run` made, or its own in the model's experiment), tagged
    so that lineage finds it from the versions that answered and from a train run that used it."""
    import mlflow

    with mlflow.start_run(run_name=f"export-traces-{name}",
                          experiment_id=None if tracking.experiment_chosen() else tracking.experiment_named(name)) as run:
        mlflow.set_tags({registry.JOB_TAG: "export_traces", registry.EXPORTED_MODEL_TAG: name,
                         registry.EXPORTED_VERSIONS_TAG: json.dumps(written["versions"]),
                         registry.EXPORTED_SHA256_TAG: written["sha256"]})
        mlflow.log_params({"out": written["dataset_dir"], "dataset": written["dataset"], "filter": written["filter"]})
        mlflow.log_metrics({"rows": written["rows"], "skipped": written["skipped"]})
    return run.info.run_id


def _serving_runs() -> dict[str, str]:
    """The servers' runs (tagged loraflow.job=serve) in every experiment: run id -> experiment id.
    Anyone who can log to the store can log a trace with loraflow's tags; only a server's are rows."""
    import mlflow

    runs = mlflow.search_runs(filter_string=f"tags.`{registry.JOB_TAG}` = 'serve'", search_all_experiments=True,
                              output_format="list")
    return {run.info.run_id: run.info.experiment_id for run in runs}


def _search(client, filter_string: str, runs: dict[str, str]):
    """The traces that match filter_string and were logged in one of runs."""
    from mlflow.tracing.constant import TraceMetadataKey

    experiments = sorted(set(runs.values()))
    token = None
    while experiments:
        page = client.search_traces(locations=experiments, filter_string=filter_string, max_results=500,
                                    page_token=token)
        yield from (trace for trace in page if trace.info.trace_metadata.get(TraceMetadataKey.SOURCE_RUN) in runs)
        token = page.token
        if not token:
            return


def _alpaca_row(trace, instruction_of) -> dict | None:
    """A chat of one user message (the task's input: the server asked the engine with its version's
    prompt) and its answer, in the training data's alpaca columns, with the instruction of the
    version that answered. None for what is not one (completions, a chat with a system message or
    several turns, which the server sent as it came, a tool call)."""
    span = trace.data.spans[0] if trace.data.spans else None
    messages = (span.inputs or {}).get("messages") if span else None
    answer = (span.outputs or {}).get("text") if span else None
    text = tasks.task_input(messages)
    if text is None or not isinstance(answer, str) or not answer:
        return None
    return {"instruction": instruction_of(trace.info.tags[registry.TRACE_VERSION_TAG]), "input": text,
            "output": answer, "_at": trace.info.request_time}


def _epoch_ms(since: str) -> int:
    try:
        moment = datetime.fromisoformat(since)
    except ValueError:
        raise UserError(f"since {since!r} is not a time such as 2026-12-01 or 2026-12-01T09:30:00+00:00.") from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # the local time zone, as a person typing it means
    return int(moment.timestamp() * 1000)


def export_job(name: str, out: str, version: str, since: str, valid_only: bool, dataset: str) -> None:
    """The export_traces entry point (entry_points.py)."""
    tracking.configure()
    written = export(name, out, version or None, since or None, valid_only, dataset)
    print(json.dumps(written), flush=True)
