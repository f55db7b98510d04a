"""The OpenAI-compatible ingress that `serve` hands to ray.serve.llm's build_openai_app (through
`ingress_cls_config`): Ray's OpenAiIngress plus what loraflow adds in front of the engine.

- a stable model name `<model_id>:<alias>` (e.g. `:production`) that follows the registry: a watcher
  thread polls the alias, publishes a newly promoted version's adapter into the LoRA store under its
  own immutable id, warms it up, then routes the stable name to it. Requests already running keep
  the adapter they started with, so a promotion fails no request;
- each version's prompt served with it (tasks.py): a chat of one user message is the task's input,
  and the engine gets the messages that version was trained and evaluated with; any other chat
  goes as sent. /v1/models shows each version's task and prompt;
- every answer names the version that produced it: the response's `model` is
  `<model_id>:<registered model>-v<version>` and the header `x-loraflow-adapter` repeats it;
- a canary rollout (canary.py): the registry's rollout sends a share of the stable name's requests
  to a candidate (by the request's key, `x-loraflow-route-key` or the `user` field, else at random);
  each version's live figures are counted, and the rollout is judged after each poll;
- a sample of the answered requests logged as MLflow traces (traces.py), when the config asks;
- the live figures also as Ray Serve metrics, for Prometheus (serving_metrics.py);
- an API key (when configured; only its SHA-256 reaches the replicas);
- only what this server published and verified is served (Production's versions since it started,
  the canary's candidate), by the stable name or by id; each poll lists their store folders, and
  one whose files changed since is withdrawn (503 naming the files) until it is published again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

from fastapi import Request
from ray.serve.llm.ingress import OpenAiIngress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
from starlette.responses import Response

from loraflow import adapter_store, canary, compat, registry, serving_auth, serving_metrics, tasks, traces
from loraflow.errors import UserError
from loraflow.job_configs import TracesConfig

ModelCard, ModelList, OpenAIHTTPException = compat.openai_api_models()
logger = logging.getLogger("loraflow.serve")
ADAPTER_HEADER = "x-loraflow-adapter"
ROUTE_KEY_HEADER = "x-loraflow-route-key"  # requests with the same key land on the same side of a canary


class LoraflowIngress(compat.IngressHooks, OpenAiIngress):
    def __init__(self, llm_deployments, model_cards, *, lora_paths=None, registered_model: str, alias: str,
                 pinned_version: str | None, lora_store_uri: str, lora_store_settings: dict[str, str],
                 api_key_sha256: str | None,
                 base_model_id: str, poll_interval_s: float, tracking_uri: str,
                 serving_run_id: str, serving_experiment_id: str, metrics_interval_s: float, traces_settings: dict,
                 **kwargs):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths, **kwargs)
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)  # a cluster's nodes need not have MLFLOW_TRACKING_URI
        # The watcher asks again every poll interval: one quick try each time, rather than MLflow's
        # minutes of retries, so that an unreachable registry shows as such within seconds.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self._base_id = next(iter(model_cards))
        self._registered_model = registered_model
        self._alias = alias
        self._base_model_id = base_model_id  # what the engine runs; versions trained on another are refused
        self._store = adapter_store.LoraStore(lora_store_uri, lora_store_settings)
        self._key_sha256 = api_key_sha256
        # The adapters served: those this server published and verified (Production's versions since it
        # started, the canary's candidate), each with its store folder's listing then; a folder whose
        # files changed since is withdrawn until it is deleted and published again.
        self._servable: dict[str, dict[str, str]] = {}
        self._withdrawn: dict[str, str] = {}  # adapter id -> why it is not served
        self._registry = {"state": "starting", "version": None, "adapter": None, "error": None, "checked_at": None}
        self._target: str | None = None  # the adapter id the stable name routes to
        self._canary: dict | None = None  # the rollout followed (registry.rollout) and its candidate's adapter id
        self._verdict: tuple | None = None  # (rollout, verdict, figures) the registry has not taken yet
        self._tasks: dict[str, tuple[tasks.Task, tasks.Prompt]] = {}  # adapter id -> what its version was trained for
        self._live: dict[str, canary.LiveStats] = {}  # per adapter id, since this replica started
        self._judged: dict[str, canary.LiveStats] = {}  # per adapter id, since the canary's share was set
        self._serving_run, self._logged = serving_run_id, 0  # MLflow run of this server, figures logged so far
        self._tracer = traces.Tracer(TracesConfig(**traces_settings), serving_run_id, serving_experiment_id)
        self._metrics = serving_metrics.ServingMetrics(registered_model)
        self._watch_once(pinned_version, warm_up=False)  # serve nothing until the first version is known
        threading.Thread(target=self._watch, args=(pinned_version is None, poll_interval_s, metrics_interval_s),
                         daemon=True).start()

    # -- the registry watcher ------------------------------------------------------------------
    def _watch(self, follow: bool, interval: float, metrics_interval: float) -> None:
        logged_at = time.monotonic()
        while True:
            time.sleep(min(interval, metrics_interval))
            if follow:
                self._watch_once(None, warm_up=True)
            self._check_store()
            followed = self._canary
            self._metrics.canary_weight(followed["rollout"]["weight"] if followed else 0.0)
            if time.monotonic() - logged_at >= metrics_interval:
                logged_at = time.monotonic()
                self._log_live()

    def _log_live(self) -> None:
        """Each version's live figures (and the canary's weight) into this server's MLflow run, as
        metrics `live.<adapter id>.<figure>` over time."""
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"live.{adapter}.{key}", float(value), now, self._logged)
                   for adapter, stats in list(self._live.items())
                   for key, value in stats.figures().items() if value is not None]
        followed = self._canary
        metrics.append(Metric("live.canary_weight", followed["rollout"]["weight"] if followed else 0.0, now,
                              self._logged))
        try:
            MlflowClient().log_batch(self._serving_run, metrics=metrics)
            self._logged += 1
        except Exception as exc:  # noqa: BLE001 - figures are lost for this interval, serving goes on
            logger.warning("could not log the live figures to run %s: %s", self._serving_run, exc)

    def _watch_once(self, pinned_version: str | None, warm_up: bool) -> None:
        try:
            version = registry.find_version(self._registered_model, number=pinned_version, alias=self._alias)
            adapter = registry.adapter_id(version)
            registry.check_base_model(version.tags.get(registry.BASE_MODEL_ID_TAG), self._base_model_id, adapter,
                                      fix="restart serve to change the base model")
            if adapter != self._target or adapter not in self._servable:
                self._publish(version)
                if warm_up and self._target is not None and adapter != self._target:
                    self._warm_up(adapter)
                logger.info("%s:%s now routes to %s (was %s)", self._base_id, self._alias, adapter, self._target)
                self._target = adapter
            self._registry.update(state="ok", version=str(version.version), adapter=adapter, error=None)
            if pinned_version is None:
                self._follow_rollout(str(version.version), warm_up)
        except Exception as exc:  # noqa: BLE001 - keep serving the last good adapter, report why
            self._registry.update(state="error", error=str(exc)[:500])
            logger.warning("registry check failed, still serving %s: %s", self._target, exc)
        self._registry["checked_at"] = time.time()

    def _follow_rollout(self, production_version: str, warm_up: bool) -> None:
        """Route a share to the rollout's candidate (loaded and warmed up first), and judge it."""
        import mlflow

        client = mlflow.MlflowClient()
        rollout = registry.rollout(client, self._registered_model)
        if rollout is None or rollout["version"] == production_version:
            self._canary, self._verdict = None, None
            return
        if self._verdict is not None:
            if self._verdict[0] == rollout:
                self._finish(*self._verdict)  # again, the candidate serving nothing meanwhile
                return
            self._verdict = None  # the rollout changed meanwhile (a person's change): theirs stands
        followed = self._canary
        if followed is None or followed["rollout"] != rollout:
            try:
                candidate = registry.find_version(self._registered_model, number=rollout["version"], client=client)
                adapter = registry.adapter_id(candidate)
                registry.check_base_model(candidate.tags.get(registry.BASE_MODEL_ID_TAG), self._base_model_id,
                                          adapter, fix="a canary must be trained on the base model served")
                if followed is None or followed["adapter"] != adapter:
                    self._publish(candidate)
                    if warm_up:
                        self._warm_up(adapter)
            except (UserError, AdapterLoadFailed) as exc:  # it cannot serve; an unreachable store or
                # registry (any other error) is retried at the next poll, the candidate serving nothing
                self._finish(rollout, canary.Verdict("roll back", [f"it cannot be served: {exc}"[:1000]]))
                return
            self._judged = {}  # a new candidate or share: judge on what it serves from now on
            self._canary = {"rollout": rollout, "adapter": adapter}
            logger.info("%s:%s sends %.0f%% to the canary %s", self._base_id, self._alias, 100 * rollout["weight"],
                        adapter)
        figures = {side: self._stats(self._judged, name).figures()
                   for side, name in (("candidate", self._canary["adapter"]), ("production", self._target))}
        verdict = canary.verdict(canary.policy_of(rollout), rollout["weight"], figures["candidate"],
                                 figures["production"])
        if verdict.decision != "wait":
            self._finish(rollout, verdict, figures)

    def _publish(self, version) -> None:
        """Copy a version into the LoRA store (checked against its registered digests) and serve it."""
        task = tasks.of_version(version)  # before its files: a version with no prompt is not served
        adapter = self._store.publish(version)
        self._tasks[adapter] = task
        self._servable[adapter] = self._store.listing(adapter)
        self._withdrawn.pop(adapter, None)

    def _check_store(self) -> None:
        """Withdraw a served adapter whose store folder changed since it was verified: an engine that
        restarts would load the changed files (each replica reads {store}/{id} at first use)."""
        for adapter, verified in list(self._servable.items()):
            try:
                now = self._store.listing(adapter)
            except Exception as exc:  # noqa: BLE001 - the store unreachable: checked again at the next poll
                logger.warning("could not list the LoRA store's %s: %s", adapter, exc)
                return
            if now != verified:
                changed = sorted(name for name in verified.keys() | now.keys() if verified.get(name) != now.get(name))
                self._withdrawn[adapter] = (f"its files in the LoRA store changed after publishing "
                                            f"({', '.join(changed)}); delete {self._store.uri}/{adapter} so that "
                                            "it is published again from the registry")
                del self._servable[adapter]
                logger.warning("%s withdrawn: %s", adapter, self._withdrawn[adapter])

    def _finish(self, rollout: dict, verdict: canary.Verdict, figures: dict | None = None) -> None:
        """Carry out a verdict in the registry. The candidate's share goes first, so that a registry
        that cannot take the verdict now (it is retried at each poll) leaves no share with it."""
        from loraflow import promote

        if self._canary is not None and self._canary["adapter"] != self._target:  # no longer served by id either
            self._servable.pop(self._canary["adapter"], None)
        self._canary, self._judged, self._verdict = None, {}, (rollout, verdict, figures or {})
        logger.info("canary %s-v%s: %s (%s)", self._registered_model, rollout["version"], verdict.decision,
                    "; ".join(verdict.reasons))
        print(promote.finish_canary(self._registered_model, rollout, verdict, figures or {}), flush=True)
        self._verdict = None  # the next poll reads what the registry says now

    def _warm_up(self, adapter: str) -> None:
        """Load the new adapter on a replica before the stable name moves to it: a broken adapter
        fails here, and the stable name stays on the last good one."""
        model = f"{self._base_id}:{adapter}"
        body = CompletionRequest(model=model, prompt="hi", max_tokens=1)
        try:
            chunks = list(self.engine_handle(model).completions.remote(body, None))
        except Exception as exc:  # noqa: BLE001 - the engine's refusal can come as any exception
            raise AdapterLoadFailed(f"adapter {adapter} failed to load: {exc}") from exc
        errors = [chunk for chunk in chunks if type(chunk).__name__ == "ErrorResponse"]
        if errors:
            raise AdapterLoadFailed(f"adapter {adapter} failed to load: {errors[0].error.message}")

    # -- requests --------------------------------------------------------------------------------
    def _authorize(self, request: Request | None) -> None:
        authorization = request.headers.get("authorization", "") if request is not None else None
        if not serving_auth.accepted(self._key_sha256, authorization):
            raise OpenAIHTTPException(message="Missing or wrong API key: send `Authorization: Bearer <key>`.",
                                      status_code=401, type="AuthenticationError")

    def _route(self, model: str | None, split: bool = False, key: str | None = None) -> tuple[str | None, str | None]:
        """The model id to send to the engine for what the client asked for, and how it got there
        (production: the stable name; canary: the stable name, sent to the candidate; id: an
        adapter asked for by its id; None: the base model, or a model Ray's ingress will report
        as unknown). `split`: a request for the stable name may go to the canary."""
        if model is None or model == self._base_id or not model.startswith(f"{self._base_id}:"):
            return model, None
        adapter = model[len(self._base_id) + 1:]
        if adapter == self._alias:
            if self._target is None:
                raise OpenAIHTTPException(message=f"No version of {self._registered_model} has the alias "
                                          f"{self._alias!r} yet.", status_code=503, type="ServiceUnavailable")
            followed = self._canary
            if split and followed is not None and followed["adapter"] in self._servable \
                    and canary.takes_candidate(followed["rollout"]["weight"], key):
                return f"{self._base_id}:{followed['adapter']}", "canary"
            return f"{self._base_id}:{self._served(self._target)}", "production"
        if not registry.is_valid_adapter_id(adapter):
            raise OpenAIHTTPException(message=f"Invalid adapter id {adapter!r}: use a name listed by /v1/models.",
                                      status_code=400, type="InvalidModel")
        return f"{self._base_id}:{self._served(adapter)}", "id"

    def _served(self, adapter: str) -> str:
        """`adapter`, if it is served: published and verified by this server, its files unchanged since."""
        if adapter in self._withdrawn:
            raise OpenAIHTTPException(message=f"{adapter} is not served: {self._withdrawn[adapter]}.",
                                      status_code=503, type="ServiceUnavailable")
        if adapter not in self._servable:
            raise OpenAIHTTPException(message=f"Unknown adapter {adapter!r}: /v1/models lists what is served.",
                                      status_code=404, type="InvalidModel")
        return adapter

    async def dispatch(self, body, call_method: str, raw_request: Request | None):
        """Every OpenAI route's request, parsed, before the engine: authorized, then routed."""
        self._authorize(raw_request)
        key = (raw_request.headers.get(ROUTE_KEY_HEADER) if raw_request is not None else None) or body.user
        body.model, route = self._route(body.model, split=True, key=key)
        if route is not None and call_method == "chat":
            body.messages = self._prompted(body.model.partition(":")[2], body.messages)
        if raw_request is not None:
            raw_request.state.loraflow_model, raw_request.state.loraflow_route = body.model, route
        try:
            async for response in self.ray_dispatch(body, call_method, raw_request):
                yield response
        except Exception as exc:  # noqa: BLE001 - only the one known race is retried, the rest re-raised
            if not _lost_lora_load_race(exc):
                raise
            # The load that failed happened before anything was answered; the adapter is loaded now.
            async for response in self.ray_dispatch(body, call_method, raw_request):
                yield response

    def _prompted(self, adapter: str, messages: list) -> list:
        """A chat of one user message is the task's input: sent to the engine as the messages its
        version was trained and evaluated with (its prompt). Any other chat (a system message of
        the client's own, several turns) is sent as it came."""
        text = tasks.task_input(messages)
        return messages if text is None else self._tasks[adapter][1].messages(text)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        return await self._answer(super().chat(body, request), request, body, "chat")

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        return await self._answer(super().completions(body, request), request, body, "completions")

    async def _answer(self, answering, request: Request, body, endpoint: str) -> Response:
        """The engine's response, labelled with the version that produced it, counted in its live
        figures and offered to the trace sample."""
        inputs = body.model_dump(include={"model", "messages", "prompt", "max_tokens", "temperature"},
                                 exclude_none=True)  # before routing replaces the model asked for
        started, started_ns = time.monotonic(), time.time_ns()
        try:
            response = await answering
        except Exception as exc:
            self._record(request, endpoint, inputs, started, started_ns, error=exc)
            raise
        self._record(request, endpoint, inputs, started, started_ns, response=response)
        return _label(response, request)

    def _record(self, request: Request, endpoint: str, inputs: dict, started: float, started_ns: int,
                error: Exception | None = None, response: Response | None = None) -> None:
        """Count the answer; a failure here is logged, never the request's."""
        try:
            self._count(request, endpoint, inputs, started, started_ns, error, response)
        except Exception as exc:  # noqa: BLE001 - the figures miss one answer, the client gets it
            logger.warning("could not count an answer: %s", exc)

    def _count(self, request: Request, endpoint: str, inputs: dict, started: float, started_ns: int,
               error: Exception | None, response: Response | None) -> None:
        latency_s = time.monotonic() - started  # streamed answers: to the start of the stream
        route = getattr(request.state, "loraflow_route", None)
        if route is None:
            return  # the base model, a model that is not ours, or refused before routing
        adapter = request.state.loraflow_model.split(":", 1)[1]
        tokens, valid, text = 0, None, None
        body = getattr(response, "body", None)  # absent on streamed answers: counted, not scored or traced
        if body:
            answer = json.loads(body)
            tokens = (answer.get("usage") or {}).get("completion_tokens") or 0
            choice = answer["choices"][0]
            text = (choice["message"]["content"] if "message" in choice else choice.get("text")) or ""
            valid = self._tasks[adapter][0].is_valid(_given(inputs), text)
        # A canary is judged on the stable name's traffic only: a client that names the candidate
        # by its id does not choose what its judgement sees.
        judged = (self._live, self._judged) if route in ("production", "canary") else (self._live,)
        for stats in judged:
            self._stats(stats, adapter).record(latency_s, error is not None, tokens, valid)
        self._metrics.record(adapter, request.state.loraflow_route, latency_s, error is not None, tokens, valid)
        if error is not None or text is not None:
            self._tracer.offer(endpoint, inputs, text, adapter, request.state.loraflow_route, valid, started_ns,
                               time.time_ns(), error=None if error is None else _error_text(error))

    @staticmethod
    def _stats(stats: dict[str, canary.LiveStats], adapter: str | None) -> canary.LiveStats:
        return stats.setdefault(adapter, canary.LiveStats()) if adapter else canary.LiveStats()

    async def models(self, request: Request) -> ModelList:
        self._authorize(request)
        listed = await super().models()  # every folder in the store: only what is served is listed
        listed.data = [card for card in listed.data if card.id == self._base_id
                       or card.id.partition(":")[2] in self._servable]
        for card in listed.data:
            if card.id != self._base_id:
                card.metadata = {**(card.metadata or {}), "loraflow": self._task_card(card.id.partition(":")[2])}
        if self._target is not None:  # with its state, also when its adapter is withdrawn
            served = self._target in self._servable and await self.model(f"{self._base_id}:{self._target}")
            listed.data.append(self._stable_card(served or await self.model(self._base_id)))
        return listed

    async def model_data(self, model: str, request: Request) -> ModelCard:
        self._authorize(request)
        routed, _ = self._route(model)  # the id checks of completions: Ray reads {store}/{id}/adapter_config.json
        card = await super().model_data(routed)
        return card if routed == model else self._stable_card(card)

    def _task_card(self, adapter: str) -> dict[str, str]:
        """What a version's card says of its task: a chat of one user message gets this prompt."""
        task, prompt = self._tasks[adapter]
        return {"task": task.name, "prompt": prompt.uri, "instruction": prompt.instruction}

    def _stable_card(self, target: ModelCard) -> ModelCard:
        """The stable name's card: the card of the adapter it routes to, plus the registry's state."""
        stable = target.model_copy(update={"id": f"{self._base_id}:{self._alias}"})
        stable.metadata = {**stable.metadata, "loraflow": self.status()}
        return stable

    def status(self) -> dict[str, Any]:
        followed = self._canary
        rollout = followed and {"version": followed["rollout"]["version"], "serving": followed["adapter"],
                                "weight": followed["rollout"]["weight"],
                                "started_at": followed["rollout"]["started_at"]}
        return {"registered_model": self._registered_model, "alias": self._alias, "serving": self._target,
                "canary": rollout, "registry": dict(self._registry),
                "live": {adapter: stats.figures() for adapter, stats in list(self._live.items())},
                "traces_dropped": self._tracer.dropped}


def _given(inputs: dict) -> str:
    """The input an answer is to, as its task reads it: a chat's last user message, a completion's prompt."""
    users = [m.get("content") for m in inputs.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    given = users[-1] if users else inputs.get("prompt")
    return given if isinstance(given, str) else ""


def _error_text(exc: Exception) -> str:
    """What a failed request's trace says: Ray's OpenAIHTTPException keeps its text in `message`
    (its str() is empty, which made the trace look like an answer)."""
    return (getattr(exc, "message", None) or str(exc) or type(exc).__name__)[:1000]


class AdapterLoadFailed(RuntimeError):
    """An engine refused an adapter at its warm-up request."""


def _lost_lora_load_race(exc: Exception) -> bool:
    """Ray Serve LLM 2.60's `resolve_lora` checks whether an adapter is loaded, then awaits the
    load, with no lock: when the first requests for an adapter reach a replica together, each
    starts a load and vLLM refuses all but one ("has already been loaded"), failing those requests
    with a 500 although the adapter is ready (3 requests in 1,000 in the serve tests)."""
    return "has already been loaded" in str(exc)


def _label(response: Response, request: Request) -> Response:
    model = getattr(request.state, "loraflow_model", None)
    if model:
        response.headers[ADAPTER_HEADER] = model
    return response
