"""The training config is checked against LLaMA-Factory's own argument dataclasses."""

from pathlib import Path

import pytest
import yaml
from conftest import TINY_CONFIG, config_with

from loraflow import train_config
from loraflow.errors import UserError

pytestmark = pytest.mark.unit  # pure logic: the fast tier (pytest -m unit)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "train").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_validate(path):
    cfg = train_config.load(path)
    assert cfg.llamafactory["finetuning_type"] == "lora"
    assert cfg.registered_model_name and cfg.task == ("viggo-nlg" if path.stem == "viggo-nlg" else "viggo-mr")


def test_seed_gpu_config_matches_the_tutorial():
    cfg = train_config.load(Path(__file__).resolve().parents[1] / "configs/train/qwen2.5-7b-gpu.yaml")
    lf = cfg.llamafactory
    assert lf["model_name_or_path"].endswith("Qwen2.5-7B-Instruct")
    assert (lf["lora_rank"], lf["lora_target"], lf["template"]) == (8, "all", "qwen")
    assert (lf["cutoff_len"], lf["max_samples"], lf["learning_rate"]) == (2048, 1000, 1e-4)
    # Tuned on one H100 (docs/benchmarks.md): packed rows (about the seed's 8 samples per step per
    # worker) filled in one pass, no recomputation, regional torch.compile, no per-step GPU waits.
    assert (lf["per_device_train_batch_size"], lf["gradient_accumulation_steps"]) == (1, 1)
    assert lf["packing"] is True and lf["preprocessing_num_workers"] == 1 and lf["torch_compile"] is True
    assert lf["disable_gradient_checkpointing"] is True
    assert cfg.ray.ray_worker_env == {"ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "1"}
    assert lf["logging_nan_inf_filter"] is False and lf["accelerator_config"] == {"non_blocking": True}
    assert (lf["num_train_epochs"], lf["lr_scheduler_type"], lf["warmup_ratio"]) == (5.0, "cosine", 0.1)
    assert lf["bf16"] is True and lf["eval_dataset"] == "viggo-val"
    assert cfg.ray.ray_num_workers == 4 and cfg.ray.resources_per_worker["GPU"] == 1
    assert cfg.ray.uses_gpu


def _write(tmp_path, **changes):
    return config_with(TINY_CONFIG, tmp_path, **changes)


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'lora_rnak'.*Did you mean 'lora_rank'"):
        train_config.load(_write(tmp_path, lora_rnak=8))


@pytest.mark.parametrize(
    "key, value, expected",
    [("lora_rank", "eight", "expected an integer"), ("learning_rate", "fast", "expected a number"),
     ("bf16", "yes please", "expected true or false"), ("ray_num_workers", 1.5, "expected an integer"),
     ("placement_strategy", "EVERYWHERE", "expected one of")],
)
def test_wrong_types_are_named(tmp_path, key, value, expected):
    with pytest.raises(UserError, match=rf"{key}: {expected}"):
        train_config.load(_write(tmp_path, **{key: value}))


@pytest.mark.parametrize("changes, drop, message", [
    ({}, ("task",),
     "task is missing from {path}: name what the adapter is trained for, one of ['viggo-mr', 'viggo-nlg']"),
    ({"task": "viggo"}, (), "task 'viggo' in {path} is not one loraflow knows: use one of ['viggo-mr', 'viggo-nlg']"),
], ids=["missing", "unknown"])
def test_the_task_is_named_and_known(tmp_path, changes, drop, message):
    path = config_with(TINY_CONFIG, tmp_path, drop, **changes)
    with pytest.raises(UserError) as refused:
        train_config.load(path)
    assert str(refused.value) == "Invalid training config:\n  " + message.format(path=path)


def test_values_the_libraries_would_refuse_once_training_started_are_refused_up_front(tmp_path):
    path = _write(tmp_path, learning_rate=-0.001, lora_dropout=1.0, max_samples=0)
    with pytest.raises(UserError) as refused:
        train_config.load(path)
    assert str(refused.value) == (f"Invalid training config:\n  learning_rate -0.001 in {path} must be > 0\n  "
                                  f"max_samples 0 in {path} must be >= 1, or null (every row)\n  "
                                  f"lora_dropout 1.0 in {path} must be in [0, 1)")
    assert train_config.load(_write(tmp_path, max_samples=None, max_steps=-1)).llamafactory["max_samples"] is None


def test_yaml_exponent_strings_become_numbers(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string; LLaMA-Factory would get a str learning rate.
    assert train_config.load(_write(tmp_path, learning_rate="1e-4")).llamafactory["learning_rate"] == 1e-4


def test_bad_resources_per_worker(tmp_path):
    with pytest.raises(UserError, match="resources_per_worker"):
        train_config.load(_write(tmp_path, resources_per_worker={"CPU": -1}))


def test_worker_env_values_must_be_strings(tmp_path):
    with pytest.raises(UserError, match=r"ray_worker_env must map variable names to strings.*OMP_NUM_THREADS"):
        train_config.load(_write(tmp_path, ray_worker_env={"OMP_NUM_THREADS": 4}))
    cfg = train_config.load(_write(tmp_path, ray_worker_env={"OMP_NUM_THREADS": "4"}))
    assert cfg.ray.ray_worker_env == {"OMP_NUM_THREADS": "4"}


def test_overrides_are_a_yaml_mapping():
    assert train_config.parse_overrides("{ray_num_workers: 2, resources_per_worker: {CPU: 1}}") == {
        "ray_num_workers": 2, "resources_per_worker": {"CPU": 1}}
    assert train_config.parse_overrides("") == {}
    with pytest.raises(UserError, match="YAML mapping"):
        train_config.parse_overrides("max_samples")


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError) as refused:
        train_config.load(tmp_path / "nope.yaml")
    assert str(refused.value) == f"Training config {tmp_path / 'nope.yaml'} does not exist; see configs/train/default.yaml."


@pytest.mark.parametrize("key", ["hf_hub_token", "ms_hub_token", "om_hub_token", "hub_token", "swanlab_api_key",
                                 "swanlab_lark_secret"])
def test_credentials_are_refused_in_configs(tmp_path, key):
    """A config is logged to MLflow as parameters: a credential in it is refused, and not repeated."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(TINY_CONFIG.read_text()), key: "hf_secret_value"}))
    with pytest.raises(UserError) as err:
        train_config.load(path)
    assert str(err.value) == (
        f"Invalid training config:\n  {key} in {path} holds a credential (its name says so). Credentials do not "
        "belong in a config, which is logged to MLflow: leave it out and set it in the environment instead (HF_TOKEN "
        "for the Hugging Face Hub; for Ray workers, the environment of the Ray nodes).")


@pytest.mark.parametrize("name", ["HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY", "MLFLOW_TRACKING_PASSWORD",
                                  "AWS_SESSION_TOKEN", "PGPASSWORD", "DB_PASS", "DATABASE_URL"])
def test_credentials_are_refused_in_the_worker_environment(tmp_path, name):
    path = _write(tmp_path, ray_worker_env={name: "s3cret-value", "NCCL_DEBUG": "INFO"})
    with pytest.raises(UserError) as err:
        train_config.load(path)
    assert f"ray_worker_env.{name} in {path} holds a credential (its name says so)" in str(err.value)
    assert "environment of the Ray nodes" in str(err.value) and "s3cret-value" not in str(err.value)


@pytest.mark.parametrize("key, value, why", [
    ("ray_worker_env.HTTPS_PROXY", "http://user:s3cret-value@proxy.example:3128", "a password in its user info"),
    ("ray_worker_env.HF_ENDPOINT", "https://s3cret-value@hub.example",
     "a user name in it (https://NAME@host), which web servers take as a token"),
    ("dataset_dir", "https://s3cret-value@data.example/viggo",
     "a user name in it (https://NAME@host), which web servers take as a token"),
    ("dataset_dir", "https://data.example/viggo?X-Amz-Signature=s3cret-value",
     "the query parameter X-Amz-Signature"),
], ids=["proxy_password", "endpoint_token", "dataset_dir_token", "dataset_dir_signature"])
def test_a_credential_inside_a_value_is_refused(tmp_path, key, value, why):
    """Values reach MLflow too (params, and config/train_config.yaml, which resume reads back)."""
    top, _, name = key.partition(".")
    path = _write(tmp_path, **{top: {name: value} if name else value})
    with pytest.raises(UserError) as err:
        train_config.load(path)
    assert str(err.value).startswith(f"Invalid training config:\n  {key} in {path} holds a credential ({why}). ")
    assert "s3cret-value" not in str(err.value)


def test_names_that_only_contain_token_are_not_credentials(tmp_path):
    cfg = train_config.load(_write(tmp_path, add_tokens="<x>", ignore_pad_token_for_loss=True,
                                   ray_worker_env={"TOKENIZERS_PARALLELISM": "false"}))
    assert cfg.llamafactory["add_tokens"] == "<x>"
    assert cfg.ray.ray_worker_env == {"TOKENIZERS_PARALLELISM": "false"}


SECRET_NAMES = ["PGPASSWORD", "DB_PASS", "DATABASE_URL", "api-key", "x-api-key", "sslpassword", "X-Amz-Signature",
                "X-Amz-Security-Token", "X-Amz-Credential", "hub_token", "HF_TOKEN", "token", "access_token",
                "swanlab_api_key", "apikey", "AWS_SECRET_ACCESS_KEY", "client_secret", "private_key", "SENTRY_DSN",
                "engine_env.HF_TOKEN", "MLFLOW_TRACKING_PASSWORD", "passphrase", "auth"]
NOT_SECRET_NAMES = ["add_tokens", "TOKENIZERS_PARALLELISM", "max_new_tokens", "tokenizer", "passes",
                    "ignore_pad_token_for_loss", "eos_token", "skip_special_tokens", "max_num_batched_tokens",
                    "tokenizer_source", "author", "bypass", "compass", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL_S3",
                    "NCCL_DEBUG", "OMP_NUM_THREADS", "max_lora_rank", "VLLM_CPU_KVCACHE_SPACE", "sslmode", "PWD"]


@pytest.mark.parametrize("name, secret", [(n, True) for n in SECRET_NAMES] + [(n, False) for n in NOT_SECRET_NAMES])
def test_which_names_are_taken_for_credentials(name, secret):
    from loraflow import tracking

    assert tracking.looks_secret(name) is secret


def test_tracking_uri_with_a_password_is_refused(monkeypatch):
    """The tracking URI travels to Ray workers and into messages: a password must not be in it."""
    from loraflow import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://loraflow:s3cret-pw@db.example:5432/mlflow")
    with pytest.raises(UserError) as err:
        tracking.configure()
    assert "PGPASSWORD" in str(err.value) and "s3cret-pw" not in str(err.value)


@pytest.mark.parametrize("uri, why", [
    ("https://mlflow.example/?token=abc123", "the query parameter token"),
    ("https://mlflow.example/?api_key=abc123", "the query parameter api_key"),
    ("https://mlflow.example/?x=1&access_token=abc123", "the query parameter access_token"),
    ("https://mlflow.example/?api-key=abc123", "the query parameter api-key"),
    ("https://abc123@mlflow.example", "a user name in it (https://NAME@host), which web servers take as a token"),
], ids=["token", "api_key", "access_token", "api-key", "userinfo_token"])
def test_tracking_uri_with_a_token_in_it_is_refused(monkeypatch, uri, why):
    from loraflow import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(UserError) as err:
        tracking.configure()
    assert str(err.value) == (
        f"MLFLOW_TRACKING_URI carries a credential ({why}). Leave it out of the URI and give it through the "
        "environment instead: MLFLOW_TRACKING_TOKEN (or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD) for a "
        "tracking server, PGPASSWORD or ~/.pgpass for PostgreSQL.")


@pytest.mark.parametrize("uri", ["postgresql://loraflow@db.example:5432/mlflow", "sqlite:////tmp/mlflow.db",
                                 "https://mlflow.example:5000", "s3://bucket/prefix", "INFO", "http://[::1"])
def test_a_uri_without_a_credential_passes(uri):
    """A database's user name is no secret (PGPASSWORD gives the password); a web host's user name is a token."""
    from loraflow import tracking

    assert tracking.uri_credential(uri) is None


@pytest.mark.parametrize("uri, shown", [
    ("postgresql://loraflow:pw@db.example:5432/mlflow?sslpassword=x", "postgresql://db.example:5432/mlflow"),
    ("https://TOKEN@mlflow.example/path?api-key=x#frag", "https://mlflow.example/path"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("sqlite:///mlflow.db?timeout=20", "sqlite:///mlflow.db"),
    ("databricks", "databricks"),
])
def test_messages_show_a_uri_without_user_info_or_query(uri, shown):
    from loraflow import tracking

    assert tracking.display_uri(uri) == shown


SMOLLM2_CONFIGS = [p for p in CONFIGS if yaml.safe_load(p.read_text()).get("template") == "smollm2"]


@pytest.mark.parametrize("path", SMOLLM2_CONFIGS, ids=[p.stem for p in SMOLLM2_CONFIGS])
def test_training_prompt_is_the_prompt_evaluate_and_serve_send(path):
    """LLaMA-Factory's template with the config's default_system makes, token for token, what the
    tokenizer's own chat template makes of evaluate's messages (and of a client's, in serve)."""
    import json

    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer

    from loraflow.tasks import Prompt

    root = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load(path.read_text())
    tokenizer = AutoTokenizer.from_pretrained(root / ".cache/models/SmolLM2-135M-Instruct")
    template = get_template_and_fix_tokenizer(
        tokenizer, DataArguments(template="smollm2", default_system=raw["default_system"]))
    for line in (root / "data/viggo/test.jsonl").read_text().splitlines()[:20]:
        row = json.loads(line)
        asked = Prompt("prompts:/viggo-mr-instruction/1", row["instruction"]).messages(row["input"])
        trained, _ = template.encode_oneturn(tokenizer, asked + [{"role": "assistant", "content": row["output"]}])
        served = tokenizer.apply_chat_template(asked, add_generation_prompt=True, tokenize=False)
        assert trained == tokenizer(served, add_special_tokens=False)["input_ids"]


def test_default_config_is_the_recipe_the_readme_reports():
    """README quotes benchmarks/results/quality-default.json for configs/train/default.yaml."""
    import json

    root = Path(__file__).resolve().parents[1]
    quality = json.loads((root / "benchmarks/results/quality-default.json").read_text())
    lf = train_config.load(root / quality["config"]).llamafactory
    recipe = {k: lf[k] for k in ("max_samples", "learning_rate", "lora_rank", "lora_alpha",
                                 "per_device_train_batch_size", "num_train_epochs", "bf16")}
    assert recipe == quality["recipe"]
    readme = (root / "README.md").read_text()
    assert f"{quality['exact_match']:.1%}" in readme and "quality-default.json" in readme


def test_every_cpu_config_has_the_defaults_speed_settings():
    """The CPU speed settings (benchmarks/cpu_step_profile.py) are the same in every SmolLM2 CPU
    config; test_train_job checks that they reach the worker and compile its layers."""
    root = Path(__file__).resolve().parents[1]

    def speed(name):
        cfg = train_config.load(root / "configs" / "train" / name)
        return ({k: cfg.llamafactory.get(k) for k in ("flash_attn", "torch_compile", "bf16", "use_cpu")},
                cfg.ray.ray_worker_env)

    assert speed("smollm2-cpu-long.yaml") == speed("default.yaml")
    assert speed("default.yaml")[0] == {"flash_attn": "disabled", "torch_compile": True, "bf16": True, "use_cpu": True}
