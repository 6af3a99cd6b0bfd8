"""Routing (`expert_mm.route`: the stable sort of a layer's top-k choices by expert) at training shapes:
torch's sort path against the counting sort of `triton_route.route_large_triton` (MOEUT_ROUTE_LARGE=1).

    python benchmarks/route.py [--shapes 16384x16x387,8192x24x565,16384x8x40] [--json out.json]

A shape is rows x choices x experts: the 244M and 1B FFNs (batch 16 and 8 of 1024 tokens) and
SwitchHead's value projection at 244M (4 heads x top-2 over 4 x 10 experts). Prints GPU-busy µs per
routing (the kernels' time from the profiler; a graphed step sees this, not the host's launch time),
the number of kernels, and the wall time of one eager call (--kernels: each kernel's share). Checks that both
give the same routing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from profile_step import gpu_and_wall_ms, kernel_times  # noqa: E402
from moeut import expert_mm  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="16384x16x387,8192x24x565,16384x8x40,65536x16x387")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--kernels", action="store_true", help="also print each path's kernels and their GPU µs")
    args = ap.parse_args()
    rows = []
    print(f"{'shape':16s} {'path':13s} {'GPU us':>7s} {'kernels':>7s} {'wall us':>8s}")
    for shape in args.shapes.split(","):
        R, K, E = map(int, shape.split("x"))
        expert = torch.randint(0, E, (R, K), device="cuda")
        results = {}
        for name, large in (("torch sort", False), ("counting sort", True)):
            expert_mm.LARGE_ROUTE_KERNEL = large
            fn = lambda: expert_mm.route(expert, E)  # noqa: E731
            gpu_ms, kernels, wall_ms = gpu_and_wall_ms(fn)
            gpu_us, wall_us = 1e3 * gpu_ms, 1e3 * wall_ms
            results[name] = fn()
            print(f"{shape:16s} {name:13s} {gpu_us:7.1f} {kernels:7d} {wall_us:8.1f}")
            if args.kernels:
                for kernel, (us, calls) in sorted(kernel_times(fn, 20).items(), key=lambda kv: -kv[1][0]):
                    print(f"{'':16s}   {us / 20:7.1f} us {calls // 20:3d}x  {kernel[:90]}")
            rows.append(dict(shape=shape, path=name, gpu_us=gpu_us, kernels=kernels, wall_us=wall_us))
        a, b = results.values()
        assert all(torch.equal(x, y) for x, y in ((a.offsets_E1, b.offsets_E1), (a.slot_N, b.slot_N),
                                                   (a.rows_N, b.rows_N))), f"{shape}: the two routings differ"
    expert_mm.LARGE_ROUTE_KERNEL = False
    if args.json:
        args.json.write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                                             rows=rows), indent=1))


if __name__ == "__main__":
    main()
