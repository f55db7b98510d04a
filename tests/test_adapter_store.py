"""The LoRA store on a configured S3 bucket (a real S3-compatible server: moto's, on loopback):
publishing registered versions once, under immutable ids, and refusing what is not an adapter."""

from __future__ import annotations

import pytest
from servers import s3_server

from loraflow import adapter_store, registry
from loraflow.errors import UserError


@pytest.fixture
def bucket(monkeypatch):
    with s3_server() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        import boto3

        boto3.client("s3").create_bucket(Bucket="team-models")
        yield "s3://team-models/loraflow/adapters"


def _weights() -> bytes:
    import numpy as np
    from safetensors.numpy import save

    return save({"lora_A": np.zeros((8, 16), dtype=np.float32)})


def _version(tmp_path, files: dict[str, str | bytes]):
    import mlflow

    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    for name, content in files.items():
        path = folder / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), artifact_path=registry.ADAPTER_ARTIFACT_PATH)
    return registry.register_adapter("viggo-store-test", run.info.run_id, {}, "test", registry.file_digests(folder))


def test_publish_copies_a_version_once_under_its_own_id(tracking_uri, bucket, tmp_path):
    import boto3

    store = adapter_store.LoraStore(bucket)
    version = _version(tmp_path, {"adapter_config.json": '{"r": 8}', "adapter_model.safetensors": _weights()})
    assert store.publish(version) == "viggo-store-test-v1"
    assert store.adapters() == ["viggo-store-test-v1"]
    key = "loraflow/adapters/viggo-store-test-v1/adapter_model.safetensors"
    s3 = boto3.client("s3")
    first = s3.head_object(Bucket="team-models", Key=key)["LastModified"]

    assert store.publish(version) == "viggo-store-test-v1"  # already there: never rewritten
    assert s3.head_object(Bucket="team-models", Key=key)["LastModified"] == first


def test_a_version_without_adapter_config_is_refused_and_nothing_is_listed(tracking_uri, bucket, tmp_path):
    store = adapter_store.LoraStore(bucket)
    version = _version(tmp_path, {"model.bin": "not an adapter"})
    with pytest.raises(UserError, match="has no adapter_config.json"):
        store.publish(version)
    assert store.adapters() == []


@pytest.mark.parametrize("files, message", [
    ({"adapter_config.json": '{"r": 8}', "adapter_model.safetensors": b"\x10\x00\x00\x00garbage"},
     "adapter_model.safetensors is damaged"),
    ({"adapter_config.json": '{"r": 8}', "adapter_model.safetensors": b""}, "adapter_model.safetensors is damaged"),
    ({"adapter_config.json": '{"r": 8', "adapter_model.safetensors": "later"}, "adapter_config.json is not valid JSON"),
    ({"adapter_config.json": '{"r": 8}'}, "has no adapter_model.safetensors"),
    ({"adapter_config.json": '{"r": 8}', "adapter_model.bin": b"\x80\x04pickle"},
     r"holds adapter_model.bin, a pickle, which loraflow does not load \(it can run code\); save the adapter as "
     "safetensors"),
], ids=["corrupted-weights", "empty-weights", "broken-config", "no-weights", "pickled-weights"])
def test_a_damaged_adapter_is_refused_and_nothing_is_listed(tracking_uri, bucket, tmp_path, files, message):
    store = adapter_store.LoraStore(bucket)
    with pytest.raises(UserError, match=message) as refused:
        store.publish(_version(tmp_path, files))
    assert "viggo-store-test v1" in str(refused.value)
    assert "pickle" in message or "train a new version" in str(refused.value)  # the fix, named
    assert store.adapters() == []


@pytest.mark.unit
def test_store_must_be_an_s3_uri():
    with pytest.raises(UserError, match="must be an s3:// URI"):
        adapter_store.LoraStore("/tmp/adapters")


@pytest.mark.unit
@pytest.mark.parametrize("text, valid", [
    ("viggo-smollm2-lora-v3", True), ("a.b_c-1", True), ("../x", False), ("a/b", False),
    ("..", False), ("s3://b/a", False), ("", False), ("-x", False), ("x" * 129, False),
])
def test_adapter_ids_are_plain_folder_names(text, valid):
    assert registry.is_valid_adapter_id(text) is valid


def _adapter_files() -> dict[str, str | bytes]:
    return {"adapter_config.json": '{"r": 8}', "adapter_model.safetensors": _weights()}


def test_a_store_copy_changed_after_publishing_is_refused(tracking_uri, bucket, tmp_path):
    """The store's folder is never rewritten, so a changed one must not be trusted either."""
    import boto3

    store = adapter_store.LoraStore(bucket)
    version = _version(tmp_path, _adapter_files())
    store.publish(version)
    boto3.client("s3").put_object(Bucket="team-models", Body=b"other weights",
                                  Key="loraflow/adapters/viggo-store-test-v1/adapter_model.safetensors")
    with pytest.raises(UserError) as refused:
        store.publish(version)
    assert str(refused.value) == (
        "The LoRA store's copy of viggo-store-test-v1 (s3://team-models/loraflow/adapters/viggo-store-test-v1) "
        "differs from the registered adapter: it was changed after publishing. Delete that folder so that it is "
        "published again, and find out who changed it.")


def test_artifacts_changed_after_registration_are_refused_and_nothing_is_published(tracking_uri, bucket, tmp_path):
    import mlflow

    store = adapter_store.LoraStore(bucket)
    version = _version(tmp_path, _adapter_files())
    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / "adapter_config.json").write_text('{"r": 16}')
    mlflow.MlflowClient().log_artifact(version.run_id, str(changed / "adapter_config.json"),
                                       registry.ADAPTER_ARTIFACT_PATH)
    with pytest.raises(UserError) as refused:
        store.publish(version)
    assert "viggo-store-test v1's adapter in the artifact store" in str(refused.value)
    assert "differs from the files registered (adapter_config.json)" in str(refused.value)
    assert store.adapters() == []


def test_a_version_without_recorded_digests_is_refused(tracking_uri, bucket, tmp_path):
    from mlflow import MlflowClient

    store = adapter_store.LoraStore(bucket)
    version = _version(tmp_path, _adapter_files())
    MlflowClient().delete_model_version_tag(version.name, version.version, registry.ADAPTER_SHA256_TAG)
    with pytest.raises(UserError, match="has no loraflow.adapter_sha256 tag, so its adapter files cannot be verified"):
        store.publish(MlflowClient().get_model_version(version.name, version.version))
    assert store.adapters() == []


@pytest.mark.parametrize("relative", ["/{outside}/x", "../x", "./x", "a//b"])
def test_a_store_key_that_leaves_the_folder_is_refused_and_nothing_is_written(bucket, tmp_path, relative):
    import boto3

    outside, dst = tmp_path / "outside", tmp_path / "dst"
    outside.mkdir()
    dst.mkdir()
    store = adapter_store.LoraStore(bucket)
    folder = "loraflow/adapters/viggo-store-test-v1"
    s3 = boto3.client("s3")
    s3.put_object(Bucket="team-models", Key=f"{folder}/adapter_config.json", Body=b"{}")
    key = f"{folder}/{relative.format(outside=str(outside).lstrip('/'))}"
    s3.put_object(Bucket="team-models", Key=key, Body=b"written")
    assert key in [o["Key"] for o in s3.list_objects_v2(Bucket="team-models")["Contents"]]  # stored as given

    with pytest.raises(UserError) as refused:
        store.download("viggo-store-test-v1", dst)
    assert f"holds the key {key[len(folder) + 1:]!r}" in str(refused.value)
    assert "nothing was downloaded" in str(refused.value)
    assert list(outside.iterdir()) == [] and list(dst.iterdir()) == [] and not (tmp_path / "x").exists()


def test_the_local_store_leaves_this_processes_aws_settings_alone(monkeypatch, tmp_path):
    """serve's own S3 server when no lora_store is set: the process may also reach a real S3 (an
    artifact store), so its AWS settings stay as they were; the store carries its own."""
    import os

    mine = {"AWS_ENDPOINT_URL_S3": "https://s3.example.invalid", "AWS_ACCESS_KEY_ID": "AKIAREALKEY",
            "AWS_SECRET_ACCESS_KEY": "real-secret", "AWS_REGION": "eu-west-1"}
    for key, value in mine.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "adapter_config.json").write_text('{"r": 8}')
    with adapter_store.local_s3_server() as store:
        assert {key: os.environ[key] for key in mine} == mine
        assert store.upload("viggo-local-v1", tmp_path) == "viggo-local-v1"
        assert store.adapters() == ["viggo-local-v1"]
        assert store.settings["AWS_ENDPOINT_URL_S3"].startswith("http://127.0.0.1:")
        assert store.settings["AWS_ACCESS_KEY_ID"] == "loraflow"  # made up: moto takes any
    assert {key: os.environ[key] for key in mine} == mine
