"""The OpenAI-compatible ingress that `serve` hands to ray.serve.llm's build_openai_app (through
`ingress_cls_config`): Ray's OpenAiIngress plus what loraflow adds in front of the engine, thin:

- the route of each request comes from the route table (serving_routes.py) that the registry
  follower (serving_follower.py) rebuilds at each poll: one stable name per registered model
  followed, `<model_id>:<registered model>`, moving to a newly promoted version only once it is
  published and warmed up (requests already running keep the adapter they started with), a share
  of it to a canary's candidate by the request's key (`x-loraflow-route-key` or the `user` field,
  else at random), and versions by their adapter id;
- each version's prompt served with it (tasks.py): a chat of one user message is the task's input,
  and the engine gets the messages that version was trained and evaluated with; any other chat
  goes as sent. /v1/models shows each version's task and prompt, and each stable name's state;
- every answer names the version that produced it: the response's `model` is
  `<model_id>:<registered model>-v<version>` and the header `x-loraflow-adapter` repeats it;
- every answer is counted once (serving_accounting.py): live figures, Prometheus, the trace sample;
- an API key (when configured; only its SHA-256 reaches the replicas).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time

from fastapi import Request
from ray.serve.llm.ingress import OpenAiIngress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
from starlette.responses import Response

from loraflow import adapter_store, compat, serving_auth, tasks
from loraflow.serving_accounting import Accounting
from loraflow.serving_follower import AdapterLoadFailed, RegistryFollower
from loraflow.serving_routes import FirstUse, Route, RouteError, route

ModelCard, ModelList, OpenAIHTTPException = compat.openai_api_models()
logger = logging.getLogger("loraflow.serve")
ADAPTER_HEADER = "x-loraflow-adapter"
ROUTE_KEY_HEADER = "x-loraflow-route-key"  # requests with the same key land on the same side of a canary


class LoraflowIngress(compat.IngressHooks, OpenAiIngress):
    def __init__(self, llm_deployments, model_cards, *, lora_paths=None, models: list[str] | None, alias: str,
                 pinned_version: str | None, lora_store_uri: str, lora_store_settings: dict[str, str],
                 api_key_sha256: str | None,
                 base_model_id: str, poll_interval_s: float, tracking_uri: str,
                 serving_run_id: str, serving_experiment_id: str, metrics_interval_s: float, traces_settings: dict,
                 **kwargs):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths, **kwargs)
        import mlflow

        from loraflow import rollout

        mlflow.set_tracking_uri(tracking_uri)  # a cluster's nodes need not have MLFLOW_TRACKING_URI
        # The follower asks again every poll interval: one quick try each time, rather than MLflow's
        # minutes of retries, so that an unreachable registry shows as such within seconds.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self._base_id = next(iter(model_cards))
        self._key_sha256 = api_key_sha256
        self._accounting = Accounting(traces_settings, serving_run_id, serving_experiment_id)
        self._follower = RegistryFollower(
            base_id=self._base_id, models=models, alias=alias, pinned_version=pinned_version,
            base_model_id=base_model_id, store=adapter_store.LoraStore(lora_store_uri, lora_store_settings),
            accounting=self._accounting, warm_up=self._warm_up, finish_canary=rollout.finish_canary)
        self._follower.poll(warm_up=False)  # serve nothing until the first versions are known
        threading.Thread(target=self._follower.run, args=(pinned_version is None, poll_interval_s, metrics_interval_s),
                         daemon=True).start()

    def _warm_up(self, adapter: str) -> None:
        """Load the new adapter on a replica before a stable name moves to it: a broken adapter
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

    async def _route(self, model: str | None, split: bool = False, key: str | None = None) -> Route:
        try:
            for _ in range(3):  # a poll may put a newer version in its place meanwhile
                try:
                    return route(self._follower.table, model, key=key, split=split)
                except FirstUse as first:  # its version is published now (blocking calls: off the event loop)
                    await asyncio.to_thread(self._follower.publish_first_use, first.name)
            raise RouteError(503, f"{model}'s version changed three times while it was being published; "
                                  "try again.", "ServiceUnavailable")
        except RouteError as refused:
            raise OpenAIHTTPException(message=refused.message, status_code=refused.status, type=refused.kind) from None

    async def dispatch(self, body, call_method: str, raw_request: Request | None):
        """Every OpenAI route's request, parsed, before the engine: authorized, then routed."""
        self._authorize(raw_request)
        key = (raw_request.headers.get(ROUTE_KEY_HEADER) if raw_request is not None else None) or body.user
        routed = await self._route(body.model, split=True, key=key)
        body.model = routed.engine_model
        if routed.kind is not None and call_method == "chat":
            body.messages = self._prompted(body.model.partition(":")[2], body.messages)
        if raw_request is not None:
            raw_request.state.loraflow_model, raw_request.state.loraflow_route = body.model, routed.kind
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
        return messages if text is None else self._follower.tasks[adapter][1].messages(text)

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
            valid = self._follower.tasks[adapter][0].is_valid(_given(inputs), text)
        self._accounting.record(adapter, route, latency_s, error is not None, tokens, valid)
        if error is not None or text is not None:
            self._accounting.tracer.offer(endpoint, inputs, text, adapter, route, valid, started_ns, time.time_ns(),
                                          error=None if error is None else _error_text(error))

    async def models(self, request: Request) -> ModelList:
        """The base model, every adapter served with its task and prompt, and every stable name with
        what it serves and its registry state."""
        self._authorize(request)
        table = self._follower.table
        listed = await super().models()  # every folder in the store: only what is served is listed
        listed.data = [card for card in listed.data if card.id == self._base_id
                       or card.id.partition(":")[2] in table.servable]
        for card in listed.data:
            if card.id != self._base_id:
                card.metadata = {**(card.metadata or {}), "loraflow": self._task_card(card.id.partition(":")[2])}
        live = self._accounting.live()  # once for every stable name
        for stable, name in table.stable_names().items():
            target = table.models[name].target  # with its state, also when its adapter is withdrawn
            served = target in table.servable and await self.model(f"{self._base_id}:{target}")
            listed.data.append(self._stable_card(stable, name, served or await self.model(self._base_id), live))
        return listed

    async def model_data(self, model: str, request: Request) -> ModelCard:
        self._authorize(request)
        routed = (await self._route(model)).engine_model  # the id checks of completions: Ray reads {store}/{id}/adapter_config.json
        card = await super().model_data(routed)
        name = self._follower.table.stable_names().get(model)
        return card if name is None else self._stable_card(model, name, card)

    def _task_card(self, adapter: str) -> dict[str, str]:
        """What a version's card says of its task: a chat of one user message gets this prompt."""
        task, prompt = self._follower.tasks[adapter]
        return {"task": task.name, "prompt": prompt.uri, "instruction": prompt.instruction}

    def _stable_card(self, stable: str, name: str, target: ModelCard, live: dict | None = None) -> ModelCard:
        """A stable name's card: the card of the adapter it routes to, plus its registry state."""
        card = target.model_copy(update={"id": stable})
        card.metadata = {**(card.metadata or {}), "loraflow": self._follower.status(name, live)}
        return card


def _given(inputs: dict) -> str:
    """The input an answer is to, as its task reads it: a chat's last user message, a completion's prompt."""
    users = [m.get("content") for m in inputs.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    given = users[-1] if users else inputs.get("prompt")
    return given if isinstance(given, str) else ""


def _error_text(exc: Exception) -> str:
    """What a failed request's trace says: Ray's OpenAIHTTPException keeps its text in `message`
    (its str() is empty, which made the trace look like an answer)."""
    return (getattr(exc, "message", None) or str(exc) or type(exc).__name__)[:1000]


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
