"""The `serve` entry point: promoted adapters behind an OpenAI-compatible API, with Ray Serve LLM
(`LLMConfig` + `build_openai_app` + `serve.run`, as in the seed tutorial), many registered models
on one base model.

Each registered model the serving config lists (`models`; `-P name` serves one alone) is served
under its stable name `<model_id>:<registered model>`, which follows its version with the alias
(default `production`); with one model, `<model_id>:<alias>` names it too. Versions are copied into
the LoRA store (adapter_store.py) when first served; serving_follower.py follows later promotions
and newly registered models without a restart. Ctrl-C or SIGTERM shuts Serve, Ray and the local S3
server down.
"""

from __future__ import annotations

import contextlib
import copy
import getpass
import hashlib
import ipaddress
import json
import os
import socket
import sys
import time
from typing import Any

from loraflow import adapter_store, base_models, job_configs, ray_cluster, registry, serving_routes, tasks, tracking
from loraflow.errors import UserError
from loraflow.job_configs import ServeConfig


def job(name: str, alias: str, version: str, config: str) -> None:
    """The serve entry point (entry_points.py): until Ctrl-C or SIGTERM."""
    serve_forever(name or None, alias, version or None, config)


def served_models(name: str | None, version: str | None, config: ServeConfig) -> list[str] | None:
    """The registered models served: `name` alone, else the config's list (None: all)."""
    models = [name] if name else config.models
    if models == "all":
        if version:
            raise UserError("-P version pins one registered model's version: give -P name too.")
        return None
    if not models:
        raise UserError("The serving config lists no registered models: set models: [NAME, ...] (or all).")
    if version and len(models) > 1:
        raise UserError(f"-P version pins one registered model's version, but the serving config lists "
                        f"{len(models)}: give -P name too.")
    clashes = serving_routes.collisions(models)
    if clashes:
        raise UserError(f"The registered models listed cannot each have a stable name of their own: "
                        f"{'; '.join(clashes)}. List each once, or rename one.")
    return models


def first_version(models: list[str] | None, version: str | None, alias: str, config: ServeConfig):
    """The version that tells the base model served: the first listed model's with the alias (or
    the version pinned). `models: all` names the base model in the config instead."""
    if models is None:
        source = (config.llm_config.get("model_loading_config") or {}).get("model_source")
        if not source:
            raise UserError("models: all serves the registered models of one base model: name it in the serving "
                            "config's llm_config.model_loading_config.model_source.")
        return None
    refusals = []
    for name in models:
        try:
            return registry.find_version(name, number=version, alias=alias)
        except UserError as exc:
            if len(models) == 1:
                raise
            refusals.append(str(exc))
    raise UserError("None of the registered models listed has a version to serve yet: " + " ".join(refusals))


def load_config(path: str) -> ServeConfig:
    return job_configs.load(ServeConfig, path)


def take_api_key(config: ServeConfig) -> str:
    """The API key from the environment variable the config names, removed from this process's
    environment: Ray's processes inherit it, and only its SHA-256 is meant to reach them. Serving
    beyond loopback without a key is refused unless the config says allow_unauthenticated: true."""
    name = config.api_key_env
    key = os.environ.pop(name, "") if name else ""
    if key:
        return key
    host = config.host
    if not _is_loopback(host) and not config.allow_unauthenticated:
        raise UserError(f"Refusing to serve on {host} without an API key: anyone who can reach it could use it. "
                        f"Set {name or 'the variable that api_key_env names'} to a key, or serve on 127.0.0.1, "
                        "or set allow_unauthenticated: true in the serving config.")
    print(f"warning: serving on {host} without an API key (set {name or 'api_key_env'} to require one)",
          file=sys.stderr, flush=True)
    return ""


def _check_port_free(host: str, port: int, key: str = "port (or host)") -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(f"Cannot listen on {host}:{port} ({exc.strerror}): another program uses that port, "
                            f"or the host is not this machine's. Set {key} in the serving config.") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def llm_config(config: ServeConfig, base_model: str, store: adapter_store.LoraStore) -> dict[str, Any]:
    """The LLMConfig fields: the file's, plus the base model, the engine profile and the LoRA store."""
    fields = copy.deepcopy(config.llm_config)
    loading = fields.setdefault("model_loading_config", {})
    if loading.get("model_source") not in (None, base_model):
        raise UserError(f"The served version was trained on {base_model}, but the serving config's "
                        f"model_source is {loading['model_source']}; set it to null or to {base_model}.")
    loading["model_source"] = base_models.base_model_source(base_model)
    fields.setdefault("lora_config", {})["dynamic_lora_loading_path"] = store.uri
    fields["engine_kwargs"] = {**config.engine, **(fields.get("engine_kwargs") or {})}  # the profile evaluate shares
    runtime_env = fields.setdefault("runtime_env", {})
    runtime_env["env_vars"] = {**store.settings, **runtime_env.get("env_vars", {})}
    return fields


def serve_forever(name: str | None, alias: str, version: str | None, config_path: str) -> None:
    config = load_config(config_path)
    models = served_models(name, version, config)
    api_key = take_api_key(config)
    if not os.environ.get("RAY_ADDRESS"):  # a cluster's proxy and metrics agents listen on its nodes, not here
        _check_port_free(config.host, config.port)
        if config.metrics_export_port is not None:
            _check_port_free("127.0.0.1", config.metrics_export_port, "metrics_export_port")  # loopback only
    tracking_uri = tracking.configure()
    first = first_version(models, version, alias, config)
    shown = "all" if models is None else "+".join(models)
    run_name = f"serve-{registry.adapter_id(first)}" if version is not None else f"serve-{shown}@{alias}"
    launched = tracking.name_launch_run(run_name, "serve")
    if first is None:
        base_model = config.llm_config["model_loading_config"]["model_source"]
    else:
        base_model = registry.base_model(first.tags, f"{first.name} v{first.version}")
    # What the engine runs; the follower serves only versions trained on the same.
    base_model_id = base_models.base_model_identity(base_model)
    if first is not None:
        registry.check_base_model(first.tags.get(registry.BASE_MODEL_ID_TAG), base_model_id,
                                  f"{first.name} v{first.version}")
        tasks.of_version(first)  # what the server sends the engine: refused here, before Ray, if it has none
    with contextlib.ExitStack() as stack:
        store = (adapter_store.LoraStore(config.lora_store) if config.lora_store
                 else stack.enter_context(adapter_store.local_s3_server()))
        fields = llm_config(config, base_model, store)  # refuses a model_source mismatch before publishing
        ray_cluster.connect(num_cpus=config.ray_num_cpus, metrics_export_port=config.metrics_export_port)
        from ray import serve

        stack.callback(_shutdown, local=not os.environ.get("RAY_ADDRESS"))
        if config.lora_store is None and ray_cluster.alive_nodes() > 1:
            raise UserError("This Ray cluster has several nodes, and engines on the others cannot reach this "
                            "machine's local S3 server: set lora_store: s3://bucket/prefix in the serving config "
                            "(a store every node can read).")
        # One HTTP proxy, on the head node: the API's address is the one in the config, whatever
        # the number of nodes (put a load balancer in front for more).
        serve.start(proxy_location="HeadOnly", http_options={"host": config.host, "port": config.port})
        from ray.serve.llm import LLMConfig, build_openai_app

        serving_run = launched or _serving_run(run_name, first.name if first is not None else None)
        _end_when_stopped(stack, serving_run, mlflow_runs_it=launched is not None)
        app = build_openai_app({
            "llm_configs": [LLMConfig(**fields)],
            "ingress_cls_config": {
                "ingress_cls": "loraflow.serving_ingress:LoraflowIngress",
                "ingress_extra_kwargs": {
                    "models": models, "alias": alias, "pinned_version": version,
                    "lora_store_uri": store.uri, "lora_store_settings": store.settings,
                    "base_model_id": base_model_id,
                    "api_key_sha256": hashlib.sha256(api_key.encode()).hexdigest() if api_key else None,
                    "poll_interval_s": config.poll_interval_s, "tracking_uri": tracking_uri,
                    "serving_run_id": serving_run,
                    "serving_experiment_id": _experiment_of(serving_run),
                    "metrics_interval_s": config.metrics_interval_s,
                    "traces_settings": config.traces.model_dump(),
                },
            },
            # Follow-the-registry state lives in each ingress replica; one keeps it simple on one machine.
            "ingress_deployment_config": {
                "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
                # Ray Serve LLM's default is 1e9 of each: no back-pressure at all.
                "max_ongoing_requests": config.max_ongoing_requests,
                "max_queued_requests": config.max_queued_requests,
                # Traces are written by the Tracer's one thread, one at a time: MLflow's own async export
                # sends up to 10 at once, which starved the registry watcher's calls to the tracking server.
                "ray_actor_options": {"runtime_env": {"env_vars": {**store.settings,
                                                                   "MLFLOW_ENABLE_ASYNC_TRACE_LOGGING": "false"}}},
            },
        })
        try:
            serve.run(app, name="loraflow", route_prefix="/")
        except RuntimeError as exc:  # a deployment that cannot start (engine settings, resources)
            raise UserError(f"The serving application failed to start: {exc}") from None
        model_id = fields["model_loading_config"]["model_id"]
        stable = [f"{model_id}:{m}" for m in models] if models is not None else [f"{model_id}:<registered model>"]
        if models is not None and len(models) == 1:
            stable.insert(0, f"{model_id}:{alias if version is None else registry.adapter_id(first)}")
        started = {"serving": f"http://{config.host}:{config.port}/v1", "mlflow_run": serving_run, "models": stable,
                   "registered_models": models or "all", "api_key_required": bool(api_key)}
        if models is not None and len(models) == 1:
            started.update(model=stable[0], version=str(first.version))
        print(json.dumps(started), flush=True)
        while True:
            time.sleep(3600)


def _serving_run(name: str, registered_model: str | None) -> str:
    """The MLflow run this server logs its live figures into, when `mlflow run` made none: one per
    server, in the experiment of the first model it serves (`models: all`: one named loraflow-serve)."""
    from mlflow import MlflowClient

    tracking.use_model_experiment(registered_model or "loraflow-serve")
    experiment = (os.environ.get("MLFLOW_EXPERIMENT_ID")
                  or tracking.experiment_named(os.environ["MLFLOW_EXPERIMENT_NAME"]))  # a name the user chose
    return MlflowClient().create_run(experiment, run_name=name, tags={
        registry.JOB_TAG: "serve", "mlflow.user": getpass.getuser()}).info.run_id


def _end_when_stopped(stack: contextlib.ExitStack, run_id: str, mlflow_runs_it: bool) -> None:
    """The server's run ends with it: FINISHED on Ctrl-C or SIGTERM (how a server is meant to stop),
    FAILED when it could not start; a SIGKILLed server's stays RUNNING. `mlflow run`'s own run is
    ended here only while still RUNNING: a SIGTERM to the whole process group (systemd's default)
    stops `mlflow run` before it can end it."""
    from mlflow import MlflowClient

    client = MlflowClient()

    def end(kind, exc, traceback) -> None:
        if mlflow_runs_it and client.get_run(run_id).info.status != "RUNNING":
            return
        stopped = kind is None or issubclass(kind, KeyboardInterrupt)
        client.set_terminated(run_id, "FINISHED" if stopped else "FAILED")

    stack.push(end)


def _experiment_of(run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient().get_run(run_id).info.experiment_id


def _shutdown(local: bool) -> None:
    """Stop Serve and leave Ray. A local instance goes whole (ray.shutdown stops every process of
    it): asking Serve's controller first waited 30 s when a SIGTERM to the process group had
    already stopped it. On a cluster, Serve's application is deleted first."""
    from ray import serve

    if not local:
        with contextlib.suppress(Exception):
            serve.shutdown()
    ray_cluster.shutdown()
