"""The ViGGO scorer on golden cases, and on every reference MR the data set ships."""

import json
from pathlib import Path

import pytest

from evaluation import viggo
from loraflow import tasks

pytestmark = pytest.mark.unit  # pure logic: the fast tier (pytest -m unit)

ROOT = Path(__file__).resolve().parents[1]
CASES = [json.loads(line) for line in (ROOT / "evaluation/golden/viggo_cases.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_golden_case(case):
    metrics = viggo.score([case["expected"]], [case["generated"]])
    assert metrics["exact_match"] == float(case["exact"])
    assert metrics["parse_validity"] == float(case["valid"])
    assert metrics["intent_accuracy"] == float(case["intent"])
    expected_precision = case["matched"] / case["n_generated"] if case["n_generated"] else 0.0
    assert metrics["slot_precision"] == pytest.approx(expected_precision)
    assert metrics["slot_recall"] == pytest.approx(case["matched"] / case["n_expected"])


def test_every_reference_in_the_data_parses():
    for split in ("train", "val", "test"):
        for line in (ROOT / f"data/viggo/{split}.jsonl").read_text().splitlines():
            output = json.loads(line)["output"]
            assert viggo.parse(output) is not None, output


def test_guided_decoding_regex_accepts_every_reference_and_rejects_invalid_output():
    import re

    pattern = re.compile(viggo.mr_regex())
    for line in (ROOT / "data/viggo/test.jsonl").read_text().splitlines():
        assert pattern.fullmatch(json.loads(line)["output"])
    for case in CASES:
        if not case["valid"] and "repeated" not in case["case"]:
            assert not pattern.fullmatch(case["generated"]), case["case"]


def test_corpus_scores_are_micro_averaged():
    refs = [c["expected"] for c in CASES]
    gens = [c["generated"] for c in CASES]
    metrics = viggo.score(refs, gens)
    matched = sum(c["matched"] for c in CASES)
    assert metrics["slot_precision"] == pytest.approx(matched / sum(c["n_generated"] for c in CASES))
    assert metrics["slot_recall"] == pytest.approx(matched / sum(c["n_expected"] for c in CASES))
    p, r = metrics["slot_precision"], metrics["slot_recall"]
    assert metrics["slot_f1"] == pytest.approx(2 * p * r / (p + r))
    assert metrics["rows"] == len(CASES)


def test_per_intent_breakdown():
    by_intent = tasks.score_slices(viggo.TASK, [c.get("input", "") for c in CASES], [c["expected"] for c in CASES],
                                   [c["generated"] for c in CASES])
    assert by_intent["give_opinion"]["exact_match"] == 0.0
    assert by_intent["request_attribute"]["exact_match"] == 1.0
    assert sum(m["rows"] for m in by_intent.values()) == len(CASES)


def test_bad_inputs():
    with pytest.raises(ValueError, match="no rows"):
        viggo.score([], [])
    with pytest.raises(ValueError, match="2 references but 1 generations"):
        viggo.score(["a", "b"], ["a"])
