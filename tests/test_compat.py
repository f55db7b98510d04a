"""Each private API of a dependency that loraflow uses (all in src/loraflow/compat.py), pinned
against the installed version in the environment that uses it: an upgrade that moves or changes
one fails here, naming it and what to look at, instead of deep in a job."""

import inspect
import json
import subprocess
import textwrap

from conftest import ROOT

from loraflow import compat, envs


def _source_says(function, *needles: str) -> None:
    text = inspect.getsource(function)
    missing = [needle for needle in needles if needle not in text]
    assert not missing, (f"{function.__module__}.{function.__qualname__} no longer reads {missing}: "
                         f"the dependency changed; see src/loraflow/compat.py for what loraflow needs of it")


def test_ray_init_still_takes_the_underscore_arguments_and_the_loopback_switch():
    import ray
    from ray._private import ray_constants, services

    _source_says(ray.init, 'kwargs.pop("_temp_dir"', 'kwargs.pop("_metrics_export_port"',
                 'kwargs.pop("_system_config"')
    assert ray_constants.RAY_WORKER_NICENESS == "RAY_worker_niceness", "Ray's worker_niceness setting was renamed"
    assert ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR == compat.RAY_LOOPBACK_ONLY_ENV, \
        "Ray renamed its single-node loopback switch"
    _source_says(services.get_node_ip_address, "ENABLE_RAY_CLUSTER", "get_localhost_ip()")


def test_llamafactory_still_parses_into_its_argument_classes():
    classes = compat.llamafactory_argument_classes()
    assert [cls.__name__ for cls in classes] == ["ModelArguments", "DataArguments", "TrainingArguments",
                                                 "FinetuningArguments", "GeneratingArguments"], classes
    fields = {field for cls in classes for field in cls.__dataclass_fields__}
    assert {"model_name_or_path", "dataset", "learning_rate", "lora_rank", "template"} <= fields


def test_a_run_parameter_is_deleted_in_a_database_store_and_left_to_the_user_elsewhere(tracking_uri, tmp_path,
                                                                                      monkeypatch):
    import mlflow

    with mlflow.start_run() as run:
        mlflow.log_params({"overrides": "{hf_token: hf_x}", "config": "tiny.yaml"})
    assert compat.delete_run_param(run.info.run_id, "overrides") is True
    assert mlflow.MlflowClient().get_run(run.info.run_id).data.params == {"config": "tiny.yaml"}

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(f"file://{tmp_path / 'mlruns'}")  # no database this process opens
    try:
        with mlflow.start_run() as run:
            mlflow.log_param("overrides", "x")
        assert compat.delete_run_param(run.info.run_id, "overrides") is False
    finally:
        mlflow.set_tracking_uri(tracking_uri)


def test_torchdynamo_still_counts_the_graphs_it_makes():
    import torch

    before = compat.compiled_graph_count()
    torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(3))
    assert compat.compiled_graph_count() == before + 1


def test_transformers_still_refuses_to_save_through_the_quantizer_that_is_forgotten():
    from transformers import PreTrainedModel

    _source_says(PreTrainedModel.save_pretrained, 'getattr(self, "hf_quantizer", None)')


def test_ray_serve_llm_still_has_the_ingress_internals_loraflow_hooks_into():
    """In the infer environment (Ray Serve LLM needs vLLM): the OpenAI models and exception, the
    ingress's per-request coroutine and engine handle, with the arguments compat.IngressHooks passes."""
    script = textwrap.dedent("""
        import inspect, json
        from ray.serve.llm.ingress import OpenAiIngress
        from loraflow import compat
        ModelCard, ModelList, OpenAIHTTPException = compat.openai_api_models()
        error = OpenAIHTTPException(message="m", status_code=401, type="AuthenticationError")
        respond = OpenAiIngress._get_response
        handle = OpenAiIngress._get_configured_serve_handle
        class Hooked(compat.IngressHooks, OpenAiIngress):
            pass
        print(json.dumps({
            "exception": [error.message, error.status_code, error.type],
            "lists": "data" in ModelList.model_fields and "id" in ModelCard.model_fields,
            "respond_is_async_generator": inspect.isasyncgenfunction(respond),
            "respond_keywords": [p.name for p in inspect.signature(respond).parameters.values()
                                 if p.kind is p.KEYWORD_ONLY],
            "handle_parameters": list(inspect.signature(handle).parameters),
            "hooked_first": Hooked._get_response is compat.IngressHooks._get_response,
        }))
    """)
    proc = subprocess.run([str(envs.python_for("infer")), "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found == {
        "exception": ["m", 401, "AuthenticationError"], "lists": True, "respond_is_async_generator": True,
        "respond_keywords": ["body", "call_method", "raw_request"], "handle_parameters": ["self", "model_id"],
        "hooked_first": True,
    }, f"Ray Serve LLM's ingress changed; see compat.IngressHooks: {found}"
