"""The `promote` and `rollback` entry points: move an adapter version through the registry stages
(Staging, Production, Archived), behind evaluation gates, with an audit trail on the version.

MLflow 3 deprecates stages in favour of aliases. Both are kept in step: a version in Staging or
Production also carries the alias `staging` or `production`, so `models:/NAME/Production` and
`models:/NAME@production` name the same version. Every change holds the registry lock
(registry_lock.py), so concurrent promotions end with exactly one Production version.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from loraflow import canary, promotion_gates, registry, registry_lock, tracking
from loraflow.errors import UserError
from loraflow.job_configs import Gate

HISTORY_LENGTH = 100  # of the Production history kept (registry.PRODUCTION_HISTORY_TAG), for rollback


def promote_job(version: str, stage: str, weight: str, name: str, reason: str, force: bool, config: str) -> None:
    """The promote entry point (entry_points.py): a gate's refusal exits 2, with the comparison."""
    tracking.configure()
    if stage.strip().lower() == CANARY:
        result = start_canary(name, version, _parse_weight(weight), reason, force, config)
        stage = "Canary"
    else:
        if weight:
            raise UserError("weight is for stage=Canary only.")
        try:
            stage = registry.stage_named(stage)
        except UserError as exc:
            raise UserError(f"{exc} Or Canary, for a live rollout.") from None
        result = promote(name, version, stage, reason, force, config)
    launch_run = f"promote-{name}-v{int(version)}-{stage}"
    tracking.name_launch_run(launch_run + ("-refused" if result.refused else ""), "promote")
    if result.refused:
        raise UserError(result.message)
    print(result.message)


def rollback_job(name: str, reason: str) -> None:
    """The rollback entry point (entry_points.py)."""
    tracking.configure()
    target, message = rollback(name, reason)
    tracking.name_launch_run(f"rollback-{name}-to-v{target}", "rollback")
    print(message)


def _parse_weight(text: str) -> float | None:
    if not text.strip():
        return None
    try:
        weight = float(text)
    except ValueError:
        weight = -1.0
    if weight != 0 and not canary.check_weight(weight):
        raise UserError(f"weight must be a share between 0 and 1 (0 stops the rollout), not {text!r}.")
    return weight


@contextlib.contextmanager
def _stage_api():
    """Stages are deprecated in MLflow 3 (FutureWarning on every call); the docs explain that
    loraflow keeps aliases in step, so the warning is not repeated to users."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


@dataclass
class Promotion:
    """What `promote` did: `refused` when the gate said no (nothing changed); `gate` is passed,
    overridden (forced), none (no gate for the stage) or refused."""

    refused: bool
    gate: str
    report: promotion_gates.GateReport | None
    message: str


def promote(name: str, version: str, stage: str, reason: str, force: bool, config: str) -> Promotion:
    """Move a version to `stage` behind its gate. A refused gate is a result; bad input (a missing
    gate file, an unknown version, a lock held too long) raises UserError."""
    stage = registry.stage_named(stage)
    gates = promotion_gates.load(config).stages
    _check_force(force, reason)
    client = MlflowClient()
    registry.find_version(name, number=version, client=client)  # fail before taking the lock
    with _changing(client, name):
        return _move(client, name, version, stage, reason, force, gates)


@contextlib.contextmanager
def _changing(client: MlflowClient, name: str):
    """The registry lock, with a change that an earlier holder left half done completed first."""
    with registry_lock.locked(client, name):
        text = client.get_registered_model(name).tags.get(registry.PENDING_TAG)
        if text:
            change = json.loads(text)
            print(f"warning: {name}: completing a change left half done by {change['by']} at {change['at']} "
                  f"({change['summary']})", flush=True)
            _apply(client, name, change)
        yield


def _gate(gates: dict[str, Gate], stage: str, candidate: ModelVersion, production: ModelVersion | None,
          force: bool) -> tuple[promotion_gates.GateReport | None, str]:
    """The stage's gate checked: (report, none / passed / overridden / refused)."""
    if stage not in gates:
        return None, "none"
    report = promotion_gates.check(gates[stage], stage, candidate, production)
    return report, "passed" if report.passed else "overridden" if force else "refused"


def _check_force(force: bool, reason: str) -> None:
    if force and not reason.strip():
        raise UserError("force=true skips the promotion gate; give a reason (-P reason=...) to record.")


def _move(client: MlflowClient, name: str, version: str, stage: str, reason: str, force: bool,
          gates: dict[str, Gate], live: dict | None = None) -> Promotion:
    """promote's work, under the registry lock; `live` is a canary's figures, for the audit."""
    candidate = registry.find_version(name, number=version, client=client)
    production = _production(client, name)
    if candidate.current_stage == stage:
        _sync_alias(client, candidate, stage)
        return Promotion(False, "none", None, f"{name} v{candidate.version} is already in {stage}; nothing to do.")
    if stage != "Archived":
        registry.check_adapter_present(candidate)
    report, gate = _gate(gates, stage, candidate, production, force)
    if gate == "refused":
        return Promotion(True, gate, report, _refusal(name, candidate, report))
    history = _history(client, name)
    if stage == "Production":
        history.append(int(candidate.version))
    elif production is not None and production.version == candidate.version:
        history = [v for v in history if v != int(candidate.version)]  # Production is now empty
    change = _change(f"v{candidate.version} -> {stage}")
    change["move"] = _move_of(candidate, stage, reason, gate, production, history, live, change["at"])
    lines = [f"{name} v{candidate.version}: {candidate.current_stage} -> {stage} (gate: {gate})"]
    if stage == "Production" and production is not None:
        change["move"]["previous_note"] = f"archived: v{candidate.version} was promoted to Production"
        lines.append(f"{name} v{production.version}: Production -> Archived")
    rollout = registry.rollout(client, name)
    if rollout is not None:
        ours = rollout["version"] == str(candidate.version)
        changes_production = stage == "Production" or (production is not None and production.version ==
                                                        candidate.version)
        if ours and stage in ("Production", "Archived"):
            result, why = ("promoted" if stage == "Production" else "stopped"), reason or f"moved to {stage}"
        elif changes_production:  # a person's change of Production wins over the rollout judged against it
            result, why = "stopped", f"Production changed: v{candidate.version} moved to {stage}"
        else:
            result = None
        if result is not None:
            change["end_rollout"] = _end_of(rollout, result, why, live)
            lines.append(f"{name} v{rollout['version']}: canary {result} ({why})")
    _apply(client, name, change)
    if report is not None and report.checks:
        lines.append(report.table())
    return Promotion(False, gate, report, "\n".join(lines))


# -- changes of several writes -------------------------------------------------------------------
# A registry change writes a stage, aliases, tags and descriptions one call at a time, and MLflow has
# no transactions. So a change is recorded first as a whole (registry.PENDING_TAG on the registered
# model), then carried out step by step, each step safe to repeat; the tag goes when all are done. A
# process that dies part-way leaves the record, and the next locked operation on the model carries
# it out again before its own (`_changing`).

def _change(summary: str) -> dict:
    return {"summary": summary, "by": registry_lock.holder(), "at": _now(), "move": None, "end_rollout": None}


def _move_of(version: ModelVersion, stage: str, reason: str, gate: str, previous: ModelVersion | None,
             history: list[int], live: dict | None, at: str) -> dict:
    """A version's move to `stage`: its audit tags (latest move) and description line (all moves)."""
    who = registry_lock.holder()
    tags = {"stage": stage, "by": who, "at": at, "reason": reason, "gate": gate,
            "metrics": json.dumps(registry.eval_metrics(version), sort_keys=True),
            "previous_production": f"v{previous.version}" if previous is not None else "",
            "live": json.dumps(live or {}, sort_keys=True)}
    return {"version": str(version.version), "stage": stage, "history": history[-HISTORY_LENGTH:],
            "previous": str(previous.version) if previous is not None else None, "previous_note": None,
            "tags": {registry.PROMOTION_TAG_PREFIX + key: value for key, value in tags.items()},
            "note": f"{version.current_stage} -> {stage} by {who}, gate {gate}" + (f": {reason}" if reason else "")}


def _end_of(rollout: dict, result: str, reason: str, live: dict | None) -> dict:
    """The rollout's candidate leaving it, with the outcome tagged on it."""
    return {"version": rollout["version"], "result": result, "reason": reason,
            "live": json.dumps(live or {}, sort_keys=True)}


def _apply(client: MlflowClient, name: str, change: dict) -> None:
    client.set_registered_model_tag(name, registry.PENDING_TAG, json.dumps(change, sort_keys=True))
    move, end = change["move"], change["end_rollout"]
    if move is not None:
        version = registry.find_version(name, number=move["version"], client=client)
        if version.current_stage != move["stage"]:
            _transition(client, version, move["stage"])
        _sync_alias(client, version, move["stage"])
        _set_history(client, name, move["history"])
        for key, value in move["tags"].items():
            client.set_model_version_tag(name, move["version"], key, value)
        _note(client, name, move["version"], move["note"], change["at"])
        if move["previous_note"] and move["previous"]:
            _note(client, name, move["previous"], move["previous_note"], change["at"])
    if end is not None:
        for key in ("result", "reason", "live"):
            client.set_model_version_tag(name, end["version"], registry.CANARY_TAG_PREFIX + key, end[key])
        client.set_model_version_tag(name, end["version"], registry.CANARY_TAG_PREFIX + "at", change["at"])
        _note(client, name, end["version"], f"canary {end['result']}: {end['reason']}", change["at"])
        with contextlib.suppress(MlflowException):  # a person may have removed the alias already
            client.delete_registered_model_alias(name, registry.CANARY_ALIAS)
        rollout = registry.rollout(client, name)
        if rollout is not None and rollout["version"] == end["version"]:
            client.delete_registered_model_tag(name, registry.ROLLOUT_TAG)  # last: servers stop routing to it
    client.delete_registered_model_tag(name, registry.PENDING_TAG)


# -- canary rollouts (canary.py) -------------------------------------------------------------------
CANARY = "canary"


def start_canary(name: str, version: str, weight: float | None, reason: str, force: bool,
                 config: str) -> Promotion:
    """Put a version on a share of the stable name's requests, behind the Staging gate; weight 0
    stops the rollout of that version. The servers following `name` pick it up at their next poll."""
    settings = promotion_gates.load(config)
    gates, policy = settings.stages, settings.rollout
    _check_force(force, reason)
    client = MlflowClient()
    registry.find_version(name, number=version, client=client)
    with _changing(client, name):
        candidate = registry.find_version(name, number=version, client=client)
        rollout = registry.rollout(client, name)
        ours = rollout is not None and rollout["version"] == str(candidate.version)
        if weight == 0:
            if not ours:
                raise UserError(f"{name} v{candidate.version} is not the canary; nothing to stop.")
            return Promotion(False, "none", None, _end_rollout(client, name, rollout, "stopped", reason or "stopped"))
        production = _production(client, name)
        if production is None:
            raise UserError(f"{name} has no version in Production for a canary to be compared with: "
                            "promote one first.")
        if production.version == candidate.version:
            raise UserError(f"{name} v{candidate.version} is in Production already; a canary is a candidate for it.")
        if rollout is not None and not ours:
            raise UserError(f"{name} v{rollout['version']} is the canary now: stop it first "
                            f"(-P version={rollout['version']} -P stage=Canary -P weight=0), or promote it.")
        registry.check_adapter_present(candidate)
        weight = weight if weight is not None else policy.weight
        report, gate = (None, "none") if ours else _gate(gates, "Staging", candidate, production, force)
        if gate == "refused":
            return Promotion(True, gate, report, _refusal(name, candidate, report))
        state = rollout if ours else {
            "version": str(candidate.version), "started_at": _now(), "by": registry_lock.holder(),
            "production": str(production.version),  # what it is judged against; a change of it ends the rollout
            "policy": policy.model_dump(), "gates": {stage: gate.model_dump() for stage, gate in gates.items()},
        }
        if not ours:
            move = _move_of(candidate, "Canary", reason, gate, production, [], None, state["started_at"])
            for key, value in move["tags"].items():
                client.set_model_version_tag(name, candidate.version, key, value)
            _note(client, name, candidate.version, move["note"], state["started_at"])
        client.set_registered_model_alias(name, registry.CANARY_ALIAS, candidate.version)
        _set_rollout(client, name, {**state, "weight": weight})  # last: what servers act on
        lines = [f"{name} v{candidate.version}: canary on {weight:.0%} of {name}@production's requests "
                 f"(gate: {gate}); v{production.version} serves the rest"]
        if report is not None and report.checks:
            lines.append(report.table())
        return Promotion(False, gate, report, "\n".join(lines))


def finish_canary(name: str, rollout: dict, verdict: canary.Verdict, live: dict) -> str:
    """A server's judgement of the rollout it follows, carried out under the registry lock: a larger
    share, Production (through promote's gates), or a rollback. Nothing is done when the rollout
    changed meanwhile (a person stopped or changed it)."""
    client = MlflowClient()
    with _changing(client, name):
        now = registry.rollout(client, name)
        if now is None or (now["version"], now["started_at"], now["weight"]) != \
                (rollout["version"], rollout["started_at"], rollout["weight"]):
            return f"{name}: the rollout changed meanwhile; nothing done"
        production = _production(client, name)
        serving = str(production.version) if production is not None else None
        if now.get("production") != serving:  # changed outside loraflow (the MLflow UI, its API)
            return _end_rollout(client, name, now, "stopped", f"Production is {'v' + serving if serving else 'empty'}"
                                f", not v{now.get('production')} that the canary was judged against; nothing judged")
        why = "canary: " + "; ".join(verdict.reasons)
        if verdict.decision == "step":
            weight = canary.next_weight(canary.policy_of(now), now["weight"])
            _set_rollout(client, name, {**now, "weight": weight})
            _note(client, name, now["version"], f"canary: {now['weight']:.0%} -> {weight:.0%} "
                  f"({'; '.join(verdict.reasons)})")
            return f"{name} v{now['version']}: canary {now['weight']:.0%} -> {weight:.0%}"
        if verdict.decision == "promote":
            gates = {stage: Gate.model_validate(gate) for stage, gate in now["gates"].items()}
            result = _move(client, name, now["version"], "Production", why, False, gates, live)
            if not result.refused:
                return result.message
            why = f"canary held, but the Production gate refused it: {result.message}"
        return _end_rollout(client, name, now, "rolled back", why, live)


def _set_rollout(client: MlflowClient, name: str, rollout: dict) -> None:
    client.set_registered_model_tag(name, registry.ROLLOUT_TAG, json.dumps(rollout, sort_keys=True))


def _end_rollout(client: MlflowClient, name: str, rollout: dict, result: str, reason: str,
                 live: dict | None = None) -> str:
    """The candidate leaves the rollout: alias and rollout tag removed, the outcome tagged on it."""
    change = _change(f"canary v{rollout['version']} {result}")
    change["end_rollout"] = _end_of(rollout, result, reason, live)
    _apply(client, name, change)
    return f"{name} v{rollout['version']}: canary {result} ({reason})"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def rollback(name: str, reason: str) -> tuple[str, str]:
    """Return Production to the version before the current one; (that version, what was done)."""
    client = MlflowClient()
    registry.registered_model(client, name)
    with _changing(client, name):
        production = _production(client, name)
        history = _history(client, name)
        while history and production is not None and history[-1] == int(production.version):
            history.pop()
        existing = {int(v.version) for v in client.search_model_versions(f"name='{name}'")}
        history = [v for v in history if v in existing]
        if not history:
            current = f"v{production.version}" if production is not None else "none"
            raise UserError(f"Nothing to roll back to: {name} has no earlier Production version "
                            f"(Production now: {current}).")
        target = registry.find_version(name, number=str(history[-1]), client=client)
        registry.check_adapter_present(target)
        change = _change(f"rollback to v{target.version}")
        change["move"] = _move_of(target, "Production", reason, "rollback", production, history, None, change["at"])
        lines = [f"{name} v{target.version}: {target.current_stage} -> Production (rollback)"]
        if production is not None:
            change["move"]["previous_note"] = (f"rolled back: Production returned to v{target.version}"
                                               + (f" ({reason})" if reason else ""))
            lines.append(f"{name} v{production.version}: Production -> Archived")
        rollout = registry.rollout(client, name)
        if rollout is not None:  # judged against the Production that was rolled back
            why = f"Production rolled back to v{target.version}"
            change["end_rollout"] = _end_of(rollout, "stopped", why, None)
            lines.append(f"{name} v{rollout['version']}: canary stopped ({why})")
        _apply(client, name, change)
        return str(target.version), "\n".join(lines)


def _production(client: MlflowClient, name: str) -> ModelVersion | None:
    with _stage_api():
        versions = client.get_latest_versions(name, stages=["Production"])
    return versions[0] if versions else None


def _transition(client: MlflowClient, version: ModelVersion, stage: str) -> None:
    """Move `version` to `stage`; entering Production archives the versions there. Done here rather
    than with archive_existing_versions=True, which fails on PostgreSQL in MLflow 3.17
    (mlflow/mlflow#24592: version compared as VARCHAR to an INTEGER column); the registry lock
    makes the two steps one."""
    with _stage_api():
        if stage == "Production":
            for other in client.search_model_versions(f"name='{version.name}'"):
                if other.current_stage == "Production" and other.version != version.version:
                    client.transition_model_version_stage(other.name, other.version, "Archived")
        client.transition_model_version_stage(version.name, version.version, stage)


def _sync_alias(client: MlflowClient, version: ModelVersion, stage: str) -> None:
    """The version carries the alias of its new stage and no longer that of its old one."""
    for other_stage, alias in registry.STAGE_ALIASES.items():
        if other_stage == stage:
            client.set_registered_model_alias(version.name, alias, version.version)
        elif alias in client.get_model_version(version.name, version.version).aliases:
            client.delete_registered_model_alias(version.name, alias)


def _history(client: MlflowClient, name: str) -> list[int]:
    return json.loads(client.get_registered_model(name).tags.get(registry.PRODUCTION_HISTORY_TAG, "[]"))


def _set_history(client: MlflowClient, name: str, history: list[int]) -> None:
    client.set_registered_model_tag(name, registry.PRODUCTION_HISTORY_TAG, json.dumps(history[-HISTORY_LENGTH:]))


def _note(client: MlflowClient, name: str, version: str, text: str, when: str | None = None) -> None:
    """Add a dated line to the version's description (all its moves), once."""
    line = f"[{when or _now()}] {text}"
    current = client.get_model_version(name, version).description or ""
    if line not in current.splitlines():
        client.update_model_version(name, version, description=f"{current}\n{line}".strip())


def _refusal(name: str, candidate: ModelVersion, report: promotion_gates.GateReport) -> str:
    text = (f"{name} v{candidate.version} does not pass the {report.stage} gate "
            f"({', '.join(sorted({c.metric for c in report.failures}))}):\n{report.table()}\n")
    if not registry.eval_metrics(candidate):
        text += (f"v{candidate.version} has no evaluation yet: run "
                 f"`mlflow run . -e evaluate -P model=models:/{name}/{candidate.version}` first. ")
    return text + "To promote anyway, pass -P force=true with -P reason=... (both are recorded)."
