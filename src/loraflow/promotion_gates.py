"""Promotion gates: the evaluation metrics a model version must reach before it enters a stage.

The metrics are the version's `loraflow.eval.*` tags (registry.eval_metrics), which the evaluate
entry point writes (the latest evaluation of a version counts). A gate has minimums and,
optionally, a comparison with the version that is in Production now.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from loraflow import canary
from loraflow.envs import PROJECT_ROOT
from loraflow.errors import UserError
from loraflow.registry import EVAL_METRICS, eval_metrics

DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "promote" / "default.yaml"
GATED_STAGES = ("Staging", "Production")


@dataclass
class Check:
    metric: str
    rule: str  # how the check reads, e.g. ">= 0.90" or ">= production - 0.00"
    candidate: float | None
    production: float | None
    passed: bool


@dataclass
class GateReport:
    stage: str
    candidate_label: str
    production_label: str | None
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]

    def table(self) -> str:
        """The comparison side by side, as a fixed-width text table."""
        head = ["metric", "rule", f"{self.candidate_label} (candidate)",
                f"{self.production_label} (production)" if self.production_label else "production", "result"]
        rows = [[c.metric, c.rule, _fmt(c.candidate), _fmt(c.production), "ok" if c.passed else "FAIL"]
                for c in self.checks]
        widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
        return "\n".join("  " + "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip()
                         for row in [head, *rows])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def load(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read and check a gates file; returns {stage: {"minimum": {...}, "compare_with_production": {...}}}."""
    path, config = _read(path)
    stages = config["stages"]
    for stage, gate in stages.items():
        where = f"Promotion config {path}, stage {stage!r}"
        if stage not in GATED_STAGES:
            raise UserError(f"{where}: only {', '.join(GATED_STAGES)} have gates.")
        gate = gate or {}
        if not isinstance(gate, dict) or set(gate) - {"minimum", "compare_with_production"}:
            raise UserError(f"{where}: allowed keys are `minimum` and `compare_with_production`.")
        minimum = gate.get("minimum") or {}
        if not isinstance(minimum, dict):
            raise UserError(f"{where}: minimum must map metrics to numbers, such as {{exact_match: 0.45}}; "
                            f"got {minimum!r}.")
        for metric, threshold in minimum.items():
            _check_metric(where, metric)
            if not isinstance(threshold, (int, float)):
                raise UserError(f"{where}: minimum for {metric} must be a number, not {threshold!r}.")
        compare = gate.get("compare_with_production")
        if compare is not None:
            if not isinstance(compare, dict) or set(compare) - {"metric", "max_regression"} or "metric" not in compare:
                raise UserError(f"{where}: compare_with_production needs `metric` and may have `max_regression`.")
            _check_metric(where, compare["metric"])
            slack = compare.get("max_regression", 0.0)
            if not isinstance(slack, (int, float)) or isinstance(slack, bool):
                raise UserError(f"{where}: max_regression must be a number, not {slack!r}.")
        stages[stage] = gate
    return stages


def load_rollout(path: str | Path) -> canary.Policy:
    """The canary rollout policy of a gates file (its `rollout` key; the defaults without one)."""
    path, config = _read(path)
    return canary.load_policy(config.get("rollout"), f"Promotion config {path}")


def _read(path: str | Path) -> tuple[Path, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Promotion config {path} does not exist; see {DEFAULT_CONFIG.relative_to(PROJECT_ROOT)}.")
    config = yaml.safe_load(path.read_text()) or {}
    stages = config.get("stages") if isinstance(config, dict) else None
    if not isinstance(stages, dict) or set(config) - {"rollout"} != {"stages"}:
        raise UserError(f"Promotion config {path} must hold the key `stages`, mapping stage names to gates, "
                        "and may hold `rollout` (the canary policy).")
    return path, config


def _check_metric(where: str, metric: Any) -> None:
    if metric not in EVAL_METRICS:
        raise UserError(f"{where}: unknown metric {metric!r}; evaluations record {', '.join(EVAL_METRICS)}.")


def check(gate: dict[str, Any], stage: str, candidate, production) -> GateReport:
    """Check `candidate` (a ModelVersion) against a stage's gate; `production` may be None."""
    ours = eval_metrics(candidate)
    theirs = eval_metrics(production) if production is not None else {}
    checks = []
    for metric, threshold in (gate.get("minimum") or {}).items():
        value = ours.get(metric)
        checks.append(Check(metric, f">= {threshold:.2f}", value, theirs.get(metric),
                            value is not None and value >= threshold))
    compare = gate.get("compare_with_production")
    if compare and production is not None and production.version != candidate.version:
        metric, slack = compare["metric"], float(compare.get("max_regression", 0.0))
        value, current = ours.get(metric), theirs.get(metric)
        # A Production version without this metric cannot be beaten or lost to: the check passes.
        passed = value is not None and (current is None or value >= current - slack)
        checks.append(Check(metric, f">= production - {slack:.2f}", value, current, passed))
    production_label = f"v{production.version}" if production is not None else None
    return GateReport(stage, f"v{candidate.version}", production_label, checks)
