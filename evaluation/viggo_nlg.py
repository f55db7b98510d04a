"""The ViGGO task `viggo-nlg`: a meaning representation -> a sentence that says it (ViGGO's
original, data-to-text direction; data in data/viggo-nlg).

Scored with sacreBLEU's corpus BLEU against the reference sentences, and by the slot error rate,
ViGGO's standard measure for this direction: the share of the meaning representation's slot values
that the sentence does not mention. The slot error rate needs no reference, only the request's
meaning representation, so it is also the live signal: an answer is valid when it mentions every
value it can be checked for. Only the slots a sentence says verbatim are checked (in the training
sentences: names, developers, years, release dates, platforms and specifiers, 99.9-100% of the
time); ratings, yes/no slots, ESRB ratings, genres and perspectives are said in other words.
"""

from __future__ import annotations

from evaluation import viggo

VERBATIM = ("name", "developer", "release_year", "exp_release_date", "platforms", "specifier")
_LISTS = ("platforms",)  # "PlayStation, Xbox, PC": each item is said on its own


def slot_values(meaning_representation: str) -> list[str]:
    """The values of `meaning_representation` that a sentence must say verbatim; none if it does not parse."""
    parsed = viggo.parse(meaning_representation)
    if parsed is None:
        return []
    return [item for attribute, value in sorted(parsed.slots) if attribute in VERBATIM and value
            for item in (value.split(", ") if attribute in _LISTS else [value])]


def missing(meaning_representation: str, sentence: str) -> list[str]:
    """The values of the meaning representation that the sentence does not mention (case-insensitively)."""
    said = sentence.lower()
    return [value for value in slot_values(meaning_representation) if value.lower() not in said]


class DataToTextTask:
    """loraflow's task protocol (src/loraflow/tasks.py) for sentences from ViGGO's meaning representations."""

    name = "viggo-nlg"
    headline = "bleu"
    recorded = ("bleu", "slot_error_rate", "parse_validity", "rows")
    slice_name = "intent"

    def is_valid(self, given: str, answer: str) -> bool:
        return bool(answer.strip()) and not missing(given, answer)

    def score(self, inputs: list[str], expected: list[str], generated: list[str]) -> dict[str, float]:
        import sacrebleu

        if not (len(inputs) == len(expected) == len(generated)):
            raise ValueError(f"{len(inputs)} inputs, {len(expected)} references and {len(generated)} generations")
        if not expected:
            raise ValueError("nothing to score: no rows")
        values = sum(len(slot_values(given)) for given in inputs)
        errors = sum(len(missing(given, answer)) for given, answer in zip(inputs, generated))
        return {
            "bleu": sacrebleu.corpus_bleu(generated, [expected]).score / 100,  # 0-1, like every other figure
            "slot_error_rate": errors / values if values else 0.0,
            "parse_validity": sum(self.is_valid(g, a) for g, a in zip(inputs, generated)) / len(generated),
            "rows": float(len(generated)),
        }

    def slice_of(self, given: str, text: str) -> str | None:
        parsed = viggo.parse(given)  # the dialogue act asked for, whatever the sentence
        return parsed.function if parsed else None

    def guided_regex(self) -> str | None:
        return None  # free text


TASK = DataToTextTask()
