"""Write ViGGO's original direction (meaning representation -> sentence) from the bundled
data/viggo splits: each row's output becomes the input, its input the output, under one
instruction. Run from the project: `python data/viggo-nlg/make.py` (tests/test_tasks.py checks
that the committed files are what it writes)."""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "viggo"
INSTRUCTION = "Write one sentence that says exactly what this meaning representation of a video game dialogue act says."
SPLITS = ("train", "val", "test")


def rows(split: str) -> list[dict]:
    lines = (SOURCE / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [{"instruction": INSTRUCTION, "input": row["output"], "output": row["input"]}
            for row in map(json.loads, lines)]


def files() -> dict[str, str]:
    """Each file's name and text."""
    written = {f"{split}.jsonl": "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows(split))
               for split in SPLITS}
    columns = {"prompt": "instruction", "query": "input", "response": "output"}
    info = {f"viggo-nlg-{split}": {"file_name": f"{split}.jsonl", "formatting": "alpaca", "columns": columns}
            for split in SPLITS}
    written["dataset_info.json"] = json.dumps(info, indent=2) + "\n"
    return written


if __name__ == "__main__":
    for name, text in files().items():
        (HERE / name).write_text(text, encoding="utf-8")
