"""Registry changes under the lock, with their audit trail: a version's move through the stages
(Staging, Production, Archived) behind evaluation gates, and a rollback of Production. Every path
that changes what serves goes through here: the promote and rollback commands, a canary's rollout
(rollout.py) and the pipeline.

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

from loraflow import promotion_gates, registry, registry_lock
from loraflow.errors import UserError
from loraflow.job_configs import Gate

HISTORY_LENGTH = 100  # of the Production history kept (registry.PRODUCTION_HISTORY_TAG), for rollback


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
    check_force(force, reason)
    client = MlflowClient()
    registry.find_version(name, number=version, client=client)  # fail before taking the lock
    with changing(client, name):
        return move(client, name, version, stage, reason, force, gates)


@contextlib.contextmanager
def changing(client: MlflowClient, name: str):
    """The registry lock, with a change that an earlier holder left half done completed first."""
    with registry_lock.locked(client, name):
        text = client.get_registered_model(name).tags.get(registry.PENDING_TAG)
        if text:
            change = json.loads(text)
            print(f"warning: {name}: completing a change left half done by {change['by']} at {change['at']} "
                  f"({change['summary']})", flush=True)
            apply(client, name, change)
        yield


def check_gate(gates: dict[str, Gate], stage: str, candidate: ModelVersion, production: ModelVersion | None,
          force: bool) -> tuple[promotion_gates.GateReport | None, str]:
    """The stage's gate checked: (report, none / passed / overridden / refused)."""
    if stage not in gates:
        return None, "none"
    report = promotion_gates.check(gates[stage], stage, candidate, production)
    return report, "passed" if report.passed else "overridden" if force else "refused"


def check_force(force: bool, reason: str) -> None:
    if force and not reason.strip():
        raise UserError("force=true skips the promotion gate; give a reason (-P reason=...) to record.")


def move(client: MlflowClient, name: str, version: str, stage: str, reason: str, force: bool,
          gates: dict[str, Gate], live: dict | None = None) -> Promotion:
    """promote's work, under the registry lock; `live` is a canary's figures, for the audit."""
    candidate = registry.find_version(name, number=version, client=client)
    production = production_of(client, name)
    if candidate.current_stage == stage:
        _sync_alias(client, candidate, stage)
        return Promotion(False, "none", None, f"{name} v{candidate.version} is already in {stage}; nothing to do.")
    if stage != "Archived":
        registry.check_adapter_present(candidate)
    report, gate = check_gate(gates, stage, candidate, production, force)
    if gate == "refused":
        return Promotion(True, gate, report, refusal(name, candidate, report))
    history = _history(client, name)
    if stage == "Production":
        history.append(int(candidate.version))
    elif production is not None and production.version == candidate.version:
        history = [v for v in history if v != int(candidate.version)]  # Production is now empty
    change = new_change(f"v{candidate.version} -> {stage}")
    change["move"] = move_of(candidate, stage, reason, gate, production, history, live, change["at"])
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
            change["end_rollout"] = rollout_end(rollout, result, why, live)
            lines.append(f"{name} v{rollout['version']}: canary {result} ({why})")
    apply(client, name, change)
    if report is not None and report.checks:
        lines.append(report.table())
    return Promotion(False, gate, report, "\n".join(lines))


# -- changes of several writes -------------------------------------------------------------------
# A registry change writes a stage, aliases, tags and descriptions one call at a time, and MLflow has
# no transactions. So a change is recorded first as a whole (registry.PENDING_TAG on the registered
# model), then carried out step by step, each step safe to repeat; the tag goes when all are done. A
# process that dies part-way leaves the record, and the next locked operation on the model carries
# it out again before its own (`_changing`).

def new_change(summary: str) -> dict:
    return {"summary": summary, "by": registry_lock.holder(), "at": now(), "move": None, "end_rollout": None}


def move_of(version: ModelVersion, stage: str, reason: str, gate: str, previous: ModelVersion | None,
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


def rollout_end(rollout: dict, result: str, reason: str, live: dict | None) -> dict:
    """The rollout's candidate leaving it, with the outcome tagged on it."""
    return {"version": rollout["version"], "result": result, "reason": reason,
            "live": json.dumps(live or {}, sort_keys=True)}


def apply(client: MlflowClient, name: str, change: dict) -> None:
    client.set_registered_model_tag(name, registry.PENDING_TAG, json.dumps(change, sort_keys=True))
    moved, end = change["move"], change["end_rollout"]
    if moved is not None:
        version = registry.find_version(name, number=moved["version"], client=client)
        if version.current_stage != moved["stage"]:
            _transition(client, version, moved["stage"])
        _sync_alias(client, version, moved["stage"])
        _set_history(client, name, moved["history"])
        for key, value in moved["tags"].items():
            client.set_model_version_tag(name, moved["version"], key, value)
        note(client, name, moved["version"], moved["note"], change["at"])
        if moved["previous_note"] and moved["previous"]:
            note(client, name, moved["previous"], moved["previous_note"], change["at"])
    if end is not None:
        for key in ("result", "reason", "live"):
            client.set_model_version_tag(name, end["version"], registry.CANARY_TAG_PREFIX + key, end[key])
        client.set_model_version_tag(name, end["version"], registry.CANARY_TAG_PREFIX + "at", change["at"])
        note(client, name, end["version"], f"canary {end['result']}: {end['reason']}", change["at"])
        with contextlib.suppress(MlflowException):  # a person may have removed the alias already
            client.delete_registered_model_alias(name, registry.CANARY_ALIAS)
        rollout = registry.rollout(client, name)
        if rollout is not None and rollout["version"] == end["version"]:
            client.delete_registered_model_tag(name, registry.ROLLOUT_TAG)  # last: servers stop routing to it
    client.delete_registered_model_tag(name, registry.PENDING_TAG)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def rollback(name: str, reason: str) -> tuple[str, str]:
    """Return Production to the version before the current one; (that version, what was done)."""
    client = MlflowClient()
    registry.registered_model(client, name)
    with changing(client, name):
        production = production_of(client, name)
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
        change = new_change(f"rollback to v{target.version}")
        change["move"] = move_of(target, "Production", reason, "rollback", production, history, None, change["at"])
        lines = [f"{name} v{target.version}: {target.current_stage} -> Production (rollback)"]
        if production is not None:
            change["move"]["previous_note"] = (f"rolled back: Production returned to v{target.version}"
                                               + (f" ({reason})" if reason else ""))
            lines.append(f"{name} v{production.version}: Production -> Archived")
        rollout = registry.rollout(client, name)
        if rollout is not None:  # judged against the Production that was rolled back
            why = f"Production rolled back to v{target.version}"
            change["end_rollout"] = rollout_end(rollout, "stopped", why, None)
            lines.append(f"{name} v{rollout['version']}: canary stopped ({why})")
        apply(client, name, change)
        return str(target.version), "\n".join(lines)


def production_of(client: MlflowClient, name: str) -> ModelVersion | None:
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


def note(client: MlflowClient, name: str, version: str, text: str, when: str | None = None) -> None:
    """Add a dated line to the version's description (all its moves), once."""
    line = f"[{when or now()}] {text}"
    current = client.get_model_version(name, version).description or ""
    if line not in current.splitlines():
        client.update_model_version(name, version, description=f"{current}\n{line}".strip())


def refusal(name: str, candidate: ModelVersion, report: promotion_gates.GateReport) -> str:
    text = (f"{name} v{candidate.version} does not pass the {report.stage} gate "
            f"({', '.join(sorted({c.metric for c in report.failures}))}):\n{report.table()}\n")
    if not registry.eval_metrics(candidate):
        text += (f"v{candidate.version} has no evaluation yet: run "
                 f"`mlflow run . -e evaluate -P model=models:/{name}/{candidate.version}` first. ")
    return text + "To promote anyway, pass -P force=true with -P reason=... (both are recorded)."
