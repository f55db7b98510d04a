"""Data checks: every dataset the config names is read and checked before training starts (datasets
read from an HTTP or S3 server: test_remote_datasets.py)."""

import json

import pytest

from loraflow import datasets
from loraflow.errors import UserError

pytestmark = pytest.mark.unit  # pure logic: the fast tier (pytest -m unit)


def test_bundled_viggo_splits_load():
    files = datasets.load_datasets(str(datasets.PROJECT_ROOT / "data" / "viggo"),
                                   ["viggo-train", "viggo-val", "viggo-test"])
    assert [len(f.rows) for f in files] == [5103, 714, 1083]
    assert files[0].sha256 == "db23aff1d85d8c13536c7227d9da6d9071a09864d62150f431502fa05b0672b0"


def test_unknown_dataset_name_lists_the_known_ones(viggo_copy):
    with pytest.raises(UserError, match=r"Unknown dataset 'viggo-trian'.*viggo-train"):
        datasets.load_datasets(str(viggo_copy), ["viggo-trian"])


def test_missing_data_file(viggo_copy):
    (viggo_copy / "val.jsonl").unlink()
    with pytest.raises(UserError, match=r"Data file for dataset 'viggo-val' is missing: .*val.jsonl"):
        datasets.load_datasets(str(viggo_copy), ["viggo-val"])


def test_malformed_row_reports_file_and_line(viggo_copy):
    lines = (viggo_copy / "val.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-5]  # cut the closing of line 3
    (viggo_copy / "val.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"val.jsonl:3: malformed JSON Lines row"):
        datasets.load_datasets(str(viggo_copy), ["viggo-val"])


def test_missing_columns_are_named(viggo_copy):
    rows = [json.loads(line) for line in (viggo_copy / "val.jsonl").read_text().splitlines()]
    del rows[4]["output"]
    (viggo_copy / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=r"val.jsonl row 5: missing column\(s\) \['output'\]"):
        datasets.load_datasets(str(viggo_copy), ["viggo-val"])


def test_the_instruction_is_read_from_the_column_the_entry_maps_and_none_without_one(viggo_copy):
    """LLaMA-Factory reads only the columns an entry maps, when it maps any: no "prompt", no instruction."""
    info = json.loads((viggo_copy / "dataset_info.json").read_text())
    info["input-only"] = {"file_name": "bare.jsonl", "columns": {"query": "sentence", "response": "mr"}}
    info["renamed"] = {"file_name": "renamed.jsonl", "columns": {"prompt": "task", "query": "input", "response": "output"}}
    (viggo_copy / "dataset_info.json").write_text(json.dumps(info))
    (viggo_copy / "bare.jsonl").write_text('{"sentence": "a", "mr": "inform(name[A])"}\n')
    (viggo_copy / "renamed.jsonl").write_text('{"task": "Parse:", "input": "a", "output": "b"}\n'
                                              '{"task": "", "input": "c", "output": "d"}\n')
    bare, renamed, val = datasets.load_datasets(str(viggo_copy), ["input-only", "renamed", "viggo-val"])
    assert bare.instructions() == [""] and renamed.instructions() == ["Parse:", ""]
    assert set(val.instructions()) == {json.loads(line)["instruction"] for line in open(viggo_copy / "val.jsonl")}


def test_folder_without_dataset_info(tmp_path):
    with pytest.raises(UserError, match="has no dataset_info.json"):
        datasets.load_datasets(str(tmp_path), ["viggo-val"])


SOURCE_KEYS = ["hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name"]


@pytest.mark.parametrize("key", SOURCE_KEYS)
def test_a_dataset_read_from_elsewhere_than_its_file_is_refused(viggo_copy, key):
    """LLaMA-Factory 0.9.5 (data/parser.py) reads these before file_name: data loraflow never checked nor hashed."""
    info = json.loads((viggo_copy / "dataset_info.json").read_text())
    info["viggo-val"][key] = "someone/else"
    (viggo_copy / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(UserError) as refused:
        datasets.load_datasets(str(viggo_copy), ["viggo-train", "viggo-val"])
    assert str(refused.value) == (
        f"{viggo_copy}/dataset_info.json: dataset 'viggo-val' has {key}, which LLaMA-Factory reads instead of its "
        "file_name: data that loraflow can neither check nor record. Put the data in the dataset folder and name it "
        "with file_name only.")


def test_a_worker_trains_only_on_the_files_the_driver_checked(viggo_copy):
    """The driver records each file's SHA-256 (and dataset_info.json's); a worker's copy must match."""
    expected = datasets.expected_digests(datasets.load_datasets(str(viggo_copy), ["viggo-train", "viggo-val"]))
    assert sorted(expected) == ["dataset_info.json", "train.jsonl", "val.jsonl"]
    datasets.verify_digests(viggo_copy, expected)  # unchanged: nothing to say

    with (viggo_copy / "val.jsonl").open("a") as rows:
        rows.write('{"instruction": "x", "input": "y", "output": "z"}\n')
    (viggo_copy / "train.jsonl").unlink()
    with pytest.raises(UserError) as refused:
        datasets.verify_digests(viggo_copy, expected)
    assert str(refused.value) == (
        f"The training data in {viggo_copy} is not what loraflow checked before the run: train.jsonl, val.jsonl "
        "changed or went missing since. Keep dataset_dir unchanged while a training runs (on every Ray node), then "
        "train again.")
