"""Where the time of one training step goes: torch.profiler over a few steps of a model, printed as
a table of GPU kernels (total time per step, share, calls) grouped by name.

    python benchmarks/profile_step.py --model moeut-244M --batch 16 [--top 30] [--trace trace.json]
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_throughput import build, training_step  # noqa: E402


def kernel_times(fn, iters: int, trace: Path = None):
    """{kernel name: [total us, calls]} of the GPU kernels `iters` calls of fn run (after one warm call)."""
    fn()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(str(trace))
    per_kernel = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            name = ev.name[:90]
            per_kernel[name][0] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            per_kernel[name][1] += 1
    return per_kernel


def clear_grads(module, *tensors) -> None:
    """Gradients back to None before a timed backward, as a training step's zero_grad(set_to_none=True)
    leaves them: accumulating into the last call's would time an fp32 add per parameter that a step
    never runs."""
    for t in (*module.parameters(), *tensors):
        t.grad = None


def busy_ms(per_kernel, iters: int) -> float:
    return sum(v[0] for v in per_kernel.values()) / iters / 1e3


def print_table(per_kernel, iters: int, top: int, unit: str = "step") -> None:
    total = sum(v[0] for v in per_kernel.values())
    print(f"{'ms/' + unit:>8s} {'share':>6s} {'calls':>6s}  kernel")
    for name, (us, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{us / iters / 1e3:8.3f} {100 * us / total:5.1f}% {n // iters:6d}  {name}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="moeut-244M")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--trace", type=Path, help="also write a Chrome trace")
    args = ap.parse_args()
    torch.manual_seed(0)
    step = training_step(build(args.model, None), args.batch)
    for _ in range(2):
        step()
    per_kernel = kernel_times(step, args.steps, args.trace)
    print(f"{args.model} batch {args.batch}: GPU busy {busy_ms(per_kernel, args.steps):.1f} ms per step, "
          f"{sum(v[1] for v in per_kernel.values()) / args.steps:.0f} kernels per step")
    print_table(per_kernel, args.steps, args.top)


if __name__ == "__main__":
    main()
