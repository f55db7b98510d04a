"""What a request's `model` names, as a pure function of an immutable route table.

The registry follower (serving_follower.py) builds a new `RouteTable` at each poll from the
registered models the server follows and swaps it in whole; a request reads the table it finds
and never sees one half-built. Names a client can ask for:
- `<model_id>:<registered model>`: that model's stable name, routed to its version with the
  followed alias (Production's, by default), or a share of its requests to its canary;
- `<model_id>:<alias>` (e.g. `:production`): the same, while the server follows one registered model;
- `<model_id>:<registered model>-v<version>`: that version, by its adapter id, when this server
  published and verified it;
a stable name (or its version's id) whose version is not published yet raises `FirstUse`: the
caller publishes it and routes again;
- `<model_id>` or another model's id: passed to Ray's ingress as it came (the base model, or an
  unknown model that it reports).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from loraflow import canary, registry


@dataclass(frozen=True)
class Followed:
    """One registered model as the server follows it."""

    name: str  # the registered model, and its stable name's suffix
    target: str | None = None  # the adapter id its stable name routes to; None: nothing servable yet
    why_not: str | None = None  # why there is no target (a 404 says it)
    canary: tuple[str, float] | None = None  # its candidate's adapter id and share of the stable name's requests
    unpublished: bool = False  # its target waits for its first request to be published


@dataclass(frozen=True)
class RouteTable:
    base_id: str  # the engine's model id
    alias: str  # the alias every stable name follows
    models: Mapping[str, Followed] = field(default_factory=dict)  # by registered model
    servable: frozenset[str] = frozenset()  # adapter ids this server published and verified
    withdrawn: Mapping[str, str] = field(default_factory=dict)  # adapter id -> why it is not served

    def __post_init__(self) -> None:  # read-only views: a table is shared by every request
        object.__setattr__(self, "models", MappingProxyType(dict(self.models)))
        object.__setattr__(self, "withdrawn", MappingProxyType(dict(self.withdrawn)))

    def stable_names(self) -> dict[str, str]:
        """Every stable name a client can ask for, with the registered model it follows."""
        names = {f"{self.base_id}:{name}": name for name in self.models}
        if len(self.models) == 1:
            names[f"{self.base_id}:{self.alias}"] = next(iter(self.models))
        return names


@dataclass(frozen=True)
class Route:
    engine_model: str | None  # what the engine is asked for
    kind: str | None = None  # production, canary (the stable name, sent to the candidate), id; None: not ours
    registered_model: str | None = None


class RouteError(Exception):
    """A request the table cannot route: its HTTP status, message and OpenAI error type."""

    def __init__(self, status: int, message: str, kind: str):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class FirstUse(Exception):
    """A request for a followed model whose version is not published yet: publish it, then route again."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def route(table: RouteTable, model: str | None, key: str | None = None, split: bool = False) -> Route:
    """The route of a request for `model`. `split`: a request for a stable name may go to its canary
    (by `key`: the same key lands on the same side)."""
    prefix = f"{table.base_id}:"
    if model is None or not model.startswith(prefix):
        return Route(model)
    asked = model[len(prefix):]
    followed = _followed(table, asked)
    if followed is not None:
        if followed.target is None:
            raise RouteError(404 if followed.why_not else 503, followed.why_not or
                             f"No version of {followed.name} has the alias {table.alias!r} yet.",
                             "NotFound" if followed.why_not else "ServiceUnavailable")
        if followed.unpublished:
            raise FirstUse(followed.name)
        candidate = followed.canary
        if split and candidate is not None and candidate[0] in table.servable \
                and canary.takes_candidate(candidate[1], key):
            return Route(prefix + candidate[0], "canary", followed.name)
        return Route(prefix + _served(table, followed.target), "production", followed.name)
    if asked == table.alias:
        raise RouteError(404, f"{model} names no model here: this server follows {len(table.models)} registered "
                         f"models; ask for one by its stable name ({', '.join(sorted(table.stable_names()))}).",
                         "NotFound")
    if not registry.is_valid_adapter_id(asked):
        raise RouteError(400, f"Invalid adapter id {asked!r}: use a name listed by /v1/models.", "InvalidModel")
    name = registry.parse_adapter_id(asked)[0]
    if name in table.models and table.models[name].unpublished and table.models[name].target == asked:
        raise FirstUse(name)
    return Route(prefix + _served(table, asked), "id", name)


def _followed(table: RouteTable, asked: str) -> Followed | None:
    if asked in table.models:
        return table.models[asked]
    if asked == table.alias and len(table.models) == 1:
        return next(iter(table.models.values()))
    return None


def _served(table: RouteTable, adapter: str) -> str:
    """`adapter`, if it is served: published and verified by this server, its files unchanged since."""
    if adapter in table.withdrawn:
        raise RouteError(503, f"{adapter} is not served: {table.withdrawn[adapter]}.", "ServiceUnavailable")
    if adapter not in table.servable:
        raise RouteError(404, f"Unknown adapter {adapter!r}: /v1/models lists what is served.", "InvalidModel")
    return adapter


_ADAPTER_SHAPE = re.compile(r"(.+)-v\d+")


def collisions(names: list[str]) -> list[str]:
    """Why some of the registered models listed cannot each have their own stable name: listed
    twice, or named as another listed model's adapter ids (`<name>-v<n>`)."""
    return [reason for _, reason in colliding(names)]


def colliding(names: list[str]) -> list[tuple[str, str]]:
    """The names of `collisions`, each with its reason."""
    found, seen = [], set()
    for name in names:
        if name in seen:
            found.append((name, f"{name} is listed twice"))
        seen.add(name)
        shape = _ADAPTER_SHAPE.fullmatch(name)
        if shape and shape.group(1) in names:
            found.append((name, f"{name} is also the adapter id of {shape.group(1)}'s version "
                                f"{name.rpartition('-v')[2]}"))
    return found
