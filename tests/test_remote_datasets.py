"""Datasets read from elsewhere (dataset_dir an https:// or s3:// URL): downloaded from a real HTTP
server and a real S3-compatible server (moto), checked as a local folder is, and refused before
any download when their dataset_info.json would read data from elsewhere."""

import json
from pathlib import Path

import pytest
from servers import http_server, s3_server

from loraflow import datasets
from loraflow.errors import UserError


def test_https_dataset_dir_is_downloaded_and_checked(viggo_copy, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "CACHE_DIR", tmp_path / "cache")
    with http_server(viggo_copy) as url:
        files = datasets.load_datasets(url, ["viggo-val"])
    assert len(files[0].rows) == 714 and files[0].source == f"{url}/val.jsonl"
    assert (datasets.materialize(url) / "val.jsonl").is_file()  # cached: server is gone now


def test_s3_dataset_dir_is_downloaded_with_boto3(viggo_copy, tmp_path, monkeypatch):
    import boto3

    monkeypatch.setattr(datasets, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with s3_server() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="data")
        for name in ("dataset_info.json", "train.jsonl", "val.jsonl", "test.jsonl"):
            s3.upload_file(str(viggo_copy / name), "data", f"viggo/{name}")
        files = datasets.load_datasets("s3://data/viggo", ["viggo-test"])
        assert len(files[0].rows) == 1083
        with pytest.raises(UserError, match="Cannot read s3://data/nowhere/dataset_info.json"):
            datasets.materialize("s3://data/nowhere")


@pytest.mark.parametrize(
    "info, message",
    [
        ('{"viggo-val": {"file_name": "../escaped.jsonl"}}', "file_name '../escaped.jsonl', which leaves the dataset"),
        ('{"viggo-val": {"file_name": "/tmp/escaped.jsonl"}}', "file_name '/tmp/escaped.jsonl', which leaves"),
        ("not json at all", "dataset_info.json is not JSON"),
        ('["viggo-val"]', "must map dataset names to entries"),
    ],
    ids=["parent_dir", "absolute", "not_json", "not_a_mapping"],
)
def test_remote_dataset_info_is_refused_before_any_download(viggo_copy, tmp_path, monkeypatch, info, message):
    monkeypatch.setattr(datasets, "CACHE_DIR", tmp_path / "cache")
    (viggo_copy / "dataset_info.json").write_text(info)
    with http_server(viggo_copy) as url, pytest.raises(UserError) as refused:
        datasets.materialize(url)
    assert message in str(refused.value) and f"{url}/dataset_info.json" in str(refused.value)
    assert not (tmp_path / "escaped.jsonl").exists() and not Path("/tmp/escaped.jsonl").exists()
    assert not any((tmp_path / "cache").glob("*/dataset_info.json"))  # nothing half-written



@pytest.mark.parametrize("key", ["hf_hub_url", "cloud_file_name"])
def test_a_remote_dataset_read_from_elsewhere_is_refused_before_any_download(viggo_copy, tmp_path, monkeypatch, key):
    monkeypatch.setattr(datasets, "CACHE_DIR", tmp_path / "cache")
    (viggo_copy / "dataset_info.json").write_text(json.dumps({"viggo-val": {"file_name": "val.jsonl", key: "x"}}))
    with http_server(viggo_copy) as url, pytest.raises(UserError) as refused:
        datasets.load_datasets(url, ["viggo-val"])
    assert str(refused.value).startswith(f"{url}/dataset_info.json: dataset 'viggo-val' has {key}, which ")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
