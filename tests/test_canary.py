"""Canary rollouts: the policy, the split, the verdict (unit), and starting, stopping and ending a
rollout in a real registry (a local SQLite store). test_serve_job.py runs them on a real server."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import ROOT
from mlflow import MlflowClient
from test_promote import GOOD, add_version, stages

from loraflow import canary, entry_points, registry
from loraflow.rollout import finish_canary
from loraflow.errors import UserError
from loraflow.job_configs import RolloutPolicy

NAME = "viggo-canary"
POLICY = RolloutPolicy(weight=0.1, steps=(0.5,), min_requests=10, max_error_rate=0.01, min_parse_validity=0.9,
                       max_validity_drop=0.05, max_p95_ratio=1.5)


def figures(requests=100, errors=0, validity=0.98, p95=100.0, scored=None) -> dict:
    return {"requests": requests, "errors": errors, "error_rate": errors / requests if requests else None,
            "p50_ms": p95 / 2, "p95_ms": p95, "output_tokens": 0,
            "scored": requests if scored is None else scored, "parse_validity": validity}


@pytest.mark.unit
@pytest.mark.parametrize("candidate, weight, decision, reasons", [
    (figures(requests=9), 0.1, "wait", ["9 of 10 requests"]),
    (figures(), 0.1, "step", ["held at 10% over 100 requests"]),
    (figures(), 0.5, "promote", ["held at 50% over 100 requests"]),
    (figures(errors=2), 0.1, "roll back", ["error rate 0.020 > 0.010"]),
    (figures(validity=0.85), 0.1, "roll back", ["parse validity 0.850 < 0.900",
                                                "parse validity 0.850 < Production's 0.980 - 0.050"]),
    (figures(validity=0.92), 0.1, "roll back", ["parse validity 0.920 < Production's 0.980 - 0.050"]),
    (figures(p95=151.0), 0.1, "roll back", ["p95 151 ms > 1.50 x Production's 100 ms"]),
    # Streamed answers are counted, not scored: request counts alone never make it hold.
    (figures(scored=9), 0.5, "wait", ["9 of 10 answers scored (streamed answers are not)"]),
    (figures(scored=0, validity=None), 0.5, "wait", ["0 of 10 answers scored (streamed answers are not)"]),
    (figures(scored=0, validity=None, errors=2), 0.1, "roll back", ["error rate 0.020 > 0.010"]),
])
def test_the_verdict_waits_steps_up_promotes_or_rolls_back(candidate, weight, decision, reasons):
    assert canary.verdict(POLICY, weight, candidate, figures()) == canary.Verdict(decision, reasons)


@pytest.mark.unit
def test_without_production_figures_only_the_candidates_own_are_judged():
    alone = figures(requests=0, validity=None, p95=0.0) | {"p95_ms": None}
    assert canary.verdict(POLICY, 0.5, figures(validity=0.91, p95=900.0), alone).decision == "promote"


@pytest.mark.unit
def test_a_request_key_always_lands_on_the_same_side_and_keys_split_by_the_weight():
    keys = [f"user-{i}" for i in range(20_000)]
    sides = [canary.takes_candidate(0.1, key) for key in keys]
    assert sides == [canary.takes_candidate(0.1, key) for key in keys]
    assert 0.09 <= sum(sides) / len(keys) <= 0.11  # sd of the share 0.002
    # A larger share keeps every key that the smaller one sent to the candidate (a step-up moves keys one way).
    assert all(canary.takes_candidate(0.5, key) for key, side in zip(keys, sides) if side)


@pytest.mark.unit
def test_live_stats_count_and_take_nearest_rank_percentiles():
    stats = canary.LiveStats()
    for i in range(1, 101):
        stats.record(i / 1000, error=i == 100, output_tokens=2, valid=None if i > 50 else i % 2 == 0)
    assert stats.figures() == {"requests": 100, "errors": 1, "error_rate": 0.01, "p50_ms": 50.0, "p95_ms": 95.0,
                               "output_tokens": 200, "scored": 50, "parse_validity": 0.5}
    assert canary.LiveStats().figures()["p95_ms"] is None


@pytest.mark.unit
@pytest.mark.parametrize("rollout, message", [
    ({"share": 0.1}, "rollout.share is not a known key"),
    ({"weight": 0}, "rollout.weight should be greater than 0, got 0"),
    ({"weight": 1.5}, "rollout.weight should be less than or equal to 1, got 1.5"),
    ({"steps": [0.5, 0.2]}, "rollout.steps must be increasing shares in (0, 1], such as [0.5, 1.0]; got [0.5, 0.2]"),
    ({"min_requests": 0}, "rollout.min_requests should be greater than or equal to 1, got 0"),
    ({"max_error_rate": "low"}, "rollout.max_error_rate should be a valid number, got 'low'"),
])
def test_bad_rollout_policies_are_refused(rollout, message, tmp_path):
    from loraflow import promotion_gates

    raw = yaml.safe_load((ROOT / "configs/promote/default.yaml").read_text())
    path = tmp_path / "gates.yaml"
    path.write_text(yaml.safe_dump({**raw, "rollout": rollout}))
    with pytest.raises(UserError) as refused:
        promotion_gates.load(path)
    assert str(refused.value) == f"Promotion config {path}: {message}; see configs/promote/default.yaml."


@pytest.mark.unit
def test_the_shipped_policies_load():
    from loraflow import promotion_gates

    for config in ("default", "production"):
        policy = promotion_gates.load(ROOT / f"configs/promote/{config}.yaml").rollout
        assert 0 < policy.weight < 1 and policy.steps and policy.min_requests >= 100


# -- in a registry ---------------------------------------------------------------------------------
@pytest.fixture
def versions(tracking_uri, tmp_path) -> MlflowClient:
    """v1 in Production, v2 and v3 evaluated like good ones, v4 not evaluated."""
    for metrics in (GOOD, GOOD, GOOD, None):
        add_version(NAME, metrics, tmp_path)
    assert entry_points.main("promote", ["--name", NAME, "--version", "1"]) == 0
    return MlflowClient()


def canary_main(version: str, *extra: str) -> int:
    return entry_points.main("promote", ["--name", NAME, "--version", version, "--stage", "Canary", *extra])


def test_a_canary_starts_changes_weight_and_stops(versions, capsys):
    assert canary_main("2", "--weight", "0.2", "--reason", "try v2") == 0
    assert f"{NAME} v2: canary on 20% of {NAME}@production's requests (gate: passed); v1 serves the rest" \
        in capsys.readouterr().out
    rollout = registry.rollout(versions, NAME)
    assert (rollout["version"], rollout["weight"], rollout["policy"]["min_requests"]) == ("2", 0.2, 100)
    assert set(rollout["gates"]) == {"Staging", "Production"}
    assert str(versions.get_model_version_by_alias(NAME, "canary").version) == "2"
    v2 = versions.get_model_version(NAME, "2")
    assert (v2.tags["loraflow.promotion.stage"], v2.tags["loraflow.promotion.reason"]) == ("Canary", "try v2")
    assert stages(NAME) == {"1": "Production", "2": "None", "3": "None", "4": "None"}

    assert canary_main("2") == 0  # the config's weight, same rollout
    assert registry.rollout(versions, NAME) == {**rollout, "weight": 0.1}

    assert canary_main("2", "--weight", "0", "--reason", "not now") == 0
    assert capsys.readouterr().out.strip().endswith(f"{NAME} v2: canary stopped (not now)")
    assert registry.rollout(versions, NAME) is None
    v2 = versions.get_model_version(NAME, "2")
    assert "canary" not in v2.aliases
    assert (v2.tags["loraflow.canary.result"], v2.tags["loraflow.canary.reason"]) == ("stopped", "not now")
    assert stages(NAME) == {"1": "Production", "2": "None", "3": "None", "4": "None"}


@pytest.mark.parametrize("version, extra, message", [
    ("3", (), f"{NAME} v2 is the canary now: stop it first (-P version=2 -P stage=Canary -P weight=0), "
              "or promote it."),
    ("1", (), f"{NAME} v1 is in Production already; a canary is a candidate for it."),
    ("3", ("--weight", "0"), f"{NAME} v3 is not the canary; nothing to stop."),
    ("3", ("--weight", "1.5"), "weight must be a share between 0 and 1 (0 stops the rollout), not '1.5'."),
    ("3", ("--weight", "half"), "weight must be a share between 0 and 1 (0 stops the rollout), not 'half'."),
])
def test_bad_canary_requests_are_refused_and_change_nothing(versions, capsys, version, extra, message):
    assert canary_main("2") == 0
    before = registry.rollout(versions, NAME)
    capsys.readouterr()
    assert canary_main(version, *extra) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert registry.rollout(versions, NAME) == before


def test_a_weight_without_stage_canary_and_a_canary_without_production_are_refused(versions, capsys):
    assert entry_points.main("promote", ["--name", NAME, "--version", "2", "--weight", "0.5"]) == 2
    assert capsys.readouterr().err.strip() == "error: weight is for stage=Canary only."
    assert entry_points.main("promote", ["--name", NAME, "--version", "1", "--stage", "Archived"]) == 0
    assert canary_main("2") == 2
    assert capsys.readouterr().err.strip() == (f"error: {NAME} has no version in Production for a canary to be "
                                               "compared with: promote one first.")
    assert registry.rollout(versions, NAME) is None


def test_an_unevaluated_candidate_does_not_pass_the_staging_gate(versions, capsys):
    assert canary_main("4") == 2
    assert f"{NAME} v4 does not pass the Staging gate" in capsys.readouterr().err
    assert registry.rollout(versions, NAME) is None and "canary" not in versions.get_model_version(NAME, "4").aliases


def test_promoting_the_candidate_by_hand_ends_its_rollout(versions, capsys):
    assert canary_main("2") == 0
    assert entry_points.main("promote", ["--name", NAME, "--version", "2", "--reason", "looks fine"]) == 0
    assert f"{NAME} v2: canary promoted (looks fine)" in capsys.readouterr().out
    assert registry.rollout(versions, NAME) is None
    assert stages(NAME) == {"1": "Archived", "2": "Production", "3": "None", "4": "None"}
    assert versions.get_model_version(NAME, "2").tags["loraflow.canary.result"] == "promoted"


def test_a_servers_verdicts_step_up_promote_and_roll_back(versions):
    live = {"candidate": figures(), "production": figures()}
    assert canary_main("2") == 0
    rollout = registry.rollout(versions, NAME)
    step = canary.Verdict("step", ["held at 10% over 100 requests"])
    assert finish_canary(NAME, rollout, step, live) == f"{NAME} v2: canary 10% -> 50%"
    assert finish_canary(NAME, rollout, step, live) == f"{NAME}: the rollout changed meanwhile; nothing done"
    rollout = registry.rollout(versions, NAME)
    assert rollout["weight"] == 0.5
    held = canary.Verdict("promote", ["held at 50% over 100 requests"])
    assert finish_canary(NAME, rollout, held, live).startswith(f"{NAME} v2: None -> Production (gate: passed)")
    v2 = versions.get_model_version(NAME, "2")
    assert stages(NAME) == {"1": "Archived", "2": "Production", "3": "None", "4": "None"}
    assert v2.tags["loraflow.promotion.reason"] == "canary: held at 50% over 100 requests"
    assert json.loads(v2.tags["loraflow.promotion.live"]) == live
    assert v2.tags["loraflow.canary.result"] == "promoted"

    assert canary_main("3") == 0
    bad = canary.Verdict("roll back", ["error rate 0.020 > 0.010"])
    assert finish_canary(NAME, registry.rollout(versions, NAME), bad, live) \
        == f"{NAME} v3: canary rolled back (canary: error rate 0.020 > 0.010)"
    v3 = versions.get_model_version(NAME, "3")
    assert (v3.tags["loraflow.canary.result"], json.loads(v3.tags["loraflow.canary.live"])) == ("rolled back", live)
    assert registry.rollout(versions, NAME) is None and "canary" not in v3.aliases
    assert stages(NAME) == {"1": "Archived", "2": "Production", "3": "None", "4": "None"}


def test_a_candidate_that_holds_but_fails_the_production_gate_is_rolled_back(versions):
    versions.set_model_version_tag(NAME, "3", "loraflow.eval.exact_match", "0.40")  # Staging yes, Production no
    assert canary_main("3") == 0
    held = canary.Verdict("promote", ["held at 50% over 100 requests"])
    message = finish_canary(NAME, registry.rollout(versions, NAME), held, {})
    assert message.startswith(f"{NAME} v3: canary rolled back (canary held, but the Production gate refused it: "
                              f"{NAME} v3 does not pass the Production gate (exact_match)")
    assert stages(NAME) == {"1": "Production", "2": "None", "3": "None", "4": "None"}
    assert registry.rollout(versions, NAME) is None


# -- a person's change of Production wins over a rollout ---------------------------------------------
HELD = canary.Verdict("promote", ["held at 50% over 100 requests"])


def test_a_persons_promotion_during_a_canary_ends_it_and_the_servers_verdict_does_nothing(versions, capsys):
    assert canary_main("2") == 0
    judged = registry.rollout(versions, NAME)
    assert judged["production"] == "1"
    capsys.readouterr()
    assert entry_points.main("promote", ["--name", NAME, "--version", "3", "--reason", "v3 now"]) == 0
    assert f"{NAME} v2: canary stopped (Production changed: v3 moved to Production)" in capsys.readouterr().out
    assert registry.rollout(versions, NAME) is None
    v2 = versions.get_model_version(NAME, "2")
    assert "canary" not in v2.aliases and v2.tags["loraflow.canary.result"] == "stopped"

    # The server judged v2 before it saw the change: its verdict finds the rollout gone.
    assert finish_canary(NAME, judged, HELD, {}) == f"{NAME}: the rollout changed meanwhile; nothing done"
    assert stages(NAME) == {"1": "Archived", "2": "None", "3": "Production", "4": "None"}
    assert str(versions.get_model_version_by_alias(NAME, "production").version) == "3"


def test_a_rollback_during_a_canary_ends_it(versions, capsys):
    assert entry_points.main("promote", ["--name", NAME, "--version", "2"]) == 0
    assert canary_main("3") == 0
    capsys.readouterr()
    assert entry_points.main("rollback", ["--name", NAME, "--reason", "v2 misbehaves"]) == 0
    assert f"{NAME} v3: canary stopped (Production rolled back to v1)" in capsys.readouterr().out
    assert registry.rollout(versions, NAME) is None
    assert stages(NAME) == {"1": "Production", "2": "Archived", "3": "None", "4": "None"}


def test_a_verdict_against_a_production_changed_outside_loraflow_stops_the_rollout(versions):
    assert canary_main("2") == 0
    judged = registry.rollout(versions, NAME)
    versions.transition_model_version_stage(NAME, "3", "Production", archive_existing_versions=False)  # the UI
    versions.transition_model_version_stage(NAME, "1", "Archived")
    assert finish_canary(NAME, judged, HELD, {}) == (
        f"{NAME} v2: canary stopped (Production is v3, not v1 that the canary was judged against; nothing judged)")
    assert stages(NAME) == {"1": "Archived", "2": "None", "3": "Production", "4": "None"}
    assert registry.rollout(versions, NAME) is None
    assert versions.get_model_version(NAME, "2").tags["loraflow.canary.result"] == "stopped"
