"""Where one steady training step of a GPU variant spends its time: torch.profiler over steps
11-13 of the variant's training path (the same as gpu_train_throughput.py), kernels sorted by GPU
time. Comparing the sum of kernel time with the step time shows how long the GPU waits.

    python benchmarks/gpu_profile_steps.py --model /tmp/qwen7b [--variant shipped] [--samples 200]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_train_throughput as bench  # noqa: E402

FIRST, LAST = 10, 13  # profile the steps after FIRST up to LAST: past warm-up and compiling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a model folder made by gpu_train_throughput.py")
    parser.add_argument("--variant", default="shipped")
    parser.add_argument("--samples", type=int, default=200, help="enough for LAST steps (four_rows: 34 a step)")
    opts = parser.parse_args()

    import torch
    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback

    from loraflow.ray_training import regional_compile_callback

    args = bench.training_args(opts.variant, opts.model, samples=opts.samples)

    class Profile(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == FIRST:
                torch.cuda.synchronize()
                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                                   torch.profiler.ProfilerActivity.CUDA])
                self.profiler.__enter__()
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == LAST:
                torch.cuda.synchronize()
                seconds = time.perf_counter() - self.start
                self.profiler.__exit__(None, None, None)
                events = self.profiler.key_averages()
                print(events.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70))
                # Kernel events only: an operator's row repeats its kernels' time (as the table's total).
                kernels = sum(e.self_device_time_total for e in events
                              if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
                steps = LAST - FIRST
                print(f"{opts.variant}: {seconds / steps * 1e3:.0f} ms a step (profiled), GPU kernels "
                      f"{kernels / steps * 1e3:.0f} ms of it")
                memory = torch.cuda.memory_stats()
                print(f"{opts.variant}: peak allocated {memory['allocated_bytes.all.peak'] / 2**30:.1f} GiB, "
                      f"reserved {memory['reserved_bytes.all.peak'] / 2**30:.1f} GiB, "
                      f"allocator retries {memory['num_alloc_retries']} (each frees cached blocks: a sync)")
                control.should_training_stop = True

    run_exp(args, callbacks=[regional_compile_callback(), Profile()])  # compiled as the train job's worker compiles


if __name__ == "__main__":
    main()
