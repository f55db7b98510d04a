"""Canary rollouts in the registry: a candidate put on a share of a stable name's requests (behind
the Staging gate), and a server's verdict on it carried out (a larger share, Production through the
gates, or a rollback). The rollout itself lives on the registered model (registry.ROLLOUT_TAG);
servers act on it (serving_follower.py), canary.py judges it. Every write holds the registry lock
and is audited as the promote command's are (registry_changes.py)."""

from __future__ import annotations

import json

from mlflow import MlflowClient

from loraflow import canary, promotion_gates, registry, registry_changes, registry_lock
from loraflow.errors import UserError
from loraflow.job_configs import Gate
from loraflow.registry_changes import Promotion


def start_canary(name: str, version: str, weight: float | None, reason: str, force: bool,
                 config: str) -> Promotion:
    """Put a version on a share of the stable name's requests, behind the Staging gate; weight 0
    stops the rollout of that version. The servers following `name` pick it up at their next poll."""
    settings = promotion_gates.load(config)
    gates, policy = settings.stages, settings.rollout
    registry_changes.check_force(force, reason)
    client = MlflowClient()
    registry.find_version(name, number=version, client=client)
    with registry_changes.changing(client, name):
        candidate = registry.find_version(name, number=version, client=client)
        rollout = registry.rollout(client, name)
        ours = rollout is not None and rollout["version"] == str(candidate.version)
        if weight == 0:
            if not ours:
                raise UserError(f"{name} v{candidate.version} is not the canary; nothing to stop.")
            return Promotion(False, "none", None, _end_rollout(client, name, rollout, "stopped", reason or "stopped"))
        production = registry_changes.production_of(client, name)
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
        report, gate = (None, "none") if ours else registry_changes.check_gate(gates, "Staging", candidate, production, force)
        if gate == "refused":
            return Promotion(True, gate, report, registry_changes.refusal(name, candidate, report))
        state = rollout if ours else {
            "version": str(candidate.version), "started_at": registry_changes.now(), "by": registry_lock.holder(),
            "production": str(production.version),  # what it is judged against; a change of it ends the rollout
            "policy": policy.model_dump(), "gates": {stage: gate.model_dump() for stage, gate in gates.items()},
        }
        if not ours:
            move = registry_changes.move_of(candidate, "Canary", reason, gate, production, [], None, state["started_at"])
            for key, value in move["tags"].items():
                client.set_model_version_tag(name, candidate.version, key, value)
            registry_changes.note(client, name, candidate.version, move["note"], state["started_at"])
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
    with registry_changes.changing(client, name):
        now = registry.rollout(client, name)
        if now is None or (now["version"], now["started_at"], now["weight"]) != \
                (rollout["version"], rollout["started_at"], rollout["weight"]):
            return f"{name}: the rollout changed meanwhile; nothing done"
        production = registry_changes.production_of(client, name)
        serving = str(production.version) if production is not None else None
        if now.get("production") != serving:  # changed outside loraflow (the MLflow UI, its API)
            return _end_rollout(client, name, now, "stopped", f"Production is {'v' + serving if serving else 'empty'}"
                                f", not v{now.get('production')} that the canary was judged against; nothing judged")
        why = "canary: " + "; ".join(verdict.reasons)
        if verdict.decision == "step":
            weight = canary.next_weight(canary.policy_of(now), now["weight"])
            _set_rollout(client, name, {**now, "weight": weight})
            registry_changes.note(client, name, now["version"], f"canary: {now['weight']:.0%} -> {weight:.0%} "
                  f"({'; '.join(verdict.reasons)})")
            return f"{name} v{now['version']}: canary {now['weight']:.0%} -> {weight:.0%}"
        if verdict.decision == "promote":
            gates = {stage: Gate.model_validate(gate) for stage, gate in now["gates"].items()}
            result = registry_changes.move(client, name, now["version"], "Production", why, False, gates, live)
            if not result.refused:
                return result.message
            why = f"canary held, but the Production gate refused it: {result.message}"
        return _end_rollout(client, name, now, "rolled back", why, live)


def _set_rollout(client: MlflowClient, name: str, rollout: dict) -> None:
    client.set_registered_model_tag(name, registry.ROLLOUT_TAG, json.dumps(rollout, sort_keys=True))


def _end_rollout(client: MlflowClient, name: str, rollout: dict, result: str, reason: str,
                 live: dict | None = None) -> str:
    """The candidate leaves the rollout: alias and rollout tag removed, the outcome tagged on it."""
    change = registry_changes.new_change(f"canary v{rollout['version']} {result}")
    change["end_rollout"] = registry_changes.rollout_end(rollout, result, reason, live)
    registry_changes.apply(client, name, change)
    return f"{name} v{rollout['version']}: canary {result} ({reason})"
