"""The evaluate, serve and promote jobs' configs: one typed schema each (pydantic, as Ray's own configs
are), every field described, and one YAML loader whose refusals name the file, each key at fault and
the shipped file to compare with. (A train config is LLaMA-Factory's own arguments plus loraflow's:
train_config.py checks it against LLaMA-Factory's argument classes.)

The schemas are strict: "16" is not 16, "yes" is not true, and an unknown key is a typo to refuse,
not a setting to ignore."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from loraflow import tasks, tracking
from loraflow.envs import PROJECT_ROOT
from loraflow.errors import UserError

Metric = Literal[tasks.recordable_metrics()]  # what an evaluation may record on a version


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _refuse_credentials(values: dict[str, Any]) -> None:
    """A job's config is logged to MLflow and handed to Ray, whose dashboard shows engine arguments and
    runtime_env: credentials stay out of it (by name, e.g. HF_TOKEN, or in a URI), as in train configs."""
    found = tracking.credentials_in(values)
    if found:
        raise ValueError("; ".join(f"{key} holds a credential ({why})" for key, why in found.items())
                         + ": credentials do not belong in a config, which is logged to MLflow and shown on Ray's "
                           "dashboard; leave it out and set it in the environment of the Ray nodes instead (on a "
                           "local instance: the environment you start the job in), where the engines read it")


def _engine_profile(value: Any) -> Any:
    """An engine profile named by its file (configs/engines/*.yaml; relative to the project, or
    absolute): the vLLM arguments in it. Evaluate and serve name the same profile, so that their
    engines compute alike and a served answer is the one evaluate scored."""
    if not isinstance(value, str):
        return value  # written out in the config itself
    path = Path(value) if Path(value).is_absolute() else PROJECT_ROOT / value
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError:
        raise ValueError(f"{value} is no engine profile file: name one in configs/engines/") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{value} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{value} must hold a mapping of vLLM engine arguments to values")
    return raw


def _has_lora_rank(engine: dict[str, Any]) -> dict[str, Any]:
    rank = engine.get("max_lora_rank")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"needs max_lora_rank, a whole number >= 1 (the largest adapter rank served), got {rank!r}")
    return engine


# vLLM engine arguments: a profile's file name, or the arguments themselves.
EngineArgs = Annotated[dict[str, Any], BeforeValidator(_engine_profile), AfterValidator(_has_lora_rank)]


# -- evaluate -------------------------------------------------------------------------------------

class EvaluateConfig(Schema):
    """configs/evaluate/*.yaml: how `evaluate` scores a version (Ray Data LLM with vLLM engines)."""

    dataset_dir: str = Field(description="the dataset folder (LLaMA-Factory's layout, with dataset_info.json): "
                                         "relative to the project, absolute, or s3://")
    dataset: str = Field(description="the split to score, by its name in dataset_info.json")
    max_rows: int | None = Field(None, ge=1, description="score the first N rows; null: the whole split")
    baseline: bool = Field(False, description="also score the base model without the adapter (one more pass)")
    guided_decoding: bool = Field(False, description="also score the adapter constrained to the task's grammar "
                                                     "(vLLM structured outputs; as many rows again, on the "
                                                     "adapter's engine)")
    merge_adapter: bool = Field(False, description="merge the adapter into the base weights and evaluate that; "
                                                   "false: the adapter applied per row by vLLM")
    sampling: dict[str, Any] = Field(description="vLLM sampling parameters, such as temperature and max_tokens")
    engine: EngineArgs = Field(description="vLLM engine arguments, or the engine profile that holds them "
                                           "(configs/engines/*.yaml, shared with serve); max_lora_rank is required")
    batch_size: int = Field(ge=1, description="rows per batch sent to an engine")
    concurrency: int = Field(ge=1, description="engines (Ray Data LLM replicas)")
    accelerator_type: str | None = Field(None, description="the GPU type each engine asks Ray for, such as L4")
    resources_per_engine: dict[str, float] | None = Field(
        None, description="the Ray resources of one engine's bundle, such as {CPU: 2}; null: one GPU each")
    lora_store: str | None = Field(None, description="s3://bucket/prefix from which engines on other nodes "
                                                     "load the adapter; null: this machine's copy")
    engine_env: dict[str, str] = Field(default_factory=dict,
                                       description="environment variables of the engine processes (quote numbers); "
                                                   "logged by name only, and no credentials (HF_TOKEN): set those "
                                                   "in the environment of the Ray nodes")

    @model_validator(mode="after")
    def _no_credentials(self) -> EvaluateConfig:
        _refuse_credentials(self.model_dump())  # what evaluate logs as its run's parameters
        return self

    @model_validator(mode="after")
    def _merge_is_local(self) -> EvaluateConfig:
        if self.merge_adapter and self.lora_store:
            raise ValueError("merge_adapter: true evaluates on this machine's engines, lora_store sends the adapter "
                             "to engines on other nodes; set merge_adapter: false to evaluate through the LoRA store")
        return self


# -- serve ----------------------------------------------------------------------------------------

class TracesConfig(Schema):
    """The serving config's `traces`: which answered requests become MLflow traces."""

    sample_rate: float = Field(0.0, ge=0, le=1, description="the share of answered requests logged; 0: none")
    redact: tuple[str, ...] = Field((), strict=False,
                                    description="regular expressions whose matches never reach the tracking store")

    @field_validator("redact")
    @classmethod
    def _are_patterns(cls, patterns: tuple[Any, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise ValueError(f"must be a list of regular expressions, got {pattern!r} in it")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression ({exc})") from None
        return patterns



class ServeConfig(Schema):
    """configs/serve/*.yaml: how `serve` serves a version (Ray Serve LLM, an OpenAI-compatible API)."""

    models: list[str] | Literal["all"] = Field(
        description="the registered models served, each under its stable name <model_id>:<registered model>; "
                    "all: every registered model whose versions were trained on the served base model")
    host: str = Field(description="the address the API listens on; loopback unless it is meant to be reachable")
    port: int = Field(ge=1, le=65535, description="the API's port")
    api_key_env: str | None = Field(description="the environment variable holding the API key that requests "
                                                "must send (Authorization: Bearer <key>)")
    allow_unauthenticated: bool = Field(description="true: serve beyond loopback with no key (refused otherwise)")
    lora_store: str | None = Field(description="s3://bucket/prefix for the adapters; null: a local S3 server")
    poll_interval_s: float = Field(gt=0, description="seconds between the server's looks at the registry")
    metrics_interval_s: float = Field(gt=0, description="seconds between logs of the live figures to MLflow")
    traces: TracesConfig = Field(description="served requests logged as MLflow traces")
    metrics_export_port: int | None = Field(ge=1, le=65535, description="a local Ray instance's Prometheus port; "
                                                                        "null: Ray picks one")
    ray_num_cpus: int | None = Field(ge=1, description="logical CPUs of a local Ray instance; ignored on a cluster")
    max_ongoing_requests: int = Field(64, ge=1, description="requests the API works on at once; more wait in its "
                                                            "queue")
    max_queued_requests: int = Field(256, ge=1, description="requests waiting beyond those; more are answered 503 "
                                                            "at once (back-pressure)")
    engine: EngineArgs = Field(description="vLLM engine arguments, or the engine profile that holds them "
                                           "(configs/engines/*.yaml, shared with evaluate); max_lora_rank is required")
    llm_config: dict[str, Any] = Field(description="ray.serve.llm.LLMConfig's fields; serve fills in model_source, "
                                                   "the LoRA path and `engine` (engine_kwargs: serving's own "
                                                   "arguments only); no credentials (runtime_env's HF_TOKEN, "
                                                   "engine_kwargs' hf_token): set those in the environment of the "
                                                   "Ray nodes")

    @model_validator(mode="after")
    def _no_credentials(self) -> ServeConfig:
        _refuse_credentials({"engine": self.engine, "llm_config": self.llm_config})  # what Ray's dashboard shows
        return self

    @model_validator(mode="after")
    def _engine_once(self) -> ServeConfig:
        twice = sorted(set(self.engine) & set(self.llm_config.get("engine_kwargs") or {}))
        if twice:
            raise ValueError(f"llm_config.engine_kwargs sets {', '.join(twice)}, which `engine` sets: keep them in "
                             "the engine profile only, which evaluate shares")
        return self


# -- promote --------------------------------------------------------------------------------------

class Comparison(Schema):
    """A gate's comparison with the version in Production now."""

    metric: Metric = Field(description="the metric compared with the version in Production now")
    max_regression: float = Field(0.0, ge=0, description="how far below Production's value it may be")


class Gate(Schema):
    """What a version's evaluation must show to enter a stage."""

    minimum: dict[Metric, float] = Field(default_factory=dict, description="metric: the least value, "
                                                                           "such as {exact_match: 0.45}")
    maximum: dict[Metric, float] = Field(default_factory=dict, description="metric: the most value, for "
                                                                           "metrics where lower is better, such "
                                                                           "as {slot_error_rate: 0.12}")
    compare_with_production: Comparison | None = Field(None, description="a comparison with Production's version")


class RolloutPolicy(Schema):
    """When a canary candidate holds (the promote config's `rollout`)."""

    weight: float = Field(0.1, gt=0, le=1, description="the share of the stable name's requests it starts with")
    steps: tuple[float, ...] = Field((), strict=False, description="larger shares it moves to, one after each "
                                                                   "judgement it holds, such as [0.5, 1.0]")
    min_requests: int = Field(100, ge=1, description="its answers (at the current share) before it is judged")
    max_error_rate: float = Field(0.01, ge=0, le=1, description="the most errors per request")
    min_parse_validity: float = Field(0.0, ge=0, le=1, description="the least share of its answers the task's "
                                                                   "grammar accepts")
    max_validity_drop: float = Field(0.05, ge=0, le=1, description="how far below Production's share that may be")
    max_p95_ratio: float = Field(1.5, ge=0, description="its p95 latency over Production's, at most")

    @field_validator("steps")
    @classmethod
    def _increasing_shares(cls, steps: tuple[Any, ...]) -> tuple[float, ...]:
        if any(isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 1 for s in steps) \
                or list(steps) != sorted(set(steps)):
            raise ValueError(f"must be increasing shares in (0, 1], such as [0.5, 1.0]; got {list(steps)!r}")
        return tuple(float(s) for s in steps)


class PromoteConfig(Schema):
    """configs/promote/*.yaml: the gates of `promote` and the canary rollout policy."""

    stages: dict[Literal["Staging", "Production"], Gate] = Field(
        description="each gated stage (Staging, Production) and its gate; a stage not named has no checks")
    rollout: RolloutPolicy = Field(default_factory=RolloutPolicy, description="the canary rollout policy")

    @field_validator("stages", mode="before")
    @classmethod
    def _empty_gate(cls, stages: Any) -> Any:
        # `Staging:` with nothing under it is a gate with no checks.
        return {stage: gate or {} for stage, gate in stages.items()} if isinstance(stages, dict) else stages


# -- deliver --------------------------------------------------------------------------------------

def _config_file(kind: str) -> AfterValidator:
    """A config file of `kind` (evaluate, promote, serve) that exists, relative to the project or
    absolute; read and checked in full when the controller starts (delivery.check_policy)."""
    def exists(value: str) -> str:
        path = Path(value) if Path(value).is_absolute() else PROJECT_ROOT / value
        if not path.is_file():
            raise ValueError(f"names {value}, which does not exist: name a file such as configs/{kind}/default.yaml")
        return str(path)
    return AfterValidator(exists)


class ParityCheck(Schema):
    """Before live traffic: the candidate served by its version id answers test rows as its evaluation did."""

    rows: int = Field(16, ge=0, description="evaluated rows asked again of a server started for the check "
                                            "(the first N of the evaluation's predictions); 0: no check")
    min_equal: float = Field(0.9, ge=0, le=1, description="the least share of served answers equal to the "
                                                          "evaluation's, byte for byte (a batch and a single request "
                                                          "round near-ties apart: 97-98% equal on the CPU, "
                                                          "parity-default.json; 91.3% on an H100, "
                                                          "gpu-inference-3-h100-multi-lora.json); every prompt "
                                                          "must have as many tokens as evaluate's")
    serve_config: Annotated[str, _config_file("serve")] = Field(
        "configs/serve/default.yaml", description="the serving config the check's server runs (its engine, "
                                                  "prompt path and model id; its port is chosen free)")


class DeliveryPolicy(Schema):
    """How far the controller takes a registered model's new versions, and with which configs."""

    to: Literal["Staging", "Canary", "Production"] = Field(
        "Production", description="Staging: evaluated and through its gate; Canary: a rollout started, the "
                                  "servers judge it; Production: followed until the servers promote it (or, when "
                                  "nothing is in Production yet, promoted through its gate)")
    evaluate_config: Annotated[str, _config_file("evaluate")] = Field(
        "configs/evaluate/default.yaml", description="how each new version is evaluated")
    promote_config: Annotated[str, _config_file("promote")] = Field(
        "configs/promote/default.yaml", description="the gates and the canary rollout policy")
    parity: ParityCheck = Field(default_factory=ParityCheck, description="the parity check before live traffic")


class WebhookSettings(Schema):
    """Registry events: the tracking server calls the controller at each new version (MLflow webhooks)."""

    listen: str = Field("127.0.0.1:8765", pattern=r"^[^:\s]+:\d{1,5}$",
                        description="host:port the controller listens on for the tracking server's calls")
    url: str = Field(description="the URL the tracking server calls (https, unless the server allows http "
                                 "with MLFLOW_WEBHOOK_ALLOWED_SCHEMES), reaching `listen`")
    secret_env: str = Field("LORAFLOW_WEBHOOK_SECRET", description="the environment variable holding the "
                                                                   "webhook's signing secret (never in the config)")


class DeliverConfig(Schema):
    """configs/deliver/*.yaml: which registered models `deliver` takes to Production, and how."""

    poll_interval_s: float = Field(30.0, gt=0, strict=False, description="how often the controller looks for new "
                                                                         "versions and rollouts that ended")
    models: dict[str, DeliveryPolicy] = Field(description="each registered model delivered, with its policy")
    webhook: WebhookSettings | None = Field(None, description="learn of new versions from the tracking server's "
                                                              "webhooks as well (an `mlflow server` on a SQL store); "
                                                              "null: by polling alone")

    @field_validator("models")
    @classmethod
    def _some(cls, models: dict[str, DeliveryPolicy]) -> dict[str, DeliveryPolicy]:
        if not models:
            raise ValueError("names no registered model: add one under models, with its policy")
        return models


# -- the loader -----------------------------------------------------------------------------------

S = TypeVar("S", bound=Schema)
_WHAT = {EvaluateConfig: ("Evaluation config", "evaluate"), ServeConfig: ("Serving config", "serve"),
         PromoteConfig: ("Promotion config", "promote"), DeliverConfig: ("Delivery config", "deliver")}


def shipped_default(schema: type[Schema]) -> Path:
    return PROJECT_ROOT / "configs" / _WHAT[schema][1] / "default.yaml"


def read_mapping(path: str | Path, what: str, see: str) -> dict[str, Any]:
    """Every job config's YAML file (training's too), as a mapping; bad input is a UserError naming
    the file and the shipped example (`see`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; {see}.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{what} {path} is not valid YAML ({str(exc).splitlines()[0]}); {see}.") from None
    if not isinstance(raw, dict):
        raise UserError(f"{what} {path} must hold a mapping of keys to values; {see}.")
    return raw


def load(schema: type[S], path: str | Path) -> S:
    """Read and check a job's YAML config; bad input is a UserError naming what to change."""
    what, _ = _WHAT[schema]
    see = f"see {shipped_default(schema).relative_to(PROJECT_ROOT)}"
    raw = read_mapping(path, what, see)
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_problem(schema, error) for error in exc.errors())
        raise UserError(f"{what} {path}: {problems}; {see}.") from None


def _problem(schema: type[Schema], error: dict) -> str:
    loc, kind, given = error["loc"], error["type"], error.get("input")
    is_key = loc[-1:] == ("[key]",)  # a mapping's key is at fault, not its value
    where = ".".join(str(part) for part in (loc[:-1] if is_key else loc))
    if kind == "missing":
        return f"{where} is missing ({_description(schema, loc)})"
    if kind == "extra_forbidden":
        return f"{where} is not a known key"
    if kind == "value_error":
        reason = str(error["ctx"]["error"])
        return f"{where} {reason}" if where else reason
    expected = re.sub(r" or instance of \w+", "", error["msg"]).replace("Input should be", "should be", 1)
    if is_key:
        return f"{where} (a key) {expected}"
    hint = " (quote it)" if kind == "string_type" and isinstance(given, (int, float)) else ""
    return f"{where} {expected}, got {given!r}{hint}"


def _description(schema: type[Schema], loc: tuple) -> str:
    """A field's description, found through nested schemas (keys of a mapping are skipped)."""
    field = None
    for part in loc:
        if isinstance(schema, type) and issubclass(schema, Schema) and part in schema.model_fields:
            field = schema.model_fields[part]
            schema = next((t for t in getattr(field.annotation, "__args__", (field.annotation,))
                           if isinstance(t, type) and issubclass(t, Schema)), None)
    return field.description if field is not None else "required"


def reference() -> str:
    """Every key of every job's config, its type, default and meaning, as Markdown (docs/configs.md)."""
    lines = ["# Job configs", "", "Generated from `src/loraflow/job_configs.py` by "
             "`python -m loraflow.job_configs > docs/configs.md` (a test checks that they agree). Every key is "
             "checked when a job starts; an unknown key, a wrong type or a value out of range is refused (exit 2) "
             "with the key named. Train configs are LLaMA-Factory's own arguments plus loraflow's `ray_*` keys "
             "and `registered_model_name` and `task` (`src/loraflow/train_config.py`, `src/loraflow/tasks.py`)."]
    done: set[type] = set()

    def table(schema: type[Schema], title: str) -> None:
        done.add(schema)
        lines.extend(["", f"## {title}", "", schema.__doc__, "", "| key | type | default | meaning |",
                      "| --- | --- | --- | --- |"])
        nested = []
        for name, field in schema.model_fields.items():
            default = "required" if field.is_required() else \
                f"`{_as_yaml(field.get_default(call_default_factory=True))}`"
            lines.append(f"| `{name}` | {_type_name(field.annotation)} | {default} | {field.description} |")
            nested += [t for t in _schemas_in(field.annotation) if t not in done]
        for inner in nested:
            table(inner, f"`{inner.__name__}`")

    for schema in _WHAT:
        table(schema, f"{_WHAT[schema][0]}: `{schema.__name__}`")
    return "\n".join(lines) + "\n"


def _schemas_in(annotation) -> list[type[Schema]]:
    if isinstance(annotation, type) and issubclass(annotation, Schema):
        return [annotation]
    return [found for arg in getattr(annotation, "__args__", ()) for found in _schemas_in(arg)]


def _type_name(annotation) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return re.sub(r"\b[\w.]+\.(?=\w+\b)", "", str(annotation)).replace("|", "or")


def _as_yaml(value: Any) -> str:
    if isinstance(value, Schema):
        return "its defaults"
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


if __name__ == "__main__":
    print(reference(), end="")
