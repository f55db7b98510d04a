"""Each entry point is declared once, in src/loraflow/entry_points.py: MLproject (the command line
`mlflow run` users see) is generated from the declarations, and so is the command line the code
reads; each job function takes exactly the declared parameters."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from loraflow import entry_points
from loraflow.entry_points import ENTRY_POINTS

pytestmark = pytest.mark.unit


def test_mlproject_is_generated_from_the_declarations():
    assert (ROOT / "MLproject").read_text() == entry_points.mlproject_text(), (
        "MLproject differs from src/loraflow/entry_points.py: regenerate it with "
        "`.venvs/train/bin/python -m loraflow.entry_points > MLproject`")


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_each_job_takes_exactly_its_declared_parameters(name):
    point = ENTRY_POINTS[name]
    module, _, function = point.function.partition(":")
    job = getattr(importlib.import_module(module), function)
    assert list(inspect.signature(job).parameters) == [param.name for param in point.params]


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_the_command_line_has_each_parameter_with_mlprojects_default(name):
    declared = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"][name]["parameters"]
    options = {action.dest: action for action in entry_points.parser(ENTRY_POINTS[name])._actions
               if action.option_strings and action.dest != "help"}
    assert set(options) == set(declared)
    for param, spec in declared.items():
        action = options[param]
        assert action.option_strings == ["--" + param.replace("_", "-")]
        if "default" not in spec:
            assert action.required, param
        elif spec["type"] == "path":  # MLflow makes it absolute, relative to the project
            assert Path(action.default) == ROOT / spec["default"], param
        else:
            assert action.default == spec["default"], param


def test_the_default_registered_model_is_the_default_training_configs():
    config = yaml.safe_load((ROOT / "configs/train/default.yaml").read_text())
    assert config["registered_model_name"] == entry_points.DEFAULT_MODEL_NAME


def test_every_config_parameter_is_a_path():
    """MLflow makes a `path` absolute (the jobs may run from elsewhere) and refuses a missing one."""
    configs = {f"{point.name}.{param.name}": param.kind for point in ENTRY_POINTS.values() for param in point.params
               if param.name == "config" or param.name.endswith("_config")}
    assert len(configs) == 8 and set(configs.values()) == {"path"}


def test_run_py_names_the_entry_points_when_given_none_of_them(capsys):
    assert entry_points.run_script(["nope"]) == 2
    assert capsys.readouterr().err == ("usage: python mlproject/run.py {train,evaluate,pipeline,promote,rollback,"
                                       "deliver,lineage,export_traces,serve} [--option value ...]\n")


def _documented_commands() -> list[tuple[str, str]]:
    """Every `mlflow run . -e NAME ...` in the README and docs/ (a shell line continued with `\\`
    read whole), with where it is."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if doc.name == "benchmarks-log.md":  # a dated notebook: commands of their day
            continue
        text = doc.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            for command in re.findall(r"mlflow run \. -e [^`&;|]*", line):
                found.append((doc.name, command))
    return found


def test_every_documented_mlflow_run_names_a_real_entry_point_and_parameters():
    commands = _documented_commands()
    assert len(commands) >= 20, commands
    for doc, command in commands:
        name = command.split()[4]
        if name == "NAME":  # the general form
            continue
        assert name in ENTRY_POINTS, f"{doc}: {command}"
        declared = {param.name for param in ENTRY_POINTS[name].parameters}
        given = re.findall(r"-P ([a-z_]+)=", command)
        assert set(given) <= declared, f"{doc}: {command} gives {set(given) - declared}, not parameters of {name}"
        for path in re.findall(r"-P \w*config=(configs/\S+\.yaml)", command):
            assert (ROOT / path).is_file(), f"{doc}: {command} names {path}, which does not exist"
