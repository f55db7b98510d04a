"""Every entry point, declared once: its name, the environment it runs in, the function it runs,
and its parameters with their help and defaults. The command line (argparse) is built from this,
and so is MLproject (`python -m loraflow.entry_points > MLproject`; tests/test_entry_points.py
fails when the file differs). One script starts any of them: `python mlproject/run.py NAME
--option value ...`, which is what `mlflow run . -e NAME -P option=value` runs.

Parameters are text, as MLflow passes them; `flag` ones are parsed as true/false before the job
runs. This module imports nothing heavy: run.py moves into the right environment after reading
it and before the job's module is imported."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass

import yaml

from loraflow import envs
from loraflow.errors import parse_bool
from loraflow.jobs import run_job

DEFAULT_MODEL_NAME = "viggo-smollm2-lora"  # configs/train/default.yaml's registered_model_name


@dataclass(frozen=True)
class Param:
    name: str
    help: str
    default: str | None = None  # None: required
    kind: str = "string"  # string; path: a file MLflow makes absolute (and refuses when missing); flag: true/false

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class EntryPoint:
    name: str
    environment: str  # "train" or "infer" (envs.py)
    function: str  # module:function, called with the parameters (but verbose) as keywords
    description: str
    params: tuple[Param, ...]
    interrupted: str = "interrupted"  # what Ctrl-C or SIGTERM prints
    interrupted_code: int = 130

    @property
    def parameters(self) -> tuple[Param, ...]:
        return (*self.params, VERBOSE)


VERBOSE = Param("verbose", "true: stream every library's and Ray worker's log lines (LORAFLOW_VERBOSE=1 does the "
                "same); false: results, errors and progress bars only", "false", "flag")
_NAME = Param("name", "registered model name", DEFAULT_MODEL_NAME)

ENTRY_POINTS = {point.name: point for point in (
    EntryPoint(
        "train", "train", "loraflow.train:job",
        "Fine-tune a LoRA adapter with LLaMA-Factory on Ray Train, log it to MLflow and register it as a new "
        "model version.",
        (Param("config", "training YAML (LLaMA-Factory keys + ray_* keys)", "configs/train/default.yaml", "path"),
         Param("overrides", "YAML mapping of config keys to replace, e.g. '{max_samples: 50}'", ""),
         Param("resume", "run id of a training that was killed or failed: continue from its last checkpoint, "
                         "with its config, into a new run linked to it (config and overrides are then ignored)", "")),
        interrupted="interrupted: the run is marked KILLED and nothing was registered"),
    EntryPoint(
        "evaluate", "infer", "loraflow.evaluate:job",
        "Evaluate a registered LoRA adapter on its test split with vLLM through Ray Data LLM, and log per-row "
        "predictions and metrics to MLflow.",
        (Param("model", "models:/NAME/VERSION, models:/NAME@ALIAS, models:/NAME/STAGE or a run id"),
         Param("config", "evaluation YAML", "configs/evaluate/default.yaml", "path")),
        interrupted="interrupted: the evaluation run is marked KILLED"),
    EntryPoint(
        "pipeline", "train", "loraflow.pipeline:job",
        "Train a LoRA adapter, evaluate the new version, and promote it if it passes the gate.",
        (Param("train_config", "training YAML", "configs/train/default.yaml", "path"),
         Param("overrides", "YAML mapping of training config keys to replace", ""),
         Param("eval_config", "evaluation YAML", "configs/evaluate/default.yaml", "path"),
         Param("promote_config", "gates YAML", "configs/promote/default.yaml", "path"),
         # not `stage`: that is a training parameter
         Param("promote_stage", "stage to promote to: Staging or Production", "Production"))),
    EntryPoint(
        "promote", "train", "loraflow.promote:promote_job",
        "Move a registered adapter version to Staging, Production or Archived, gated on its evaluation "
        "(configs/promote/default.yaml), or start, reweigh or stop a canary rollout.",
        (Param("version", "version number to move"),
         Param("stage", "Staging, Production, Archived, or Canary (a share of the stable name's live requests, "
                        "judged by the server; see weight)", "Production"),
         Param("weight", "Canary: the share of requests, 0 < w <= 1 (default: the config's rollout weight); "
                         "0 stops the rollout", ""),
         _NAME,
         Param("reason", "why; recorded on the version (required with force)", ""),
         Param("force", "true: promote even if the gate fails (recorded)", "false", "flag"),
         Param("config", "gates YAML", "configs/promote/default.yaml", "path")),
        interrupted="interrupted: the registry lock is released"),
    EntryPoint(
        "rollback", "train", "loraflow.promote:rollback_job",
        "Return Production to the version that was in Production before the current one.",
        (_NAME, Param("reason", "why; recorded on the versions", "")),
        interrupted="interrupted: the registry lock is released"),
    EntryPoint(
        "deliver", "train", "loraflow.delivery:job",
        "Take each new version of the registered models in the delivery config towards Production with no human "
        "step: evaluated, through the Staging gate, its served answers checked against its evaluation (parity), "
        "then a canary that the servers judge. A person's promote, rollback or stop always wins.",
        (Param("config", "delivery YAML: the registered models delivered and their policies",
               "configs/deliver/default.yaml", "path"),
         Param("once", "true: take every pending version as far as it goes now, then exit; false: poll the "
                       "registry until stopped", "false", "flag")),
        # Ctrl-C / SIGTERM is how a controller is meant to stop; its state is in the registry.
        interrupted="stopped: each version's delivery state is in the registry, and a controller started again "
                    "carries on from there", interrupted_code=0),
    EntryPoint(
        "lineage", "train", "loraflow.lineage:job",
        "A version's lineage both ways, with links into the MLflow UI: the data it learnt from (and the served "
        "traces that data was exported from), its train run, evaluations, moves, the servers that answered with "
        "it, and the train runs that learnt from its exported traces.",
        (Param("model", "models:/NAME/VERSION, models:/NAME@ALIAS, models:/NAME/STAGE or a train run id"),)),
    EntryPoint(
        "export_traces", "train", "loraflow.traces:export_job",
        "Write a registered model's served chat requests, logged as MLflow traces by a server with "
        "traces.sample_rate > 0, to a dataset folder in LLaMA-Factory's layout that train takes "
        "(-P overrides='{dataset_dir: OUT, dataset: served}').",
        (_NAME,
         Param("out", "the dataset folder to write (must not exist, or be empty); train takes it as dataset_dir"),
         Param("version", "only the answers of this version", ""),
         Param("since", "only requests answered from this time (ISO 8601; local time without an offset) on", ""),
         Param("valid_only", "true: only answers the task's grammar accepts", "false", "flag"),
         Param("dataset", "the dataset's name in dataset_info.json", "served"))),
    EntryPoint(
        "serve", "infer", "loraflow.serve:job",
        "Serve registered LoRA adapters (each registered model's Production version by default) on one base model "
        "through Ray Serve LLM with an OpenAI-compatible API; later promotions are picked up without restart.",
        (Param("name", "serve this registered model alone; empty: those the serving config lists (`models`)", ""),
         Param("alias", "alias each stable name follows", "production"),
         Param("version", "serve this version of the one model served instead, and do not follow the alias", ""),
         Param("config", "serving YAML", "configs/serve/default.yaml", "path")),
        # Ctrl-C / SIGTERM is how a server is meant to stop: exit 0 once everything is shut down.
        interrupted="shutting down", interrupted_code=0),
)}


def parser(point: EntryPoint) -> argparse.ArgumentParser:
    made = argparse.ArgumentParser(prog=f"mlflow run . -e {point.name}", description=point.description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for param in point.parameters:
        default = param.default
        if param.kind == "path" and default is not None:
            default = str(envs.PROJECT_ROOT / default)  # MLflow makes its path parameters absolute too
        made.add_argument(param.option, dest=param.name, default=default, required=default is None,
                          help=param.help)
    return made


def main(name: str, argv: list[str] | None = None) -> int:
    """Run entry point `name` with command-line arguments `argv`; returns its exit code."""
    point = ENTRY_POINTS[name]
    given = vars(parser(point).parse_args(argv))

    def job() -> int | None:
        module, _, function = point.function.partition(":")
        values = {param.name: parse_bool(param.name, given[param.name]) if param.kind == "flag" else given[param.name]
                  for param in point.params}
        return getattr(importlib.import_module(module), function)(**values)

    return run_job(job, point.interrupted, point.interrupted_code, given["verbose"])


def run_script(argv: list[str]) -> int:
    """mlproject/run.py: `NAME --option value ...`, in the entry point's environment."""
    if not argv or argv[0] not in ENTRY_POINTS:
        print(f"usage: python mlproject/run.py {{{','.join(ENTRY_POINTS)}}} [--option value ...]", file=sys.stderr)
        return 2
    envs.enter(ENTRY_POINTS[argv[0]].environment)
    return main(argv[0], argv[1:])


_HEADER = """\
name: loraflow

# Generated from src/loraflow/entry_points.py (python -m loraflow.entry_points > MLproject): change
# the entry points there. On machines without conda run with `--env-manager local`: every entry
# point moves itself into the right one of the project's two environments (.venvs/train or
# .venvs/infer, made by ./setup.sh), so the interpreter that starts it does not matter. conda users
# get conda.yaml. MLflow makes a `path` parameter absolute (or downloads an s3:// one) and refuses
# one that does not exist before the entry point starts.
conda_env: conda.yaml

entry_points:
"""


def mlproject_text() -> str:
    lines = [_HEADER.rstrip("\n")]
    for point in ENTRY_POINTS.values():
        lines += [f"  {point.name}:", "    parameters:"]
        for param in point.parameters:
            kind = "path" if param.kind == "path" else "string"
            default = "" if param.default is None else f", default: {_yaml_scalar(param.default)}"
            lines.append(f"      {param.name}: {{type: {kind}{default}}}  # {param.help}")
        options = " ".join(f"{param.option} {{{param.name}}}" for param in point.parameters)
        lines += [f'    command: "python mlproject/run.py {point.name} {options}"', ""]
    return "\n".join(lines)


def _yaml_scalar(text: str) -> str:
    """`text` as YAML reads back the same string: bare when it can be ("configs/x.yaml"), quoted when
    YAML would read something else ("", "false")."""
    return text if yaml.safe_load(text) == text else json.dumps(text)


if __name__ == "__main__":
    sys.stdout.write(mlproject_text())
