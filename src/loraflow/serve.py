"""The `serve` entry point: the promoted adapter behind an OpenAI-compatible API, with Ray Serve LLM
(`LLMConfig` + `build_openai_app` + `serve.run`, as in the seed tutorial).

The registered version with the alias (default `production`) is copied into the LoRA store
(adapter_store.py) and served as `<model_id>:<alias>`; serving_ingress.py follows later promotions
without a restart. Ctrl-C or SIGTERM shuts Serve, Ray and the local S3 server down.
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

from loraflow import adapter_store, base_models, job_configs, ray_cluster, registry, tasks, tracking
from loraflow.errors import UserError
from loraflow.job_configs import ServeConfig


def job(name: str, alias: str, version: str, config: str) -> None:
    """The serve entry point (entry_points.py): until Ctrl-C or SIGTERM."""
    serve_forever(name, alias, version or None, config)


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


def serve_forever(name: str, alias: str, version: str | None, config_path: str) -> None:
    config = load_config(config_path)
    api_key = take_api_key(config)
    if not os.environ.get("RAY_ADDRESS"):  # a cluster's proxy and metrics agents listen on its nodes, not here
        _check_port_free(config.host, config.port)
        if config.metrics_export_port is not None:
            _check_port_free("127.0.0.1", config.metrics_export_port, "metrics_export_port")  # loopback only
    tracking_uri = tracking.configure()
    first = registry.find_version(name, number=version, alias=alias)
    run_name = f"serve-{registry.adapter_id(first)}" if version is not None else f"serve-{name}@{alias}"
    launched = tracking.name_launch_run(run_name, "serve")
    base_model = registry.base_model(first.tags, f"{name} v{first.version}")
    # What the engine runs; the watcher serves only later versions trained on the same.
    base_model_id = base_models.base_model_identity(base_model)
    registry.check_base_model(first.tags.get(registry.BASE_MODEL_ID_TAG), base_model_id, f"{name} v{first.version}")
    tasks.of_version(first)  # what the server sends the engine: refused here, before Ray, if it has none
    with contextlib.ExitStack() as stack:
        store = (adapter_store.LoraStore(config.lora_store) if config.lora_store
                 else stack.enter_context(adapter_store.local_s3_server()))
        fields = llm_config(config, base_model, store)  # refuses a model_source mismatch before publishing
        adapter = store.publish(first)
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

        serving_run = launched or _serving_run(run_name, name)
        _end_when_stopped(stack, serving_run, mlflow_runs_it=launched is not None)
        app = build_openai_app({
            "llm_configs": [LLMConfig(**fields)],
            "ingress_cls_config": {
                "ingress_cls": "loraflow.serving_ingress:LoraflowIngress",
                "ingress_extra_kwargs": {
                    "registered_model": name, "alias": alias, "pinned_version": version,
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
        print(json.dumps({
            "serving": f"http://{config.host}:{config.port}/v1", "mlflow_run": serving_run,
            "model": f"{model_id}:{alias if version is None else adapter}",
            "adapter": adapter, "registered_model": name, "version": str(first.version),
            "api_key_required": bool(api_key),
        }), flush=True)
        while True:
            time.sleep(3600)


def _serving_run(name: str, registered_model: str) -> str:
    """The MLflow run this server logs its live figures into, when `mlflow run` made none: one per server."""
    from mlflow import MlflowClient

    tracking.use_model_experiment(registered_model)
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
