"""An adapter merged into its base model's weights with LLaMA-Factory's own `export`, run in the
train environment (where LLaMA-Factory and PEFT are). evaluate uses it on CPU engines: vLLM's
CPU LoRA kernels gather every token's adapter matrices in float32, which made the whole test
split about 7x slower than merged weights on 2 cores (docs/benchmarks-log.md part 4)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from loraflow import envs


def merge_into_base(base_model: str, adapter_dir: Path, out_dir: Path) -> Path:
    """Write base + adapter as one model folder at `out_dir` (float32: one rounding, in the
    engine) and return it. Only weights and config are used from it: the engine keeps the base
    model's tokenizer, so the prompt stays the one training used."""
    arguments = {
        "model_name_or_path": base_model,
        "adapter_name_or_path": str(adapter_dir),
        "finetuning_type": "lora",
        "template": "empty",  # the exported tokenizer is not used
        "export_dir": str(out_dir),
        "export_device": "cpu",
        "infer_dtype": "float32",
    }
    arguments_file = out_dir.with_suffix(".yaml")
    arguments_file.write_text(yaml.safe_dump(arguments))
    log = out_dir.with_suffix(".log")
    with open(log, "w") as output:
        done = subprocess.run([str(envs.python_for("train")), "-m", "llamafactory.cli", "export", str(arguments_file)],
                              stdout=output, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not (out_dir / "config.json").is_file():
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"merging the adapter {adapter_dir} into {base_model} failed "
                           f"(exit {done.returncode}):\n{tail}")
    return out_dir
