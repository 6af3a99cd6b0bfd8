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

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    per_kernel = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            name = ev.name[:90]
            per_kernel[name][0] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            per_kernel[name][1] += 1
    total = sum(v[0] for v in per_kernel.values())
    print(f"{args.model} batch {args.batch}: GPU busy {total / args.steps / 1e3:.1f} ms per step, "
          f"{sum(v[1] for v in per_kernel.values()) / args.steps:.0f} kernels per step")
    print(f"{'ms/step':>8s} {'share':>6s} {'calls':>6s}  kernel")
    for name, (us, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"{us / args.steps / 1e3:8.2f} {100 * us / total:5.1f}% {n // args.steps:6d}  {name}")


if __name__ == "__main__":
    main()
