"""The jobs' config schemas (job_configs.py): every key described, and the reference in docs/configs.md
generated from them. test_refusals.py checks each job's refusals of bad configs; test_shipped_configs.py
that every shipped config loads and builds Ray's own config objects."""

from __future__ import annotations

import pytest
from conftest import ROOT

from loraflow import job_configs

pytestmark = pytest.mark.unit


def _schemas():
    found, todo = [], [job_configs.EvaluateConfig, job_configs.ServeConfig, job_configs.PromoteConfig]
    while todo:
        schema = todo.pop()
        found.append(schema)
        todo += [inner for field in schema.model_fields.values() for inner in job_configs._schemas_in(field.annotation)
                 if inner not in found and inner not in todo]
    return found


@pytest.mark.parametrize("schema", _schemas(), ids=lambda schema: schema.__name__)
def test_every_key_says_what_it_is_for(schema):
    assert schema.__doc__
    assert [name for name, field in schema.model_fields.items() if not field.description] == []


def test_docs_configs_md_is_the_schemas_reference():
    """Regenerate it with `python -m loraflow.job_configs > docs/configs.md`."""
    assert (ROOT / "docs" / "configs.md").read_text() == job_configs.reference()


@pytest.mark.parametrize("text, meant", [("true", True), ("Yes", True), ("1", True), ("false", False), ("no", False),
                                         ("0", False)])
def test_every_true_false_parameter_reads_the_same_words(text, meant):
    from loraflow.errors import parse_bool

    assert parse_bool("force", text) is meant


def test_a_verbose_flag_that_is_not_true_or_false_is_refused_before_the_job_runs(capsys):
    from loraflow.jobs import run_job

    ran = []
    assert run_job(lambda: ran.append(1), "interrupted", verbose="loud") == 2
    assert capsys.readouterr().err == "error: verbose must be true or false, not 'loud'.\n"
    assert ran == []


def test_evaluate_logs_engine_env_by_name_only():
    """evaluate's run parameters: the config, with engine_env's variables named and their values left out."""
    from loraflow import evaluate

    config = evaluate.load_config(str(ROOT / "configs/evaluate/default.yaml"))
    params = evaluate.run_params(config.model_copy(update={"engine_env": {"OMP_NUM_THREADS": "value-not-logged"}}))
    assert params["engine_env"] == "OMP_NUM_THREADS" and params["engine.max_lora_rank"] == "16"
    assert "value-not-logged" not in repr(params)
