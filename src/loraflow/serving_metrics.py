"""Each version's live figures as Ray Serve metrics, which Ray exports in Prometheus' format on
every node's metrics port (serving config `metrics_export_port` for a local instance):
`ray_loraflow_requests_total{adapter, route}` and the errors, output tokens, scored and valid
answers beside it, the latency histogram `ray_loraflow_latency_ms`, and the gauge
`ray_loraflow_canary_weight`. The task's live validity is rate(valid) / rate(scored)."""

from __future__ import annotations

from ray.serve import metrics

_BY_VERSION = ("adapter", "route")  # the adapter id that answered; production (stable name), canary, id
_LATENCY_MS = [25, 50, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 51200]


class ServingMetrics:
    def __init__(self):
        self._requests = metrics.Counter("loraflow_requests", "Requests answered or failed, by the version asked",
                                         tag_keys=_BY_VERSION)
        self._errors = metrics.Counter("loraflow_request_errors", "Requests that failed", tag_keys=_BY_VERSION)
        self._tokens = metrics.Counter("loraflow_output_tokens", "Tokens answered", tag_keys=_BY_VERSION)
        self._scored = metrics.Counter("loraflow_scored_answers", "Answers the task's grammar was asked about "
                                       "(streamed ones are not)", tag_keys=_BY_VERSION)
        self._valid = metrics.Counter("loraflow_valid_answers", "Answers the task's grammar accepts",
                                      tag_keys=_BY_VERSION)
        self._latency = metrics.Histogram("loraflow_latency_ms", "Time to the whole answer (streamed: to the "
                                          "start of the stream)", boundaries=_LATENCY_MS, tag_keys=_BY_VERSION)
        self._weight = metrics.Gauge("loraflow_canary_weight", "The share of the stable name's requests the "
                                     "canary gets (0: no rollout)", tag_keys=("registered_model",))

    def record(self, adapter: str, route: str, latency_s: float, error: bool, tokens: int, valid: bool | None) -> None:
        tags = {"adapter": adapter, "route": route}
        self._requests.inc(1, tags)
        if error:
            self._errors.inc(1, tags)
        if tokens:
            self._tokens.inc(tokens, tags)
        if valid is not None:
            self._scored.inc(1, tags)
            if valid:
                self._valid.inc(1, tags)
        self._latency.observe(1000 * latency_s, tags)

    def canary_weight(self, registered_model: str, weight: float) -> None:
        self._weight.set(weight, {"registered_model": registered_model})
