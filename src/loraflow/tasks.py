"""What an adapter is trained to do, and the instruction it was trained with.

A task (evaluation/<task>.py, pure code) says whether an answer to an input is valid (serve's
live signal and the canary's: a reference-free check), scores answers against references
(evaluate's metrics, which the promotion gates check), groups rows into slices (ViGGO: by intent),
and may give vLLM a pattern to constrain decoding. A version's prompt is the instruction its
training rows carried, kept as a version of an MLflow Prompt Registry prompt: train records both
on the version (TASK_TAG, PROMPT_TAG), and evaluate, serve and export_traces build every request's
messages from them with `Prompt.messages`, which joins instruction and input as LLaMA-Factory's
alpaca format did in training.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

from loraflow.errors import UserError
from loraflow.registry import PROMPT_TAG, TASK_TAG

_BUILT_IN = {"viggo-mr": "evaluation.viggo", "viggo-nlg": "evaluation.viggo_nlg"}  # name -> the module whose TASK it is
_INPUT = "{{input}}"  # where the Prompt Registry's template takes the request's input


class Task(Protocol):
    name: str
    headline: str  # the metric that slices and the base model (baseline) are compared on
    recorded: tuple[str, ...]  # metrics evaluate records on a version, which promotion gates may check
    slice_name: str  # what `slice_of` groups rows by, as metric names say it (intent_<slice>_<metric>)

    def is_valid(self, given: str, answer: str) -> bool: ...  # `given`: the input the answer is to

    def score(self, inputs: list[str], expected: list[str], generated: list[str]) -> dict[str, float]: ...

    def slice_of(self, given: str, text: str) -> str | None: ...  # `text`: a reference or an answer to `given`

    def guided_regex(self) -> str | None: ...


def get(name: str) -> Task:
    if name not in _BUILT_IN:
        raise UserError(f"task {name!r} is not one loraflow knows: use one of {sorted(_BUILT_IN)}.")
    return importlib.import_module(_BUILT_IN[name]).TASK


def names() -> list[str]:
    return sorted(_BUILT_IN)


def recordable_metrics() -> tuple[str, ...]:
    """Every metric some task's evaluation records on a version (with the base model's, baseline_*):
    what a promotion config may name."""
    found = [name for task in map(get, _BUILT_IN) for metric in task.recorded
             for name in (metric, f"baseline_{metric}")]
    return tuple(dict.fromkeys(found))


def score_slices(task: Task, inputs: list[str], expected: list[str],
                 generated: list[str]) -> dict[str, dict[str, float]]:
    """`task.score` for each slice of the references separately (`unparsable_reference`: none)."""
    groups: dict[str, tuple[list[str], list[str], list[str]]] = {}
    for given, reference, answer in zip(inputs, expected, generated, strict=True):
        group = groups.setdefault(task.slice_of(given, reference) or "unparsable_reference", ([], [], []))
        for column, value in zip(group, (given, reference, answer)):
            column.append(value)
    return {label: task.score(*group) for label, group in sorted(groups.items())}


@dataclass(frozen=True)
class Prompt:
    uri: str  # prompts:/<name>/<version>
    instruction: str

    def messages(self, text: str) -> list[dict]:
        """The chat a row's or a request's input becomes: LLaMA-Factory's alpaca format puts the
        instruction and the input in one user message, a line break between them (no system
        message: the model's template adds its default one, which training names as default_system)."""
        return [{"role": "user", "content": f"{self.instruction}\n{text}" if self.instruction else text}]


def task_input(messages) -> str | None:
    """The task's input, when a chat is one user message of text: what serve asks the engine with
    the version's prompt (`Prompt.messages`) and what export_traces turns back into a training row.
    None for any other chat (a system message of the client's own, several turns, content parts)."""
    if (isinstance(messages, list) and len(messages) == 1 and isinstance(messages[0], dict)
            and messages[0].get("role") == "user" and isinstance(messages[0].get("content"), str)):
        return messages[0]["content"]
    return None


def prompt_name(task: Task) -> str:
    return f"{task.name}-instruction"


def instruction_of(instructions: list[str], where: str) -> str:
    """The one instruction that every training row carries (a task trains with one prompt; "" is none)."""
    found = set(instructions)
    if len(found) != 1:
        raise UserError(f"{where}: the rows carry {len(found)} different instructions; a task trains with one "
                        "prompt, so give every row the same instruction (or split the data into one dataset a task).")
    [instruction] = found
    if "{{" in instruction or "}}" in instruction:
        raise UserError(f"{where}: the instruction contains '{{{{' or '}}}}', which the MLflow Prompt Registry "
                        "reads as a template variable; rephrase it without double braces.")
    return instruction


def register_prompt(task: Task, instruction: str, run_id: str) -> Prompt:
    """The Prompt Registry's version holding `instruction` (a new version only when the text is new),
    linked to the train run that used it."""
    from mlflow import MlflowClient

    client = MlflowClient()
    name, template = prompt_name(task), [{"role": "user", "content": _template(instruction)}]
    known = client.search_prompt_versions(name) if client.get_prompt(name) else []
    same = [version for version in known if version.template == template]
    version = same[0] if same else client.register_prompt(
        name, template, commit_message=f"trained with by run {run_id}", tags={TASK_TAG: task.name})
    client.link_prompt_version_to_run(run_id, version)
    return Prompt(version.uri, instruction)


def of_version(version) -> tuple[Task, Prompt]:
    """The task and prompt a registered version was trained with."""
    return of_tags(version.tags, f"{version.name} v{version.version}")


def of_tags(tags: dict[str, str], label: str) -> tuple[Task, Prompt]:
    """The task and prompt recorded in a version's or a train run's tags."""
    from mlflow import MlflowClient

    if TASK_TAG not in tags or PROMPT_TAG not in tags:
        raise UserError(f"{label} records no task or prompt ({TASK_TAG}, {PROMPT_TAG}): it was registered by an "
                        "older loraflow or by hand; train a new version.")
    return get(tags[TASK_TAG]), load_prompt(MlflowClient(), tags[PROMPT_TAG])


def load_prompt(client, uri: str) -> Prompt:
    template = client.load_prompt(uri).template
    content = template[0]["content"] if isinstance(template, list) and len(template) == 1 else None
    if not isinstance(content, str) or not content.endswith(_INPUT):
        raise UserError(f"{uri} is not a prompt train registered (one user message ending in {_INPUT}).")
    instruction = content[: -len(_INPUT)]
    return Prompt(uri, instruction[:-1] if instruction.endswith("\n") else instruction)


def _template(instruction: str) -> str:
    return f"{instruction}\n{_INPUT}" if instruction else _INPUT
