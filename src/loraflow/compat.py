"""Every use of a dependency's private API, in one place, each with why no public API does it.
tests/test_compat.py pins each one against the installed versions (in the environment that uses
it), so that an upgrade that moves or changes one fails there, by name, and not deep in a job.
Nothing here is imported at module level: each environment holds only some of these libraries."""

from __future__ import annotations

from typing import Any

# -- Ray -------------------------------------------------------------------------------------------
# Ray's own switch (ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, read when ray is imported): "0" makes
# a single node take 127.0.0.1 as its address, as on macOS and Windows, instead of binding its GCS,
# raylet and metrics port on every interface. ray.init has no public argument for it.
RAY_LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_local_ray(num_cpus: int | None, temp_dir: str, metrics_export_port: int | None, **public: Any) -> None:
    """Start a local Ray instance with three of ray.init's underscore arguments (documented in its
    docstring, not its signature): the session folder (Ray's socket paths must stay short), worker
    niceness 0 (Ray starts workers at nice 15, below its own always-waking processes: on a machine
    without spare cores they then lose the CPU at every wake-up: a bf16 training step took 1.6x as
    long in a Ray task as outside), and the Prometheus metrics port."""
    import ray

    ray.init(num_cpus=num_cpus, _temp_dir=temp_dir, _system_config={"worker_niceness": 0},
             _metrics_export_port=metrics_export_port, **public)


# -- Ray Serve LLM (infer environment) -------------------------------------------------------------
def openai_api_models() -> tuple[type, type, type]:
    """ModelCard, ModelList and OpenAIHTTPException: what Ray Serve LLM's OpenAI ingress returns
    for /v1/models and raises for an HTTP error, not exported by ray.serve.llm."""
    from ray.llm._internal.serve.core.configs.openai_api_models import ModelCard, ModelList, OpenAIHTTPException

    return ModelCard, ModelList, OpenAIHTTPException


class IngressHooks:
    """Mixed in before ray.serve.llm.ingress.OpenAiIngress: the one private coroutine every OpenAI
    route goes through (`_get_response`: the request's body after parsing, before the engine) is
    handed to `dispatch`, and the engine deployment's handle is `engine_handle`. A subclass
    implements `dispatch(body, call_method, raw_request)`, an async generator, and calls
    `ray_dispatch` for Ray's own."""

    async def _get_response(self, *, body, call_method: str, raw_request=None):
        async for response in self.dispatch(body, call_method, raw_request):
            yield response

    def ray_dispatch(self, body, call_method: str, raw_request):
        return super()._get_response(body=body, call_method=call_method, raw_request=raw_request)

    def engine_handle(self, model: str):
        return self._get_configured_serve_handle(model)


# -- LLaMA-Factory ---------------------------------------------------------------------------------
def llamafactory_argument_classes() -> tuple[type, ...]:
    """The dataclasses LLaMA-Factory's run_exp parses a training's arguments into (model, data,
    training, finetuning, generating): what a train config's keys are checked against."""
    from llamafactory.hparams.parser import _TRAIN_ARGS

    return tuple(_TRAIN_ARGS)


# -- MLflow ----------------------------------------------------------------------------------------
def delete_run_param(run_id: str, key: str) -> bool:
    """Delete a run's parameter in a database store (MLflow has no API that changes or deletes one;
    in SQLite its bytes are overwritten too). False when the store is not a database this process
    opens (a tracking server's)."""
    import mlflow
    from mlflow.store.tracking.dbmodels.models import SqlParam
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from sqlalchemy import text

    store = mlflow.MlflowClient()._tracking_client.store
    if not isinstance(store, SqlAlchemyStore):
        return False
    with store.ManagedSessionMaker(read_only=False) as session:
        if store.db_type == "sqlite":
            session.execute(text("PRAGMA secure_delete = ON"))
        session.query(SqlParam).filter(SqlParam.run_uuid == run_id, SqlParam.key == key).delete()
    return True


# -- PyTorch ---------------------------------------------------------------------------------------
def compiled_graph_count() -> int:
    """How many graphs torch.compile has made in this process (TorchDynamo's own counter): 0 with
    torch_compile on means the model ran uncompiled."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


# -- transformers ----------------------------------------------------------------------------------
def forget_quantization(model) -> None:
    """A GGUF model is de-quantized on load but keeps its quantizer, and save_pretrained then
    refuses a "gguf" model: forget both (transformers has no API for a model already de-quantized)."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
