"""Training data in LLaMA-Factory's layout (a folder with dataset_info.json and the files it
names), from a local folder, an https URL or s3://. Remote folders are copied into a local cache,
then every dataset the config uses is checked row by row before training starts."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from loraflow.envs import PROJECT_ROOT
from loraflow.errors import UserError

CACHE_DIR = PROJECT_ROOT / ".cache" / "datasets"
INFO = "dataset_info.json"
# Where LLaMA-Factory 0.9.5 reads a dataset from instead of its file_name, when an entry has one
# (llamafactory/data/parser.py get_dataset_list): data that loraflow could neither check nor hash.
_SOURCE_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
_DEFAULT_ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}
_DEFAULT_SHAREGPT_COLUMNS = {"messages": "conversations"}


@dataclass
class DatasetFile:
    name: str  # the name in dataset_info.json, e.g. viggo-train
    file_name: str  # its file in the dataset folder, as dataset_info.json names it
    source: str  # where it came from: a local path or the remote URL
    sha256: str
    rows: list[dict]
    info_sha256: str  # of the dataset_info.json that named the file (expected_digests)
    columns: dict[str, str]  # what LLaMA-Factory reads each role from (columns_of)

    def instructions(self) -> list[str]:
        """Each row's instruction as LLaMA-Factory's alpaca format reads it: none ("") where the
        entry maps no prompt column, or the row's is empty."""
        column = self.columns.get("prompt")
        return [(row.get(column) or "") if column else "" for row in self.rows]


def is_remote(location: str) -> bool:
    return location.startswith(("https://", "http://", "s3://"))


def materialize(dataset_dir: str) -> Path:
    """Return a local folder holding `dataset_dir` (downloaded once into a cache if remote)."""
    if not is_remote(dataset_dir):
        path = Path(dataset_dir).expanduser().resolve()
        if not (path / "dataset_info.json").is_file():
            raise UserError(
                f"dataset_dir {path} has no dataset_info.json; point dataset_dir at a folder in "
                f"LLaMA-Factory's layout (see data/viggo/ for an example)."
            )
        return path
    local = CACHE_DIR / hashlib.sha256(dataset_dir.encode()).hexdigest()[:16]
    if (local / "dataset_info.json").is_file():
        return local
    where = _join(dataset_dir, "dataset_info.json")
    try:
        info = json.loads(_fetch(where))
    except json.JSONDecodeError as exc:
        raise UserError(f"{where} is not JSON ({exc}); dataset_dir must hold LLaMA-Factory's "
                        "dataset_info.json.") from None
    if not isinstance(info, dict) or not all(isinstance(spec, dict) for spec in info.values()):
        raise UserError(f"{where} must map dataset names to entries such as {{\"file_name\": \"train.jsonl\"}}.")
    for name, spec in info.items():
        _check_file_name(where, name, spec.get("file_name"))
        _check_source(where, name, spec)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=_ensure(CACHE_DIR)))
    try:
        (staging / "dataset_info.json").write_text(json.dumps(info, indent=2))
        for spec in info.values():
            if "file_name" in spec:
                (staging / spec["file_name"]).write_bytes(_fetch(_join(dataset_dir, spec["file_name"])))
        staging.rename(local)  # only complete downloads become visible
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return local


def _check_file_name(where: str, name: str, file_name) -> None:
    """A remote entry names a file inside its dataset folder: a plain relative name, so that the
    download cannot write outside the cache folder (on every Ray worker, too)."""
    if file_name is None:
        return
    parts = Path(str(file_name)).parts
    if not isinstance(file_name, str) or not parts or Path(file_name).is_absolute() or ".." in parts:
        raise UserError(f"{where}: dataset {name!r} has file_name {file_name!r}, which leaves the dataset "
                        "folder; use a name relative to it, such as \"train.jsonl\".")


def _check_source(where: str, name: str, spec: dict) -> None:
    source = next((key for key in _SOURCE_KEYS if key in spec), None)
    if source:
        raise UserError(f"{where}: dataset {name!r} has {source}, which LLaMA-Factory reads instead of its file_name: "
                        "data that loraflow can neither check nor record. Put the data in the dataset folder and "
                        "name it with file_name only.")


def load_datasets(dataset_dir: str, names: list[str]) -> list[DatasetFile]:
    """Check and read the named datasets; raise UserError naming the file and line at fault."""
    local = materialize(dataset_dir)
    info, info_sha256 = _read_info(local)
    missing = [n for n in names if n not in info]
    if missing:
        raise UserError(
            f"Unknown dataset {', '.join(map(repr, missing))}: {local / 'dataset_info.json'} "
            f"defines {sorted(info)}. Fix `dataset`/`eval_dataset` or add an entry there."
        )
    files = []
    for name in names:
        spec = info[name]
        _check_source(_join(dataset_dir, INFO), name, spec)
        if "file_name" not in spec:
            raise UserError(f"Dataset {name!r} in {local / 'dataset_info.json'} has no file_name.")
        path = local / spec["file_name"]
        if not path.is_file():
            raise UserError(
                f"Data file for dataset {name!r} is missing: {path} (named by "
                f"{local / 'dataset_info.json'}). Restore the file or fix its file_name."
            )
        rows = _read_rows(path)
        columns = columns_of(spec)
        _check_columns(name, path, rows, list(columns.values()))
        source = _join(dataset_dir, spec["file_name"]) if is_remote(dataset_dir) else str(path)
        files.append(DatasetFile(name, spec["file_name"], source, _sha256(path), rows, info_sha256, columns))
    return files


def expected_digests(files: list[DatasetFile]) -> dict[str, str]:
    """What a copy of the dataset folder must hold to be the data checked here (verify_digests): the
    SHA-256 of each file by its name in the folder, dataset_info.json's included (it maps names to files)."""
    return {INFO: files[0].info_sha256, **{f.file_name: f.sha256 for f in files}}


def verify_digests(folder: Path, expected: dict[str, str]) -> None:
    """Refuse a dataset folder whose files are not the ones checked before training: a Ray worker
    reads its own copy of dataset_dir, later than the driver's check and perhaps on another node."""
    changed = [name for name, digest in expected.items()
               if not (folder / name).is_file() or _sha256(folder / name) != digest]
    if changed:
        raise UserError(f"The training data in {folder} is not what loraflow checked before the run: "
                        f"{', '.join(sorted(changed))} changed or went missing since. Keep dataset_dir unchanged "
                        "while a training runs (on every Ray node), then train again.")


def split_names(value: str | None) -> list[str]:
    return [n.strip() for n in (value or "").split(",") if n.strip()]


def _read_info(local: Path) -> tuple[dict, str]:
    """dataset_info.json's mapping, and the SHA-256 of the bytes it was read from."""
    text = (local / INFO).read_bytes()
    try:
        info = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{local / 'dataset_info.json'} is not valid JSON: {exc}") from exc
    if not isinstance(info, dict) or not all(isinstance(spec, dict) for spec in info.values()):
        raise UserError(f"{local / 'dataset_info.json'} must map dataset names to their specs.")
    return info, hashlib.sha256(text).hexdigest()


def _read_rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from exc
        if not isinstance(rows, list):
            raise UserError(f"{path}: a .json data file must hold a list of objects.")
        numbered = list(enumerate(rows, start=1))
        unit = "item"
    else:
        numbered = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{path}:{lineno}: malformed JSON Lines row ({exc.msg} at column {exc.colno}). "
                    f"Each line must be one JSON object."
                ) from exc
        unit = "line"
    for number, row in numbered:
        if not isinstance(row, dict):
            raise UserError(f"{path} {unit} {number}: expected a JSON object, got {type(row).__name__}.")
    if not numbered:
        raise UserError(f"{path} holds no rows.")
    return [row for _, row in numbered]


def columns_of(spec: dict) -> dict[str, str]:
    """The columns LLaMA-Factory 0.9.5 reads (data/parser.py DatasetAttr.join): its defaults when the
    entry maps none, else the entry's mapping alone; a role it leaves out is not read (an alpaca
    entry without "prompt" trains on the input alone)."""
    if "columns" in spec:
        return dict(spec["columns"])
    return dict(_DEFAULT_SHAREGPT_COLUMNS if spec.get("formatting") == "sharegpt" else _DEFAULT_ALPACA_COLUMNS)


def _check_columns(name: str, path: Path, rows: list[dict], required: list[str]) -> None:
    for index, row in enumerate(rows, start=1):
        absent = [c for c in required if c not in row]
        if absent:
            raise UserError(
                f"{path} row {index}: missing column(s) {absent} that dataset {name!r} maps in "
                f"dataset_info.json (row has {sorted(row)}). Fix the data or the 'columns' mapping."
            )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fetch(url: str) -> bytes:
    if url.startswith("s3://"):
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, _, key = url[len("s3://") :].partition("/")
        try:
            return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise UserError(f"Cannot read {url}: {exc}. Check the path and the AWS_* settings.") from exc
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise UserError(f"Cannot download {url}: {exc}.") from exc
