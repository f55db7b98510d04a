"""Tasks and the prompts versions were trained with (src/loraflow/tasks.py)."""

import json

import pytest
from conftest import VIGGO

from evaluation import viggo, viggo_nlg
from loraflow import registry, tasks
from loraflow.errors import UserError

INSTRUCTION = json.loads((VIGGO / "train.jsonl").open().readline())["instruction"]


@pytest.mark.unit
def test_the_tasks_are_found_by_name_and_an_unknown_one_is_named():
    assert (tasks.get("viggo-mr"), tasks.get("viggo-nlg")) == (viggo.TASK, viggo_nlg.TASK)
    assert tasks.names() == ["viggo-mr", "viggo-nlg"]
    with pytest.raises(UserError) as refused:
        tasks.get("viggo")
    assert str(refused.value) == "task 'viggo' is not one loraflow knows: use one of ['viggo-mr', 'viggo-nlg']."
    assert tasks.recordable_metrics() == (
        "exact_match", "baseline_exact_match", "parse_validity", "baseline_parse_validity", "intent_accuracy",
        "baseline_intent_accuracy", "slot_f1", "baseline_slot_f1", "rows", "baseline_rows", "bleu", "baseline_bleu",
        "slot_error_rate", "baseline_slot_error_rate")


MR = "inform(name[Dirt: Showdown], release_year[2012], platforms[PlayStation, Xbox, PC], rating[good], esrb[E])"


@pytest.mark.unit
@pytest.mark.parametrize("sentence, missing", [
    ("Dirt: Showdown came out in 2012 on PlayStation, Xbox and PC, and it is rated E: a good game.", []),
    ("dirt: showdown (2012) is on the playstation, xbox and pc.", []),  # case does not matter
    ("Dirt: Showdown is a good game for the PlayStation.", ["Xbox", "PC", "2012"]),
    ("", ["Dirt: Showdown", "PlayStation", "Xbox", "PC", "2012"]),
], ids=["all", "lower_case", "three_missing", "empty"])
def test_the_data_to_text_live_check_needs_only_the_meaning_representation(sentence, missing):
    """Only the slots a sentence says verbatim are checked: rating and ESRB may be paraphrased."""
    assert viggo_nlg.missing(MR, sentence) == missing
    assert viggo_nlg.TASK.is_valid(MR, sentence) is (not missing and bool(sentence))


@pytest.mark.unit
def test_the_data_to_text_scores_are_sacrebleus_bleu_and_the_slot_error_rate():
    import sacrebleu

    inputs = [MR, "request(specifier[exciting], player_perspective[first person])"]
    expected = ["Dirt: Showdown came out in 2012 on PlayStation, Xbox and PC.",
                "What is an exciting first person game?"]
    generated = ["Dirt: Showdown came out in 2012 on PlayStation.", "Which exciting first person game do you like?"]
    scores = viggo_nlg.TASK.score(inputs, expected, generated)
    assert scores == {"bleu": pytest.approx(sacrebleu.corpus_bleu(generated, [expected]).score / 100),
                      "slot_error_rate": 2 / 6, "parse_validity": 0.5, "rows": 2.0}
    assert viggo_nlg.TASK.score(inputs, expected, expected)["bleu"] == pytest.approx(1.0)
    assert tasks.score_slices(viggo_nlg.TASK, inputs, expected, generated).keys() == {"inform", "request"}


@pytest.mark.unit
def test_the_data_to_text_splits_are_what_make_py_writes():
    from importlib import util

    spec = util.spec_from_file_location("make", VIGGO.parent / "viggo-nlg" / "make.py")
    make = util.module_from_spec(spec)
    spec.loader.exec_module(make)
    for name, text in make.files().items():
        assert (VIGGO.parent / "viggo-nlg" / name).read_text(encoding="utf-8") == text, name
    [first] = [json.loads(line) for line in (VIGGO.parent / "viggo-nlg" / "test.jsonl").open()][:1]
    [source] = [json.loads(line) for line in (VIGGO / "test.jsonl").open()][:1]
    assert (first["input"], first["output"]) == (source["output"], source["input"])


@pytest.mark.unit
def test_a_prompt_puts_the_instruction_and_the_input_in_one_user_message_as_alpaca_training_did():
    assert tasks.Prompt("prompts:/p/1", "Parse it.").messages("Diablo II is great.") \
        == [{"role": "user", "content": "Parse it.\nDiablo II is great."}]
    assert tasks.Prompt("prompts:/p/2", "").messages("Diablo II is great.") \
        == [{"role": "user", "content": "Diablo II is great."}]


@pytest.mark.unit
@pytest.mark.parametrize("messages, given", [
    ([{"role": "user", "content": "Diablo II is great."}], "Diablo II is great."),
    ([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Diablo II is great."}], None),
    ([{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
      {"role": "user", "content": "Diablo II is great."}], None),
    ([{"role": "user", "content": [{"type": "text", "text": "Diablo II is great."}]}], None),
    ([{"role": "assistant", "content": "Diablo II is great."}], None),
    ([], None),
    (None, None),
], ids=["one_user_message", "own_system_message", "several_turns", "content_parts", "not_a_user", "empty", "none"])
def test_only_a_chat_of_one_user_message_of_text_is_the_tasks_input(messages, given):
    assert tasks.task_input(messages) == given


@pytest.mark.unit
@pytest.mark.parametrize("instructions, message", [
    (["A", "B"],
     "dataset viggo-train: the rows carry 2 different instructions; a task trains with one prompt, so give every "
     "row the same instruction (or split the data into one dataset a task)."),
    (["Fill {{slot}}"],
     "dataset viggo-train: the instruction contains '{{' or '}}', which the MLflow Prompt Registry reads as a "
     "template variable; rephrase it without double braces."),
], ids=["two_instructions", "braces"])
def test_training_rows_must_share_one_instruction_the_registry_can_keep(instructions, message):
    with pytest.raises(UserError) as refused:
        tasks.instruction_of(instructions, "dataset viggo-train")
    assert str(refused.value) == message


@pytest.mark.unit
def test_slices_are_scored_on_their_own():
    expected = ["inform(name[A])", "inform(name[B])", "request(specifier[C])", "not an MR"]
    generated = ["inform(name[A])", "inform(name[X])", "request(specifier[C])", "inform(name[A])"]
    by_slice = tasks.score_slices(viggo.TASK, [""] * 4, expected, generated)
    assert {label: (scores["exact_match"], scores["rows"]) for label, scores in by_slice.items()} \
        == {"inform": (0.5, 2.0), "request": (1.0, 1.0), "unparsable_reference": (0.0, 1.0)}


def test_a_prompt_is_registered_once_per_text_linked_to_each_run_and_read_back(tracking_uri):
    from mlflow import MlflowClient

    client = MlflowClient()
    runs = [client.create_run("0").info.run_id for _ in range(3)]
    first = tasks.register_prompt(viggo.TASK, INSTRUCTION, runs[0])
    again = tasks.register_prompt(viggo.TASK, INSTRUCTION, runs[1])
    short = tasks.register_prompt(viggo.TASK, "Give the meaning representation.", runs[2])
    assert (first.uri, again.uri, short.uri) == ("prompts:/viggo-mr-instruction/1",) * 2 + (
        "prompts:/viggo-mr-instruction/2",)
    assert tasks.load_prompt(client, first.uri) == tasks.Prompt(first.uri, INSTRUCTION)
    assert tasks.load_prompt(client, short.uri).messages("x") \
        == [{"role": "user", "content": "Give the meaning representation.\nx"}]
    # The Prompt Registry's own formatting gives the same messages.
    assert client.load_prompt(first.uri).format(input="x") == first.messages("x")
    for run_id, uri in zip(runs, (first.uri, first.uri, short.uri)):
        assert json.loads(client.get_run(run_id).data.tags["mlflow.linkedPrompts"]) \
            == [{"name": "viggo-mr-instruction", "version": uri.rsplit("/", 1)[1]}]
    assert client.search_registered_models() == []  # prompts are not registered models

    found = tasks.of_tags({registry.TASK_TAG: "viggo-mr", registry.PROMPT_TAG: short.uri}, "v3")
    assert found == (viggo.TASK, tasks.Prompt(short.uri, "Give the meaning representation."))
    with pytest.raises(UserError) as refused:
        tasks.of_tags({registry.TASK_TAG: "viggo-mr"}, "viggo-tiny-lora v3")
    assert str(refused.value) == ("viggo-tiny-lora v3 records no task or prompt (loraflow.task, loraflow.prompt): it "
                                  "was registered by an older loraflow or by hand; train a new version.")
