"""Every shipped evaluate, serve and promote config, the GPU ones included, is one its job accepts:
read by the job's own loader and turned into Ray's own config objects (Ray Data LLM's
vLLMEngineProcessorConfig, Ray Serve LLM's LLMConfig), whose validators run, in the environment
that runs the job. The GPU configs cannot run here; they must still be valid. (The train configs
are checked against LLaMA-Factory's argument classes in test_train_config.py.)"""

import json
import os
import subprocess
import textwrap

import pytest
import yaml
from conftest import ROOT

from loraflow import envs, job_configs, promotion_gates, tasks

LOCAL_BASE = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"

CHECK_IN_INFER_ENV = textwrap.dedent("""
    import json, sys
    from ray.data.llm import vLLMEngineProcessorConfig
    from ray.serve.llm import LLMConfig
    from loraflow import adapter_store, evaluate, serve

    for kind, path, base_model in json.loads(sys.argv[1]):
        if kind == "evaluate":
            config = evaluate.load_config(path)
            lora = None if config.merge_adapter else ("/tmp/adapter", config.lora_store)
            built = evaluate.processor_config(base_model, lora, base_model, config)
            assert isinstance(built, vLLMEngineProcessorConfig)
            print(json.dumps({"model_source": built.model_source, "engine_kwargs": built.engine_kwargs,
                              "accelerator_type": built.accelerator_type}))
        else:
            config = serve.load_config(path)
            built = LLMConfig(**serve.llm_config(config, base_model, adapter_store.LoraStore("s3://bucket/adapters", {})))
            print(json.dumps({"model_id": built.model_loading_config.model_id,
                              "model_source": built.model_loading_config.model_source,
                              "lora_path": built.lora_config.dynamic_lora_loading_path,
                              "max_num_adapters_per_replica": built.lora_config.max_num_adapters_per_replica,
                              "accelerator_type": built.accelerator_type, "engine_kwargs": built.engine_kwargs}))
""")

# What each test below builds, with the base model it names: all in one process of the infer
# environment (importing Ray Data LLM and Ray Serve LLM is most of each one's time).
BUILT = [("evaluate", "default.yaml", str(LOCAL_BASE)), ("evaluate", "viggo-nlg.yaml", str(LOCAL_BASE)),
         ("evaluate", "gpu.yaml", "Qwen/Qwen2.5-7B-Instruct"),
         ("serve", "default.yaml", str(LOCAL_BASE)), ("serve", "gpu.yaml", "Qwen/Qwen2.5-7B-Instruct")]


@pytest.fixture(scope="module")
def built() -> dict[tuple[str, str], dict]:
    """Each config of BUILT read by its job's loader and turned into Ray's config object, by (kind, name)."""
    triples = [(kind, str(ROOT / "configs" / kind / name), base_model) for kind, name, base_model in BUILT]
    proc = subprocess.run([str(envs.python_for("infer")), "-c", CHECK_IN_INFER_ENV, json.dumps(triples)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()[-len(BUILT):]
    return {(kind, name): json.loads(line) for (kind, name, _), line in zip(BUILT, lines, strict=True)}


def test_every_shipped_config_is_tested_here():
    shipped = {f"{kind}/{path.name}" for kind in ("evaluate", "serve", "promote", "deliver")
               for path in (ROOT / "configs" / kind).glob("*.yaml")}
    assert shipped == {"evaluate/default.yaml", "evaluate/gpu.yaml", "evaluate/viggo-nlg.yaml", "serve/default.yaml",
                       "serve/gpu.yaml", "promote/default.yaml", "promote/production.yaml",
                       "promote/viggo-nlg.yaml", "deliver/default.yaml"}


def test_the_delivery_config_delivers_the_default_model_with_the_shipped_cpu_configs():
    config = job_configs.load(job_configs.DeliverConfig, ROOT / "configs/deliver/default.yaml")
    [(name, policy)] = config.models.items()
    assert name == "viggo-smollm2-lora" and policy.to == "Production" and config.webhook is None
    assert (policy.evaluate_config, policy.promote_config, policy.parity.serve_config) == (
        str(ROOT / "configs/evaluate/default.yaml"), str(ROOT / "configs/promote/default.yaml"),
        str(ROOT / "configs/serve/default.yaml"))
    assert policy.parity.rows == 16 and policy.parity.min_equal == 0.9


@pytest.mark.parametrize("name", ["default.yaml", "viggo-nlg.yaml"])
def test_the_cpu_evaluation_configs_merge_the_adapter(built, name):
    built = built["evaluate", name]
    assert built["model_source"] == str(LOCAL_BASE) and built["accelerator_type"] is None
    assert "enable_lora" not in built["engine_kwargs"] and built["engine_kwargs"]["tokenizer"] == str(LOCAL_BASE)
    assert built["engine_kwargs"]["dtype"] == "bfloat16" and built["engine_kwargs"]["enable_prefix_caching"]


def test_the_gpu_evaluation_config_applies_the_adapter_per_row_on_gpus(built):
    built = built["evaluate", "gpu.yaml"]
    assert built["accelerator_type"] == "L4"
    assert built["engine_kwargs"]["enable_lora"] and built["engine_kwargs"]["max_lora_rank"] == 8


@pytest.mark.parametrize("name, model_id, base_model, accelerator, adapters", [
    ("default.yaml", "smollm2-135m-instruct", str(LOCAL_BASE), None, None),
    ("gpu.yaml", "qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct", "L4", 16),
])
def test_each_serving_config_builds_ray_serve_llms_config(built, name, model_id, base_model, accelerator, adapters):
    built = built["serve", name]
    assert built["model_id"] == model_id
    assert built["model_source"] == base_model and built["lora_path"] == "s3://bucket/adapters"
    assert built["accelerator_type"] == accelerator
    if adapters:
        assert built["max_num_adapters_per_replica"] == adapters
    profile = yaml.safe_load((ROOT / yaml.safe_load((ROOT / "configs/serve" / name).read_text())["engine"]).read_text())
    assert built["engine_kwargs"] == {**built["engine_kwargs"], **profile} and built["engine_kwargs"]["enable_lora"]


@pytest.mark.parametrize("name, profile", [("default.yaml", "smollm2-cpu.yaml"), ("gpu.yaml", "qwen2.5-7b-gpu.yaml")])
def test_evaluate_and_serve_name_one_engine_profile(name, profile):
    """The engines that score a version and serve it compute alike (the parity test's premise)."""
    for kind in ("evaluate", "serve"):
        assert yaml.safe_load((ROOT / "configs" / kind / name).read_text())["engine"] == f"configs/engines/{profile}"


@pytest.mark.parametrize("name, stages, task", [
    ("default.yaml", {"Staging", "Production"}, "viggo-mr"),
    ("production.yaml", {"Staging", "Production"}, "viggo-mr"),
    ("viggo-nlg.yaml", {"Staging", "Production"}, "viggo-nlg"),
])
def test_each_gates_file_loads_and_names_its_tasks_metrics(name, stages, task):
    gates = promotion_gates.load(ROOT / "configs" / "promote" / name).stages
    assert set(gates) == stages
    assert all(gate.minimum for gate in gates.values())
    recorded = set(tasks.get(task).recorded)
    for gate in gates.values():
        named = {*gate.minimum, *gate.maximum, *([gate.compare_with_production.metric]
                                                 if gate.compare_with_production else [])}
        assert named <= recorded, named - recorded
