"""The registry follower: the registered models a server follows, turned into route tables.

At each poll, for every followed model (those the serving config lists, or every registered model
whose versions were trained on the served base model): its version with the followed alias is
found; a model not served yet has it published into the LoRA store under its own immutable id at
its first request (so that a server following hundreds of models starts at once and publishes only
what is asked for); a model in use has it published, loaded and warmed up on a replica, then its
stable name moves to it; its canary rollout is followed and judged on the live figures
(serving_accounting.py); store folders that changed since they were verified are withdrawn. Then
a new immutable `RouteTable` (serving_routes.py) replaces the last one whole. A model that fails
(an adapter that cannot load, a version trained on another base model) keeps serving its last
good version; the others go on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loraflow import adapter_store, canary, registry, tasks
from loraflow.errors import UserError
from loraflow.serving_accounting import Accounting
from loraflow.serving_routes import Followed, RouteTable, colliding

logger = logging.getLogger("loraflow.serve")


class AdapterLoadFailed(RuntimeError):
    """An engine refused an adapter at its warm-up request."""


@dataclass
class _Model:
    """What the follower knows of one registered model."""

    target: str | None = None  # the adapter id its stable name routes to
    unpublished: Any = None  # the target's version while it waits for its first request to be published
    why_not: str | None = None  # why nothing is served under its name
    canary: dict | None = None  # the rollout followed (registry.rollout) and its candidate's adapter id
    verdict: tuple | None = None  # (rollout, verdict, figures) the registry has not taken yet
    registry: dict[str, Any] = field(default_factory=lambda: {"state": "starting", "version": None, "adapter": None,
                                                              "error": None, "checked_at": None})


class RegistryFollower:
    def __init__(self, *, base_id: str, models: list[str] | None, alias: str, pinned_version: str | None,
                 base_model_id: str, store: adapter_store.LoraStore, accounting: Accounting,
                 warm_up: Callable[[str], None], finish_canary: Callable[[str, dict, canary.Verdict, dict], str]):
        self.table = RouteTable(base_id, alias)
        self._listed = models  # None: every registered model trained on the served base model
        self._alias, self._pinned = alias, pinned_version
        self._base_model_id = base_model_id  # what the engine runs; versions trained on another are refused
        self._store, self._accounting = store, accounting
        self._warm_up, self._finish_canary = warm_up, finish_canary
        self._models: dict[str, _Model] = {}
        # The adapters served: those this server published and verified, each with its store
        # folder's listing then; a folder whose files changed since is withdrawn until it is
        # deleted and published again.
        self._servable: dict[str, dict[str, str]] = {}
        self._withdrawn: dict[str, str] = {}
        self.tasks: dict[str, tuple[tasks.Task, tasks.Prompt]] = {}  # adapter id -> its version's task and prompt
        self._lock = threading.Lock()  # the poll's thread and first requests' publications

    # -- the poll ----------------------------------------------------------------------------------
    def run(self, follow: bool, interval: float, metrics_interval: float) -> None:
        """The follower's thread: poll, check the store, log the live figures, for ever."""
        logged_at = time.monotonic()
        while True:
            time.sleep(min(interval, metrics_interval))
            self.poll(warm_up=True, follow=follow)
            weights = self.canary_weights()
            for name, weight in weights.items():
                self._accounting.canary_weight(name, weight)
            if time.monotonic() - logged_at >= metrics_interval:
                logged_at = time.monotonic()
                self._accounting.log_live(weights)

    def poll(self, warm_up: bool, follow: bool = True) -> None:
        with self._lock:
            if follow:
                for name in self._followed_names():
                    self._follow(name, warm_up)
            self._check_store()
            self._rebuild()

    def publish_first_use(self, name: str) -> None:
        """Publish the version `name`'s stable name routes to, at its first request (any failure
        is the model's: the route then says why)."""
        with self._lock:
            model = self._models.get(name)
            if model is None or model.unpublished is None:
                return  # published meanwhile, or no longer followed
            version, model.unpublished = model.unpublished, None
            try:
                self._publish(version)
            except Exception as exc:  # noqa: BLE001 - it cannot serve: 404 with why, retried at the next poll
                model.target, model.why_not = None, f"{registry.adapter_id(version)} cannot be served: {exc}"[:500]
                model.registry.update(state="error", error=str(exc)[:500])
                logger.warning("%s: %s", name, model.why_not)
            self._rebuild()

    def _followed_names(self) -> list[str]:
        if self._listed is not None:
            return self._listed
        from mlflow import MlflowClient

        try:
            names = sorted(m.name for m in MlflowClient().search_registered_models() if not m.name.endswith(".lock"))
        except Exception as exc:  # noqa: BLE001 - the registry unreachable: every model keeps what it serves
            logger.warning("could not list the registered models: %s", exc)
            return list(self._models)
        for gone in set(self._models) - set(names):  # deleted: nothing is served under its name any more
            del self._models[gone]
        clashing = {name for name, _ in colliding(names)}
        return [name for name in names if name not in clashing]

    def _follow(self, name: str, warm_up: bool) -> None:
        model = self._models.setdefault(name, _Model())
        try:
            try:
                version = registry.find_version(name, number=self._pinned, alias=self._alias)
            except UserError as missing:  # deleted, or no version with the alias: 404 with why
                model.target, model.unpublished, model.canary, model.why_not = None, None, None, str(missing)
                model.registry.update(state="ok", version=None, adapter=None, error=None)
                return
            adapter = registry.adapter_id(version)
            if self._listed is None and version.tags.get(registry.BASE_MODEL_ID_TAG) != self._base_model_id \
                    and model.target is None:
                del self._models[name]  # `models: all` follows the models of the served base model only
                return
            registry.check_base_model(version.tags.get(registry.BASE_MODEL_ID_TAG), self._base_model_id, adapter,
                                      fix="serve it on a server of its own base model")
            in_use = model.target in self._servable
            if not in_use and adapter != model.target:  # published at its first request
                model.target, model.unpublished, model.why_not = adapter, version, None
            elif adapter != model.target or (adapter not in self._servable and model.unpublished is None):
                self._publish(version)
                if warm_up and in_use and adapter != model.target:
                    self._warm_up(adapter)
                logger.info("%s:%s now routes to %s (was %s)", self.table.base_id, name, adapter, model.target)
                model.target, model.unpublished, model.why_not = adapter, None, None
            model.registry.update(state="ok", version=str(version.version), adapter=adapter, error=None)
            if self._pinned is None:
                self._follow_rollout(name, model, str(version.version), warm_up)
        except Exception as exc:  # noqa: BLE001 - keep serving the last good adapter, report why
            model.registry.update(state="error", error=str(exc)[:500])
            if model.target is None:
                model.why_not = str(exc)[:500]
            logger.warning("registry check of %s failed, still serving %s: %s", name, model.target, exc)
        finally:
            if name in self._models:
                model.registry["checked_at"] = time.time()

    def _follow_rollout(self, name: str, model: _Model, production_version: str, warm_up: bool) -> None:
        """Route a share to the rollout's candidate (loaded and warmed up first), and judge it."""
        import mlflow

        client = mlflow.MlflowClient()
        rollout = registry.rollout(client, name)
        if rollout is None or rollout["version"] == production_version:
            model.canary, model.verdict = None, None
            return
        if model.verdict is not None:
            if model.verdict[0] == rollout:
                self._finish(name, model, *model.verdict)  # again, the candidate serving nothing meanwhile
                return
            model.verdict = None  # the rollout changed meanwhile (a person's change): theirs stands
        followed = model.canary
        if followed is None or followed["rollout"] != rollout:
            try:
                candidate = registry.find_version(name, number=rollout["version"], client=client)
                adapter = registry.adapter_id(candidate)
                registry.check_base_model(candidate.tags.get(registry.BASE_MODEL_ID_TAG), self._base_model_id,
                                          adapter, fix="a canary must be trained on the base model served")
                if followed is None or followed["adapter"] != adapter:
                    self._publish(candidate)
                    if warm_up:
                        self._warm_up(adapter)
            except (UserError, AdapterLoadFailed) as exc:  # it cannot serve; an unreachable store or
                # registry (any other error) is retried at the next poll, the candidate serving nothing
                self._finish(name, model, rollout, canary.Verdict("roll back", [f"it cannot be served: {exc}"[:1000]]))
                return
            self._accounting.judge_afresh(adapter, model.target)  # judged on what they serve from now on
            model.canary = {"rollout": rollout, "adapter": adapter}
            logger.info("%s:%s sends %.0f%% to the canary %s", self.table.base_id, name, 100 * rollout["weight"],
                        adapter)
        figures = {"candidate": self._accounting.judged(model.canary["adapter"]),
                   "production": self._accounting.judged(model.target)}
        verdict = canary.verdict(canary.policy_of(rollout), rollout["weight"], figures["candidate"],
                                 figures["production"])
        if verdict.decision != "wait":
            self._finish(name, model, rollout, verdict, figures)

    def _finish(self, name: str, model: _Model, rollout: dict, verdict: canary.Verdict,
                figures: dict | None = None) -> None:
        """Carry out a verdict in the registry. The candidate's share goes first, so that a registry
        that cannot take it now (the next poll judges again) leaves no share with it."""
        if model.canary is not None and model.canary["adapter"] != model.target:  # no longer served by id either
            self._servable.pop(model.canary["adapter"], None)
        model.canary, model.verdict = None, (rollout, verdict, figures or {})
        self._rebuild()
        logger.info("canary %s-v%s: %s (%s)", name, rollout["version"], verdict.decision, "; ".join(verdict.reasons))
        print(self._finish_canary(name, rollout, verdict, figures or {}), flush=True)
        model.verdict = None  # the next poll reads what the registry says now

    def _publish(self, version) -> None:
        """Copy a version into the LoRA store (checked against its registered digests) and serve it."""
        task = tasks.of_version(version)  # before its files: a version with no prompt is not served
        adapter = self._store.publish(version)
        self.tasks[adapter] = task
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

    def _rebuild(self) -> None:
        """The route table of what is known now, swapped in whole."""
        self.table = RouteTable(self.table.base_id, self._alias, {
            name: Followed(name, model.target, model.why_not,
                           (model.canary["adapter"], model.canary["rollout"]["weight"]) if model.canary else None,
                           model.unpublished is not None)
            for name, model in self._models.items()
        }, frozenset(self._servable), dict(self._withdrawn))

    # -- what the server shows -----------------------------------------------------------------------
    def canary_weights(self) -> dict[str, float]:
        return {name: model.canary["rollout"]["weight"] if model.canary else 0.0
                for name, model in list(self._models.items())}

    def status(self, name: str, live: dict[str, dict] | None = None) -> dict[str, Any]:
        """What `name`'s stable name routes to, as the route table requests read says (a poll
        under way changes it only when it swaps the table in), and its registry state. `live`: the
        accounting's live figures, when a caller reads several models' status at once."""
        routed = self.table.models.get(name) or Followed(name)  # not followed (any more): nothing served
        model = self._models.get(name) or _Model()
        followed = model.canary if routed.canary is not None else None
        rollout = followed and {"version": followed["rollout"]["version"], "serving": followed["adapter"],
                                "weight": followed["rollout"]["weight"],
                                "started_at": followed["rollout"]["started_at"]}
        live = self._accounting.live() if live is None else live
        return {"registered_model": name, "alias": self._alias, "serving": routed.target, "why_not": routed.why_not,
                "canary": rollout, "registry": dict(model.registry),
                "live": {adapter: figures for adapter, figures in live.items()
                         if registry.parse_adapter_id(adapter)[0] == name},
                "traces_dropped": self._accounting.tracer.dropped}
