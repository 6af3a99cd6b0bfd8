"""Tile-config sweep for the σ-MoE grouped-GEMM kernels (`kernels/expert_mm.py`), one pass at a time.

The kernels autotune over a deliberately short config list (every config compiles once per kernel
variant and process). This script times a wider list per pass, exactly as the FFN calls each pass,
checks each config's output against the default's, and prints a table per pass: which configs earn
a place in `_mm_configs` / `_wgrad_configs`. GPU only.

    python benchmarks/kernel_sweep.py [--shapes 244M,1B,244M-att] [--passes dW] [--segments 9] [--json sweep.json]

--segments N runs the weight-gradient passes as a training step does: one launch summing N
applications of the weight (`weight_grad_segments_triton`; the step sums all 9), here N copies of one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moeut.kernels import expert_mm as tem, weight_grad as twg
from moeut.ops.expert_mm import route

# d_model, experts, choices per token. The "-att" shapes are SwitchHead's V / O projections (heads x
# experts per head, heads x top-k), run through the FFN's passes: the same kernels at the attention's
# expert counts (the O projection's input is gathered in the model, not here).
SHAPES = {
    "244M": (1024, 387, 16),
    "1B": (1536, 565, 24),
    "44M": (412, 155, 12),
    "244M-att": (1024, 40, 8),
    "1B-att": (1536, 72, 12),
}
S = 128  # expert width

# (BM or BI, BN or BO, BK, warps, stages)
# The first sweep (seventh session) found BK 32 with deeper pipelines best; the lists now explore
# around the winners (RESULTS.md F has the first sweep's tables).
MM = [
    (128, 128, 32, 8, 5),
    (256, 128, 64, 8, 4),
    (128, 128, 64, 8, 4),
    (128, 128, 32, 8, 4),
    (128, 128, 32, 8, 6),
    (256, 128, 32, 8, 4),
    (256, 128, 32, 8, 5),
    (128, 128, 32, 4, 5),
    (64, 128, 32, 4, 6),
    (256, 64, 32, 8, 5),
    (128, 64, 64, 8, 4),
]
LOOP_N = [
    (128, 64, 64, 8, 4),
    (128, 64, 64, 8, 5),
    (128, 64, 64, 8, 3),
    (128, 32, 64, 4, 6),
    (128, 32, 64, 8, 6),
    (256, 64, 64, 8, 4),
    (256, 64, 64, 8, 5),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (64, 64, 64, 4, 5),
]
WGRAD = [
    (128, 128, 32, 8, 5),
    (64, 128, 64, 4, 4),
    (128, 128, 32, 8, 4),
    (128, 128, 32, 8, 6),
    (128, 128, 32, 4, 5),
    (64, 128, 32, 4, 6),
    (128, 64, 32, 4, 6),
    (256, 128, 32, 8, 4),
    (128, 128, 16, 8, 8),
    (64, 128, 64, 4, 5),
    (128, 128, 64, 8, 4),
    (128, 256, 32, 8, 4),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 3),
]


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1, a logic check only


def bench(fn):
    if DEVICE == "cpu":
        import time

        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def _config(c, wgrad: bool):
    import triton

    a, b, k, warps, stages = c
    names = ("BI", "BO", "BK") if wgrad else ("BM", "BN", "BK")
    return triton.Config(dict(zip(names, (a, b, k))), num_warps=warps, num_stages=stages)


def sweep_pass(name, kernel, configs, fn, flops, wgrad=False, top=None):
    """Time fn() with each config forced on `kernel`; rows sorted fastest first."""
    saved = kernel.configs, dict(kernel.cache)
    kernel.cache.clear()
    ref = fn().float()  # the default (autotuned) config's output
    default_cfg = kernel.best_config
    rows = []
    try:
        for c in configs[:top] if top else configs:
            kernel.configs = [_config(c, wgrad)]
            kernel.cache.clear()
            try:
                out = fn().float()
                err = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                ms = bench(fn)
                rows.append(dict(pass_=name, config=list(c), ms=ms, tflops=flops / ms / 1e9, rel_err=err))
            except Exception as e:  # out of shared memory / registers: not a candidate
                rows.append(dict(pass_=name, config=list(c), ms=float("inf"), tflops=0.0, error=str(e)[:100]))
    finally:
        kernel.configs, kernel.cache = saved[0], saved[1]
    rows.sort(key=lambda r: r["ms"])
    d = default_cfg.kwargs if default_cfg is not None else {}
    print(
        f"\n{name}  (autotuned default: {d}, warps {getattr(default_cfg, 'num_warps', '?')}, "
        f"stages {getattr(default_cfg, 'num_stages', '?')})"
    )
    print(f"  {'config (tile a, b, k, warps, stages)':40s} {'ms':>8s} {'TFLOP/s':>8s} {'rel err':>9s}")
    for r in rows:
        if "error" in r:
            print(f"  {str(tuple(r['config'])):40s} failed: {r['error']}")
        else:
            print(f"  {str(tuple(r['config'])):40s} {r['ms']:8.3f} {r['tflops']:8.1f} {r['rel_err']:9.1e}")
    return rows


def sweep_shape(name, D, E, K, T, top=None, passes_filter=(), segments=1):
    dt = torch.bfloat16
    x = torch.randn(T, D, device=DEVICE, dtype=dt)
    w1 = torch.randn(E, D, S, device=DEVICE, dtype=dt) / D**0.5
    w2 = torch.randn(E, S, D, device=DEVICE, dtype=dt) / S**0.5
    expert = torch.rand(T, E, device=DEVICE).topk(K, dim=-1).indices
    r = route(expert, E)
    N = T * K
    h = torch.randn(N, S, device=DEVICE, dtype=dt)
    gh = torch.randn(N, S, device=DEVICE, dtype=dt)
    gate = torch.rand(N, device=DEVICE)
    group = r.slot_N // K
    gy_T = torch.randn(T, D, device=DEVICE, dtype=dt)
    flops = 2 * N * D * S
    mm, wg = tem._expert_mm_kernel, twg._weight_grad_kernel
    f32 = torch.float32

    def wgrad(*segment):  # one launch over `segments` applications (copies of this one)
        return lambda: twg.weight_grad_segments_triton([segment] * segments, f32)

    passes = [
        ("up fwd (gather x)", mm, MM, lambda: tem.grouped_mm_triton(x, w1, r.offsets_E1, r.rows_N), False),
        (
            "down dx (gather dy)",
            mm,
            MM,
            lambda: tem.grouped_mm_triton(gy_T, w2.transpose(1, 2), r.offsets_E1, group),
            False,
        ),
        (
            "down fwd (gate, scatter; loop over N)",
            mm,
            LOOP_N,
            lambda: tem.grouped_mm_triton(h, w2, r.offsets_E1, None, gate, r.slot_N),
            False,
        ),
        (
            "up dx (scatter; loop over N)",
            mm,
            LOOP_N,
            lambda: tem.grouped_mm_triton(gh, w1.transpose(1, 2), r.offsets_E1, None, None, r.slot_N),
            False,
        ),
        ("up dW (gather x)", wg, WGRAD, wgrad(x, gh, r.offsets_E1, r.rows_N, None, None, None), True),
        (
            "down dW (gather dy, gated h given: the step's form)",
            wg,
            WGRAD,
            wgrad(h, gy_T, r.offsets_E1, None, group, None, None),
            True,
        ),
        ("down dW (gather, gate dy)", wg, WGRAD, wgrad(h, gy_T, r.offsets_E1, None, group, gate, None), True),
    ]
    if name.endswith("-att"):  # SwitchHead's value weight gradient: x and d v gathered, gate on x
        gv = torch.randn(N // 2, S, device=DEVICE, dtype=dt)  # one row per (token, head): top-2 per head
        passes.append(
            (
                "value dW (gather x, gather dv, gate)",
                wg,
                WGRAD,
                wgrad(x, gv, r.offsets_E1, r.rows_N, r.slot_N // 2, gate, None),
                True,
            )
        )
    rows = []
    for pname, kernel, configs, fn, is_wgrad in passes:
        if passes_filter and not any(p in pname for p in passes_filter):
            continue
        pass_flops = flops * segments if is_wgrad else flops
        for row in sweep_pass(f"{name} {pname}", kernel, configs, fn, pass_flops, is_wgrad, top):
            rows.append(dict(shape=name, **row))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="244M,1B")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--top", type=int, default=None, help="only the first N configs of each list")
    ap.add_argument("--passes", default="", help="comma-separated substrings: only the passes whose names hold one")
    ap.add_argument("--segments", type=int, default=1, help="applications per weight-gradient launch (the step: 9)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    out = dict(
        gpu=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter)", torch=torch.__version__, rows=[]
    )
    for name in args.shapes.split(","):
        D, E, K = SHAPES[name]
        out["rows"] += sweep_shape(
            name, D, E, K, args.tokens, args.top, [p for p in args.passes.split(",") if p], args.segments
        )
        if args.json:
            args.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
