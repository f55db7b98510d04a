"""One path for every answer the server counts: each version's live figures (since the replica
started, and since its model's canary share was last set: what a canary is judged on), the
Prometheus metrics (serving_metrics.py) and the trace sample (traces.py)."""

from __future__ import annotations

import logging
import threading
import time

from loraflow import canary, serving_metrics, traces
from loraflow.job_configs import TracesConfig

logger = logging.getLogger("loraflow.serve")


class Accounting:
    def __init__(self, traces_settings: dict, serving_run_id: str, serving_experiment_id: str):
        self._live: dict[str, canary.LiveStats] = {}  # per adapter id, since this replica started
        self._judged: dict[str, canary.LiveStats] = {}  # per adapter id, since its model's canary share was set
        self._lock = threading.Lock()  # the dicts: requests add to them, the follower resets and reads
        self._metrics = serving_metrics.ServingMetrics()
        self.tracer = traces.Tracer(TracesConfig(**traces_settings), serving_run_id, serving_experiment_id)
        self._serving_run, self._logged = serving_run_id, 0

    def record(self, adapter: str, route: str, latency_s: float, error: bool, tokens: int, valid: bool | None) -> None:
        """One answer (or failure) of `adapter`. A canary is judged on its stable name's traffic
        only: a client that names the candidate by its id does not choose what its judgement sees."""
        with self._lock:
            counted = [self._stats(self._live, adapter)]
            if route in ("production", "canary"):
                counted.append(self._stats(self._judged, adapter))
        for stats in counted:
            stats.record(latency_s, error, tokens, valid)
        self._metrics.record(adapter, route, latency_s, error, tokens, valid)

    def judged(self, adapter: str | None) -> dict:
        with self._lock:
            stats = self._judged.get(adapter) if adapter else None
        return (stats or canary.LiveStats()).figures()

    def judge_afresh(self, *adapters: str | None) -> None:
        """A new candidate or share: its model's two sides are judged on what they serve from now on."""
        with self._lock:
            for adapter in adapters:
                self._judged.pop(adapter, None)

    def live(self) -> dict[str, dict]:
        with self._lock:
            stats = dict(self._live)
        return {adapter: s.figures() for adapter, s in stats.items()}

    def canary_weight(self, registered_model: str, weight: float) -> None:
        self._metrics.canary_weight(registered_model, weight)

    def log_live(self, weights: dict[str, float]) -> None:
        """Each version's live figures and each followed model's canary weight into this server's
        MLflow run, as metrics `live.<adapter id>.<figure>` and `live.<model>.canary_weight` over time."""
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"live.{adapter}.{key}", float(value), now, self._logged)
                   for adapter, figures in self.live().items() for key, value in figures.items() if value is not None]
        metrics += [Metric(f"live.{model}.canary_weight", weight, now, self._logged) for model, weight in weights.items()]
        try:
            MlflowClient().log_batch(self._serving_run, metrics=metrics)
            self._logged += 1
        except Exception as exc:  # noqa: BLE001 - figures are lost for this interval, serving goes on
            logger.warning("could not log the live figures to run %s: %s", self._serving_run, exc)

    @staticmethod
    def _stats(stats: dict[str, canary.LiveStats], adapter: str) -> canary.LiveStats:
        return stats.setdefault(adapter, canary.LiveStats())
