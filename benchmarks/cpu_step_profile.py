"""Where a CPU training step of the default config goes: the plain PEFT loop of
train_step_overhead.py (LLaMA-Factory's model, batches and collator; forward, backward, AdamW
under bf16 autocast), one change at a time, each variant in a fresh process:

  plain     the model as transformers loads it (SDPA attention), glibc's default malloc
  eager     + eager attention (`flash_attn: disabled`)
  malloc    + the default config's malloc settings in the environment from the start
            (MALLOC_ARENA_MAX, MALLOC_MMAP_MAX_, MALLOC_TRIM_THRESHOLD_: freed blocks kept, not
            returned to the kernel)
  compiled  + each decoder layer compiled (`torch_compile` with regional compilation): the config

For each: the step times (the first --warm-up steps, which compile, excluded from the median),
the page faults a step (minor faults: memory the kernel had to hand over afresh), and the
operators that took the most time over --profile-steps steps (torch.profiler, self CPU time).
Run it in the train environment after ./setup.sh, with nothing else running:

    .venvs/train/bin/python benchmarks/cpu_step_profile.py --out benchmarks/results/cpu-step-profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402
import train_step_overhead  # noqa: E402

from loraflow import tracking  # noqa: E402

VARIANTS = ("plain", "eager", "malloc", "compiled")
MALLOC_KEYS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")


def variant_setup(variant: str) -> tuple[dict, dict[str, str]]:
    """The training arguments' changes and the environment of one variant."""
    worker_env = train_step_overhead.worker_env()
    upto = VARIANTS.index(variant)
    args = {"flash_attn": "disabled" if upto >= 1 else "auto", "torch_compile": upto >= 3}
    env = {k: worker_env[k] for k in MALLOC_KEYS} if upto >= 2 else {}
    if upto >= 3:
        env["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"] = worker_env["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"]
    return args, env


def measure(variant: str, samples: int, warm_up: int, profile_steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    changes, _ = variant_setup(variant)
    args = {**train_step_overhead.training_args(samples, tempfile.mkdtemp()), **changes}
    model, batches, step = train_step_overhead.peft_loop_parts(args)
    steps, faults = [], []
    for batch in batches:
        began, faulted = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step(batch)
        steps.append(time.perf_counter() - began)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[warm_up:warm_up + profile_steps]:
            step(batch)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    return {
        "attention": model.config._attn_implementation, "threads": torch.get_num_threads(),
        "step_s": steps, "median_step_s": statistics.median(steps[warm_up:]),
        "minor_faults_per_step": statistics.median(faults[warm_up:]),
        "tokens_per_step": statistics.mean(b["input_ids"].numel() for b in batches),
        "top_ops": [{"op": e.key, "share": round(e.self_cpu_time_total / total, 4), "calls": e.count,
                     "self_s_per_step": round(e.self_cpu_time_total / 1e6 / profile_steps, 4)} for e in ops[:15]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--samples", type=int, default=64, help="training rows (4 a step)")
    parser.add_argument("--warm-up", type=int, default=4, help="steps left out of the median")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("cpu_step_profile.json"))
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: measure one variant here
    parser.add_argument("--result", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.variant:
        result = measure(opts.variant, opts.samples, opts.warm_up, opts.profile_steps)
        Path(opts.result).write_text(json.dumps(result))
        return

    report = {"machine": machine.describe(), "git_commit": tracking.git_commit(), "command": " ".join(sys.argv),
              "samples": opts.samples, "variants": {}}
    for variant in opts.variants.split(","):
        result = Path(tempfile.mkstemp(suffix=".json")[1])
        _, env = variant_setup(variant)
        subprocess.run([sys.executable, __file__, "--variant", variant, "--result", str(result),
                        "--samples", str(opts.samples), "--warm-up", str(opts.warm_up),
                        "--profile-steps", str(opts.profile_steps)],
                       env={**os.environ, **env}, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        report["variants"][variant] = {"environment": env, **json.loads(result.read_text())}
        opts.out.write_text(json.dumps(report, indent=1))
    base = report["variants"].get("plain", {}).get("median_step_s")
    print("| variant | median step s | x plain | page faults a step | top operators (share of self time) |")
    print("| --- | --- | --- | --- | --- |")
    for variant, r in report["variants"].items():
        ratio = f"{r['median_step_s'] / base:.2f}" if base else ""
        top = ", ".join(f"{o['op']} {o['share']:.0%}" for o in r["top_ops"][:4])
        print(f"| {variant} | {r['median_step_s']:.2f} | {ratio} | {r['minor_faults_per_step']:.0f} | {top} |")


if __name__ == "__main__":
    main()
