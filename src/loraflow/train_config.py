"""The training config: a LLaMA-Factory YAML plus the seed's Ray keys and loraflow's own keys.

Every key is checked before anything starts: LLaMA-Factory keys against its own argument
dataclasses (so a typo or a wrong type fails here, not minutes later on a Ray worker), the
others against the table below. Types are checked as JSON specs (`_spec`), so that LLaMA-Factory's
are kept in .cache/ and the driver need not import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import importlib.metadata
import json
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from loraflow import compat, entry_points, job_configs, tasks, tracking
from loraflow.envs import PROJECT_ROOT
from loraflow.errors import UserError


@dataclass
class RaySettings:
    """The seed's Ray keys (LLaMA-Factory 0.9.5 no longer reads them) plus a failure policy."""

    ray_run_name: str = "loraflow_sft"
    ray_storage_path: str = "outputs/ray"
    ray_num_workers: int = 1
    resources_per_worker: dict = field(default_factory=lambda: {"CPU": 1})
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    ray_max_failures: int = 0
    # Environment variables of every training worker, e.g. switches read by accelerate or NCCL.
    ray_worker_env: dict = field(default_factory=dict)

    @property
    def uses_gpu(self) -> bool:
        return float(self.resources_per_worker.get("GPU", 0)) > 0


@dataclass
class TrainConfig:
    llamafactory: dict[str, Any]  # arguments handed to llamafactory's run_exp
    ray: RaySettings
    registered_model_name: str
    task: str  # tasks.py: what the adapter is trained for


_LORAFLOW_KEYS = {"registered_model_name": str, "task": str}
_RAY_KEYS = {f.name for f in dataclasses.fields(RaySettings)}
_FIELDS_CACHE = PROJECT_ROOT / ".cache" / "llamafactory-fields"


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    raw = job_configs.read_mapping(path, "Training config", "see configs/train/default.yaml")
    raw.update(overrides or {})
    # A key at fault may come from either: messages name both.
    source = f"{path} with overrides {{{', '.join(map(str, overrides))}}}" if overrides else str(path)
    return from_dict(raw, source=source)


def parse_overrides(text: str) -> dict[str, Any]:
    """Config keys to replace, as a YAML mapping: '{max_samples: 50, resources_per_worker: {CPU: 1}}'."""
    if not text.strip():
        return {}
    # The text is not repeated: it may hold a credential (hub_token=...), which from_dict refuses unshown.
    try:
        overrides = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"overrides is not valid YAML ({str(exc).splitlines()[0]}): write a mapping such as "
                        "'{max_samples: 50}'.") from None
    if not isinstance(overrides, dict):
        raise UserError(f"overrides must be a YAML mapping such as '{{max_samples: 50}}', not a "
                        f"{type(overrides).__name__}.")
    return overrides


def from_dict(raw: dict[str, Any], source: str = "<dict>") -> TrainConfig:
    ray_raw = {k: raw[k] for k in raw if k in _RAY_KEYS}
    own_raw = {k: raw[k] for k in raw if k in _LORAFLOW_KEYS}
    lf_raw = {k: v for k, v in raw.items() if k not in _RAY_KEYS and k not in _LORAFLOW_KEYS}

    # A config is logged to MLflow (as parameters, and whole as the artifact that resume reads back)
    # and handed to Ray: credentials never go in it, by name (hub_token, ray_worker_env's HF_TOKEN)
    # nor inside a value (https://TOKEN@host).
    secrets = tracking.credentials_in(raw)
    if secrets:
        raise UserError("Invalid training config:\n  " + "\n  ".join(
            f"{key} in {source} holds a credential ({why}). Credentials do not belong in a config, which is "
            "logged to MLflow: leave it out and set it in the environment instead (HF_TOKEN for the Hugging Face "
            "Hub; for Ray workers, the environment of the Ray nodes)." for key, why in secrets.items()))
    problems: list[str] = []
    lf_args = _check_against(lf_raw, _llamafactory_fields(), problems, source)
    ray_specs = {k: _spec(v) for k, v in typing.get_type_hints(RaySettings).items()}
    ray_args = _check_against(ray_raw, ray_specs, problems, source)
    own = _check_against(own_raw, {k: _spec(v) for k, v in _LORAFLOW_KEYS.items()}, problems, source)
    problems += _out_of_range(lf_args, source)
    if "task" not in own_raw:
        problems.append(f"task is missing from {source}: name what the adapter is trained for, one of {tasks.names()}")
    elif "task" in own and own["task"] not in tasks.names():
        problems.append(f"task {own['task']!r} in {source} is not one loraflow knows: use one of {tasks.names()}")
    if problems:
        raise UserError("Invalid training config:\n  " + "\n  ".join(problems))

    ray = RaySettings(**ray_args)
    _check_ray_settings(ray, source)
    return TrainConfig(
        llamafactory=lf_args,
        ray=ray,
        registered_model_name=own.get("registered_model_name", entry_points.DEFAULT_MODEL_NAME),
        task=own["task"],
    )


# Values that LLaMA-Factory, transformers or torch refuse only once a worker trains (a negative
# learning rate fails in the optimizer, after Ray and the model have started): refused up front.
_LIMITS: dict[str, tuple[Any, str]] = {
    "learning_rate": (lambda v: v > 0, "> 0"),
    "num_train_epochs": (lambda v: v > 0, "> 0"),
    "max_steps": (lambda v: v == -1 or v > 0, "> 0, or -1 (num_train_epochs decides)"),
    "max_samples": (lambda v: v >= 1, ">= 1, or null (every row)"),
    "per_device_train_batch_size": (lambda v: v >= 1, ">= 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, ">= 1"),
    "cutoff_len": (lambda v: v >= 1, ">= 1"),
    "lora_rank": (lambda v: v >= 1, ">= 1"),
    "lora_alpha": (lambda v: v > 0, "> 0, or null (twice lora_rank)"),
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "warmup_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "max_grad_norm": (lambda v: v >= 0, ">= 0"),
    "logging_steps": (lambda v: v > 0, "> 0"),
    "save_steps": (lambda v: v > 0, "> 0"),
}


def _out_of_range(lf_args: dict[str, Any], source: str) -> list[str]:
    return [f"{key} {lf_args[key]!r} in {source} must be {allowed}" for key, (within, allowed) in _LIMITS.items()
            if _is_number(lf_args.get(key)) and not within(lf_args[key])]


def _check_ray_settings(ray: RaySettings, source: str) -> None:
    if ray.ray_num_workers < 1:
        raise UserError(f"{source}: ray_num_workers must be at least 1, got {ray.ray_num_workers}.")
    if ray.ray_max_failures < -1:
        raise UserError(f"{source}: ray_max_failures must be -1 (retry forever) or >= 0.")
    bad_env = {k: v for k, v in ray.ray_worker_env.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad_env:
        raise UserError(f"{source}: ray_worker_env must map variable names to strings (quote numbers, "
                        f"e.g. {{NCCL_DEBUG: \"INFO\", OMP_NUM_THREADS: \"4\"}}); got {bad_env!r}.")
    bad = {k: v for k, v in ray.resources_per_worker.items() if not _is_number(v) or v < 0}
    if bad or not ray.resources_per_worker:
        raise UserError(
            f"{source}: resources_per_worker must map resource names to non-negative numbers, "
            f"e.g. {{CPU: 1}} or {{GPU: 1}}; got {ray.resources_per_worker!r}."
        )


def _llamafactory_fields() -> dict[str, Any]:
    """The specs of the arguments run_exp parses. Importing its dataclasses imports transformers and
    torch (16 s on the lent H200 machine, where Ray's workers import them again), so they are kept
    in .cache/ per LLaMA-Factory and transformers version: only a machine's first job imports them."""
    versions = "-".join(f"{name}-{importlib.metadata.version(name)}" for name in ("llamafactory", "transformers"))
    cached = _FIELDS_CACHE / f"{versions}.json"
    with contextlib.suppress(OSError, ValueError):
        return json.loads(cached.read_text())
    specs: dict[str, Any] = {}
    for cls in compat.llamafactory_argument_classes():
        names = {f.name for f in dataclasses.fields(cls)}
        specs.update({k: _spec(v) for k, v in typing.get_type_hints(cls).items() if k in names})
    with contextlib.suppress(OSError, TypeError):  # a value JSON cannot hold, or a read-only project: not kept
        text = json.dumps(specs)
        _FIELDS_CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=_FIELDS_CACHE, suffix=".tmp", delete=False) as tmp:
            tmp.write(text)
        os.replace(tmp.name, cached)  # whole or not at all, for jobs reading it at the same time
    return specs


def _spec(hint: Any) -> Any:
    """A type annotation as JSON: "bool", "int", "float", "str", "any", "none", "other" (left to
    LLaMA-Factory), or {"union"|"literal"|"enum"|"container": ...}."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return {"union": [_spec(option) for option in typing.get_args(hint)]}
    if origin is Literal:
        return {"literal": list(typing.get_args(hint))}
    if hint is Any or hint is object:
        return "any"
    if origin in (list, dict, tuple) or hint in (list, dict):
        return {"container": (origin or hint).__name__}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"enum": [m.value for m in hint]}
    if hint is type(None):
        return "none"
    return hint.__name__ if hint in (bool, int, float, str) else "other"


def _check_against(raw: dict, specs: dict, problems: list[str], source: str) -> dict:
    checked = {}
    known = list(specs) + list(_RAY_KEYS) + list(_LORAFLOW_KEYS)
    for key, value in raw.items():
        if key not in specs:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            problems.append(
                f"unknown key {key!r} in {source}.{hint} Keys are LLaMA-Factory 0.9.5 training "
                f"arguments, the Ray keys {sorted(_RAY_KEYS)} or {sorted(_LORAFLOW_KEYS)}."
            )
            continue
        try:
            checked[key] = _coerce(value, specs[key])
        except TypeError as exc:
            problems.append(f"{key}: {exc}")
    return checked


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _coerce(value: Any, spec: Any) -> Any:
    """Return `value` as type `spec` (see _spec), converting only where YAML is known to be ambiguous
    (PyYAML reads `1e-4` as a string); raise TypeError naming what was expected."""
    kind = next(iter(spec)) if isinstance(spec, dict) else None
    if kind == "union":
        options = spec["union"]
        if value is None and "none" in options:
            return None
        errors = []
        for option in sorted(options, key=_strictness):  # try str last: it would take anything
            if option == "none":
                continue
            try:
                return _coerce(value, option)
            except TypeError as exc:
                errors.append(str(exc))
        raise TypeError(" or ".join(dict.fromkeys(errors)))
    if kind in ("literal", "enum"):
        if value in spec[kind]:
            return value
        raise TypeError(f"expected one of {spec[kind]}, got {value!r}")
    if kind == "container":
        expected = {"list": list, "dict": dict, "tuple": tuple}[spec["container"]]
        if isinstance(value, expected):
            return value
        raise TypeError(f"expected a {expected.__name__}, got {value!r}")
    if spec == "bool":
        if isinstance(value, bool):
            return value
        raise TypeError(f"expected true or false, got {value!r}")
    if spec == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError(f"expected an integer, got {value!r}")
    if spec == "float":
        if _is_number(value):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeError(f"expected a number, got {value!r}")
    if spec == "str":
        if isinstance(value, str):
            return value
        raise TypeError(f"expected a string, got {value!r}")
    return value  # "any", and other annotations (callables, nested dataclasses): left to LLaMA-Factory


def _strictness(option: Any) -> int:
    return 1 if option == "str" else 0
