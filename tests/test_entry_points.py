"""MLproject is the command line users see, argparse the one the code reads: every entry point's
parameters, defaults and required ones are the same in both (a default changed in one place only
would make `mlflow run` and `python mlproject/X.py` behave differently)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from unittest import mock

import pytest
import yaml
from conftest import ROOT

from loraflow import evaluate, pipeline, promote, registry, serve, traces, train

pytestmark = pytest.mark.unit

MAINS = {"train": train.main, "evaluate": evaluate.main, "pipeline": pipeline.main, "promote": promote.main,
         "rollback": promote.rollback_main, "export_traces": traces.main, "serve": serve.main}
ENTRY_POINTS = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]


class _Parsed(Exception):
    pass


def _parser_of(main) -> argparse.ArgumentParser:
    """The parser `main` builds, taken at its parse_args call (nothing of the job runs)."""
    seen = []

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise _Parsed

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), pytest.raises(_Parsed):
        main([])
    return seen[0]


def _same(name: str, mlproject_default, argparse_default) -> bool:
    if name == "config" or name.endswith("_config"):  # MLproject's are relative to the project
        return (ROOT / str(mlproject_default)).resolve() == Path(argparse_default).resolve()
    return str(mlproject_default) == str(argparse_default)


def test_every_entry_point_is_a_loraflow_main():
    assert set(ENTRY_POINTS) == set(MAINS)
    for entry, main in MAINS.items():
        script = (ROOT / "mlproject" / f"{entry}.py").read_text()
        assert f"from {main.__module__} import {main.__name__}" in script


@pytest.mark.parametrize("entry", sorted(MAINS))
def test_mlproject_parameters_are_the_argparse_options_with_the_same_defaults(entry):
    spec = ENTRY_POINTS[entry]
    flags = dict(re.findall(r"(--[\w-]+) \{(\w+)\}", spec["command"]))  # --flag {parameter}
    assert sorted(flags.values()) == sorted(spec["parameters"])
    options = {action.option_strings[0]: action for action in _parser_of(MAINS[entry])._actions
               if action.option_strings and action.dest != "help"}
    assert set(options) == set(flags), "an option missing from MLproject's command, or the reverse"
    for flag, name in flags.items():
        parameter, action = spec["parameters"][name], options[flag]
        if "default" in parameter:
            assert not action.required, f"{entry} {flag}: MLproject has a default, argparse requires it"
            assert _same(name, parameter["default"], action.default), (entry, flag, parameter["default"],
                                                                       action.default)
        else:
            assert action.required, f"{entry} {flag}: required in MLproject, not in argparse"


def test_the_default_registered_model_is_the_default_training_configs():
    config = yaml.safe_load((ROOT / "configs/train/default.yaml").read_text())
    assert config["registered_model_name"] == registry.DEFAULT_MODEL_NAME


def test_every_config_parameter_is_a_path():
    """MLflow makes a `path` absolute (the jobs may run from elsewhere) and refuses a missing one."""
    configs = {f"{entry}.{name}": parameter["type"] for entry, spec in ENTRY_POINTS.items()
               for name, parameter in spec["parameters"].items() if name == "config" or name.endswith("_config")}
    assert len(configs) == 7
    assert {name for name, kind in configs.items() if kind != "path"} == set()
