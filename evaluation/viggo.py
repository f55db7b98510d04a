"""The ViGGO task `viggo-mr`: a sentence about a video game -> its meaning representation,
`function(attr[value], attr[value], ...)`.

Pure functions, no dependencies: `TASK` is what loraflow's evaluate, promotion gates, serve and
canary use (src/loraflow/tasks.py), and tests/test_viggo_scorer.py checks the scorer on the golden
cases in golden/viggo_cases.jsonl.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

FUNCTIONS = (
    "inform", "request", "give_opinion", "confirm", "verify_attribute", "suggest",
    "request_explanation", "recommend", "request_attribute",
)
ATTRIBUTES = (
    "name", "exp_release_date", "release_year", "developer", "esrb", "rating", "genres",
    "player_perspective", "has_multiplayer", "platforms", "available_on_steam",
    "has_linux_release", "has_mac_release", "specifier",
)
_FRAME = re.compile(r"\s*([a-z_]+)\((.*)\)\s*", re.DOTALL)
_SLOT = re.compile(r"\s*([a-z_]+)\[([^\[\]]*)\]\s*(,|$)")


@dataclass(frozen=True)
class MeaningRepresentation:
    function: str
    slots: frozenset[tuple[str, str]]  # (attribute, value): order does not matter


def parse(text: str) -> MeaningRepresentation | None:
    """The MR in `text`, or None when it is not one valid MR (allowed function and attributes,
    each attribute once, nothing else around it)."""
    frame = _FRAME.fullmatch(text)
    if not frame or frame.group(1) not in FUNCTIONS:
        return None
    body, slots, pos = frame.group(2), [], 0
    while pos < len(body):
        slot = _SLOT.match(body, pos)
        if not slot or slot.group(1) not in ATTRIBUTES:
            return None
        slots.append((slot.group(1), " ".join(slot.group(2).split())))
        pos = slot.end()
        if slot.group(3) == "," and pos >= len(body):
            return None  # trailing comma
    if len({attr for attr, _ in slots}) != len(slots):
        return None
    return MeaningRepresentation(frame.group(1), frozenset(slots))


def mr_regex() -> str:
    """A regular expression for well-formed MRs (allowed function, allowed attributes, one
    `attr[value]` each, comma-separated) for vLLM's structured outputs. It cannot forbid a
    repeated attribute; `parse` still rejects those."""
    attribute = "(" + "|".join(ATTRIBUTES) + r")\[[^\[\]\n]*\]"
    return "(" + "|".join(FUNCTIONS) + r")\(" + attribute + "(, " + attribute + r")*\)"


def exact_match(expected: str, generated: str) -> bool:
    """The seed tutorial's metric: the generated text equals the reference string exactly."""
    return generated == expected


def score(expected: list[str], generated: list[str]) -> dict[str, float]:
    """Corpus-level metrics; slot scores are micro-averaged over all rows."""
    if len(expected) != len(generated):
        raise ValueError(f"{len(expected)} references but {len(generated)} generations")
    if not expected:
        raise ValueError("nothing to score: no rows")
    counts = defaultdict(float)
    for ref_text, gen_text in zip(expected, generated):
        ref, gen = parse(ref_text), parse(gen_text)
        counts["exact_match"] += exact_match(ref_text, gen_text)
        counts["parse_ok"] += gen is not None
        gen_slots = gen.slots if gen else frozenset()
        ref_slots = ref.slots if ref else frozenset()
        counts["intent_correct"] += bool(gen and ref and gen.function == ref.function)
        counts["slots_matched"] += len(gen_slots & ref_slots)
        counts["slots_generated"] += len(gen_slots)
        counts["slots_expected"] += len(ref_slots)
    n = len(expected)
    precision = _ratio(counts["slots_matched"], counts["slots_generated"])
    recall = _ratio(counts["slots_matched"], counts["slots_expected"])
    return {
        "exact_match": counts["exact_match"] / n,
        "intent_accuracy": counts["intent_correct"] / n,
        "slot_precision": precision,
        "slot_recall": recall,
        "slot_f1": _ratio(2 * precision * recall, precision + recall),
        "parse_validity": counts["parse_ok"] / n,
        "rows": float(n),
    }


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


class MeaningRepresentationTask:
    """loraflow's task protocol (src/loraflow/tasks.py) for ViGGO's meaning representations."""

    name = "viggo-mr"
    headline = "exact_match"
    recorded = ("exact_match", "parse_validity", "intent_accuracy", "slot_f1", "rows")
    slice_name = "intent"

    def is_valid(self, given: str, answer: str) -> bool:
        return parse(answer) is not None

    def score(self, inputs: list[str], expected: list[str], generated: list[str]) -> dict[str, float]:
        return score(expected, generated)

    def slice_of(self, given: str, text: str) -> str | None:
        parsed = parse(text)
        return parsed.function if parsed else None

    def guided_regex(self) -> str | None:
        return mr_regex()


TASK = MeaningRepresentationTask()
