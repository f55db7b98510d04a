"""Promotion gates: the evaluation metrics a model version must reach before it enters a stage.

The metrics are the version's `loraflow.eval.*` tags (registry.eval_metrics), which the evaluate
entry point writes (the latest evaluation of a version counts). A gate has minimums, maximums (for
metrics where lower is better) and, optionally, a comparison with the version in Production now.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraflow import job_configs
from loraflow.job_configs import Gate, PromoteConfig
from loraflow.registry import eval_metrics


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


def load(path: str | Path) -> PromoteConfig:
    """Read and check a promote config: its gates per stage and its canary rollout policy."""
    return job_configs.load(PromoteConfig, path)


def check(gate: Gate, stage: str, candidate, production) -> GateReport:
    """Check `candidate` (a ModelVersion) against a stage's gate; `production` may be None."""
    ours = eval_metrics(candidate)
    theirs = eval_metrics(production) if production is not None else {}
    checks = []
    for metric, threshold in gate.minimum.items():
        value = ours.get(metric)
        checks.append(Check(metric, f">= {threshold:.2f}", value, theirs.get(metric),
                            value is not None and value >= threshold))
    for metric, threshold in gate.maximum.items():
        value = ours.get(metric)
        checks.append(Check(metric, f"<= {threshold:.2f}", value, theirs.get(metric),
                            value is not None and value <= threshold))
    compare = gate.compare_with_production
    if compare and production is not None and production.version != candidate.version:
        metric, slack = compare.metric, compare.max_regression
        value, current = ours.get(metric), theirs.get(metric)
        # A Production version without this metric cannot be beaten or lost to: the check passes.
        passed = value is not None and (current is None or value >= current - slack)
        checks.append(Check(metric, f">= production - {slack:.2f}", value, current, passed))
    production_label = f"v{production.version}" if production is not None else None
    return GateReport(stage, f"v{candidate.version}", production_label, checks)
