"""The `promote` and `rollback` entry points (entry_points.py): a version moved through the
registry stages behind its gate (registry_changes.py), or put on a canary's share of the requests
(rollout.py)."""

from __future__ import annotations

from loraflow import canary, registry, registry_changes, rollout, tracking
from loraflow.errors import UserError

CANARY = "canary"


def promote_job(version: str, stage: str, weight: str, name: str, reason: str, force: bool, config: str) -> None:
    """The promote entry point (entry_points.py): a gate's refusal exits 2, with the comparison."""
    tracking.configure()
    if stage.strip().lower() == CANARY:
        result = rollout.start_canary(name, version, _parse_weight(weight), reason, force, config)
        stage = "Canary"
    else:
        if weight:
            raise UserError("weight is for stage=Canary only.")
        try:
            stage = registry.stage_named(stage)
        except UserError as exc:
            raise UserError(f"{exc} Or Canary, for a live rollout.") from None
        result = registry_changes.promote(name, version, stage, reason, force, config)
    launch_run = f"promote-{name}-v{int(version)}-{stage}"
    tracking.name_launch_run(launch_run + ("-refused" if result.refused else ""), "promote")
    if result.refused:
        raise UserError(result.message)
    print(result.message)


def rollback_job(name: str, reason: str) -> None:
    """The rollback entry point (entry_points.py)."""
    tracking.configure()
    target, message = registry_changes.rollback(name, reason)
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
