"""The registry contract (src/loraflow/registry.py) on its own: the documented tag table, the
parsing of model references, stage names, adapter ids. Pure logic: no store, no Ray."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from conftest import ROOT
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST

from loraflow import registry
from loraflow.errors import UserError

pytestmark = pytest.mark.unit  # pure logic: the fast tier (pytest -m unit)


def _documented_tags() -> set[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text[text.index("## Registry contract"):text.index("## Where state lives")]
    return {name for row in table.splitlines() if row.startswith("| `loraflow.")
            for name in re.findall(r"`(loraflow\.[a-z0-9_.<>]+)`", row.split("|")[1])}


def test_the_contract_table_lists_every_tag_the_module_names():
    names = {value for key, value in vars(registry).items() if key.endswith("_TAG") and isinstance(value, str)}
    prefixes = {value + "<" for key, value in vars(registry).items() if key.endswith("_TAG_PREFIX")}
    documented = _documented_tags()
    assert all(name.startswith("loraflow.") for name in names | prefixes)  # one namespace
    assert names <= documented, f"tags missing from docs/architecture.md: {sorted(names - documented)}"
    assert {p for p in prefixes if not any(d.startswith(p) for d in documented)} == set()
    documented_plain = {d for d in documented if "<" not in d}
    assert documented_plain <= names, f"documented but not in registry.py: {sorted(documented_plain - names)}"


@pytest.mark.parametrize("text, parsed", [
    ("models:/viggo/3", ("viggo", "3", None, None)),
    ("models:/viggo@production", ("viggo", None, "production", None)),
    ("models:/viggo/Production", ("viggo", None, None, "Production")),
    ("models:/team/viggo/2", ("team/viggo", "2", None, None)),
])
def test_model_references_name_a_number_an_alias_or_a_stage(text, parsed):
    assert registry._parse_models_uri(text) == parsed


@pytest.mark.parametrize("text, message", [
    ("viggo/1", "Model reference 'viggo/1' is not understood: use models:/NAME/VERSION, models:/NAME@ALIAS, "
                "models:/NAME/STAGE (Staging, Production, Archived) or a run id."),
    ("models:/viggo/latest", "Model reference 'models:/viggo/latest': 'latest' is neither a version number nor a "
                             "stage."),
])
def test_references_it_cannot_read_are_refused(text, message):
    with pytest.raises(UserError) as refused:
        registry._parse_models_uri(text)
    assert str(refused.value) == message


def test_stage_names_are_matched_without_case_and_unknown_ones_refused():
    assert [registry.stage_named(s) for s in (" staging ", "PRODUCTION", "archived")] == list(registry.STAGES)
    with pytest.raises(UserError, match=r"^Unknown stage 'Prod': use one of Staging, Production, Archived\.$"):
        registry.stage_named("Prod")


def test_a_versions_adapter_id_and_its_evaluation_figures():
    version = SimpleNamespace(name="viggo-smollm2-lora", version="3", tags={
        "loraflow.eval.exact_match": "0.505", "loraflow.eval.rows": "1083", "loraflow.eval.run_id": "abc",
        "loraflow.eval.made_up": "1", "loraflow.lora_rank": "16"})
    assert registry.adapter_id(version) == "viggo-smollm2-lora-v3"
    assert registry.eval_metrics(version) == {"exact_match": 0.505, "rows": 1083.0}


@pytest.mark.unit
def test_a_base_models_identity_covers_its_tokenizer_and_chat_template(tmp_path):
    """An adapter answers well only with the prompt tokens it was trained on: a base model whose
    tokenizer, chat template or generation defaults changed is another base model."""
    from loraflow import base_models

    folder = tmp_path / "Tiny-Model"
    folder.mkdir()
    files = {"config.json": "{}", "model.safetensors": "weights", "tokenizer.json": "{}",
             "tokenizer_config.json": '{"chat_template": "A"}', "chat_template.jinja": "A",
             "generation_config.json": "{}", "README.md": "about"}
    for name, text in files.items():
        (folder / name).write_text(text)
    first = base_models.base_model_identity(str(folder))
    assert first.startswith("Tiny-Model@sha256:")
    (folder / "README.md").write_text("about it, longer")
    assert base_models.base_model_identity(str(folder)) == first
    seen = {first}
    for name in ("tokenizer_config.json", "chat_template.jinja", "tokenizer.json", "generation_config.json"):
        (folder / name).write_text(files[name] + " ")
        identity = base_models.base_model_identity(str(folder))
        assert identity not in seen, name
        seen.add(identity)


def _store_that(fails_with: int):
    """A registry client whose lookups fail with that MLflow error code, while its listing answers."""
    from mlflow.exceptions import MlflowException

    def lookup(*_):
        raise MlflowException("(sqlite3.OperationalError) database is locked", error_code=fails_with)

    listed = [SimpleNamespace(name="viggo")]
    return SimpleNamespace(get_registered_model=lookup, get_model_version=lookup, get_model_version_by_alias=lookup,
                           search_registered_models=lambda: listed)


def test_a_store_that_fails_to_answer_is_not_taken_to_say_the_model_is_gone(monkeypatch):
    """A locked database or a timeout re-raises (a server keeps what it serves) rather than reading as
    "there is no registered model", which made a server withdraw a model it served (CI, 2026-12-07)."""
    monkeypatch.setattr(registry, "_store_shown", lambda: "sqlite:///mlflow.db")
    for lookup in (lambda c: registry.registered_model(c, "viggo"),
                   lambda c: registry.find_version("viggo", alias="production", client=c)):
        with pytest.raises(Exception) as failed:
            lookup(_store_that(INTERNAL_ERROR))
        assert type(failed.value).__name__ == "MlflowException" and "database is locked" in str(failed.value)
    with pytest.raises(UserError) as missing:
        registry.registered_model(_store_that(RESOURCE_DOES_NOT_EXIST), "viggo")
    assert str(missing.value) == ("There is no registered model 'viggo' in sqlite:///mlflow.db; registered models: "
                                  "viggo. Train one with `mlflow run . -e train`.")
