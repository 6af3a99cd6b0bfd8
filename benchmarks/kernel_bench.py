"""Kernel benchmark and GPU parity check for the σ-MoE expert projections (`moeut::expert_mm`).

For the 44M, 244M and 1B FFN shapes (tokens x d_model, E experts of 128 units, top-k), on random
routing: checks each pass (forward, input gradient, weight gradient) against the gather + einsum
reference in fp32 and bf16, then times each pass, the whole FFN forward and forward+backward, and
`torch._grouped_mm` (on a pre-gathered copy) as a second baseline. Prints TFLOP/s of useful work and
the roofline bound (max of compute time at the measured matmul rate and memory time at the
measured copy bandwidth).

    python benchmarks/kernels.py [--json out.json] [--tokens 16384] [--shapes 244M] [--kernels 30]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from profile_step import busy_ms, clear_grads, kernel_times, print_table
from moeut.ops.expert_mm import expert_mm, expert_mm_combine, route
from moeut.ops.reference import fp64_reference
from moeut.moe import SigmaMoE

SHAPES = {  # d_model, experts, k
    "44M": (412, 155, 12),
    "244M": (1024, 387, 16),
    "1B": (1536, 565, 24),
}
S = 128


def bench(fn, warmup=5, rep=30):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def ceilings():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    mm_tflops = 2 * 8192**3 / ms / 1e9
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    bw = 2 * src.numel() / ms / 1e9  # TB/s (read + write)
    return mm_tflops, bw


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# The passes one FFN application runs, by their row names in `time_shape` (the rows' rooflines summed:
# the kernels run one after another, so this dataflow's time cannot fall below the sum).
FFN_FWD_PASSES = ("up fwd (gather x)", "down fwd (gate, scatter)", "top-k sum, kernel -> bf16")
FFN_BWD_PASSES = (
    "down dx (gather dy)",
    "up dx (scatter)",
    "top-k sum, kernel -> fp32",
    "up dW (gather x)",
    "down dW (gather, gate dy)",
)


def ffn_roofline_ms(rows, shape):
    """(forward, forward + backward) roofline ms of the whole FFN: the sums of its passes' bounds."""
    bound = {r["pass_"]: r["roofline_ms"] for r in rows if r["shape"] == shape}
    fwd = sum(bound[p] for p in FFN_FWD_PASSES)
    return fwd, fwd + sum(bound[p] for p in FFN_BWD_PASSES)


def parity(D, E, K, T, dtype):
    """Max relative error of forward, input grad and weight grad vs the einsum reference (fp64)."""
    x = torch.randn(T, D, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(E, D, S, device="cuda", dtype=dtype) / D**0.5).requires_grad_()
    expert = torch.randint(0, E, (T, K), device="cuda")
    expert[: T // 4] = 0  # a crowded expert
    expert[expert == E - 1] = E - 2  # and an empty one
    r = route(expert, E)
    y = expert_mm(x, w, r)
    g = torch.randn_like(y)
    y.backward(g)
    # fp64 per-expert reference (the einsum one would materialise T*K weight copies)
    ref, ref_dx, ref_dw = fp64_reference(x, w, g, r)
    return dict(
        fwd=rel(y, ref),
        dx=rel(x.grad, ref_dx),
        dw=rel(w.grad, ref_dw),
        empty_expert_grad_zero=bool((w.grad[E - 1] == 0).all()),
    )


def parity_combine(D, E, K, T, dtype):
    """The fused down projection + gated top-k sum (Triton: gate and scatter in the epilogue, gathered
    and scaled gradient rows in the backward) against the same function on the per-expert PyTorch path
    in fp64. Max relative error of out, d h, d w, d gate."""
    h = torch.randn(T * K, S, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(E, S, D, device="cuda", dtype=dtype) / S**0.5).requires_grad_()
    gate = torch.rand(T, K, device="cuda", dtype=dtype, requires_grad=True)
    expert = torch.randint(0, E - 1, (T, K), device="cuda")
    r = route(expert, E)
    out = expert_mm_combine(h, w, r, gate, gather=False)
    g = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (h, w, gate), g))
    from moeut.settings import settings

    settings.triton = False
    try:
        hd, wd, gd = (t.detach().double().requires_grad_() for t in (h, w, gate))
        ref = expert_mm_combine(hd, wd, r, gd, gather=False)
        want = (ref, *torch.autograd.grad(ref, (hd, wd, gd), g.double()))
    finally:
        settings.triton = True
    return {k: rel(a, b) for k, a, b in zip(("out", "dh", "dw", "dgate"), got, want)}


def time_shape(name, D, E, K, T, mm_tflops, bw, top=0):
    dt = torch.bfloat16
    x = torch.randn(T, D, device="cuda", dtype=dt)
    w1 = torch.randn(E, D, S, device="cuda", dtype=dt) / D**0.5
    w2 = torch.randn(E, S, D, device="cuda", dtype=dt) / S**0.5
    expert = torch.rand(T, E, device="cuda").topk(K, dim=-1).indices
    r = route(expert, E)
    N = T * K
    h = torch.randn(N, S, device="cuda", dtype=dt)
    gh = torch.randn(N, S, device="cuda", dtype=dt)
    op, wgrad = torch.ops.moeut.grouped_mm, torch.ops.moeut.grouped_mm_weight_grad
    gate = torch.rand(N, device="cuda")
    group = r.slot_N // K
    gy_T = torch.randn(T, D, device="cuda", dtype=dt)  # d out of the combine, one row per token
    flops = 2 * N * D * S
    rows = []

    def add(pass_name, ms, bytes_moved):
        bound = max(flops / mm_tflops / 1e9, bytes_moved / bw / 1e9)
        rows.append(
            dict(
                shape=name,
                pass_=pass_name,
                ms=ms,
                tflops=flops / ms / 1e9,
                roofline_ms=bound,
                roofline_tflops=flops / bound / 1e9,
            )
        )

    def add_bandwidth_bound(pass_name, ms, bytes_moved):  # reported as TB/s against the copy bandwidth
        rows.append(
            dict(
                shape=name,
                pass_=pass_name,
                ms=ms,
                tflops=0.0,
                tb_per_s=bytes_moved / ms / 1e9,
                roofline_ms=bytes_moved / bw / 1e9,
                roofline_tflops=0.0,
            )
        )

    # The passes exactly as the σ-MoE FFN runs them (see ops/expert_mm.py): bytes are the compulsory traffic.
    add(
        "up fwd (gather x)",
        bench(lambda: op(x, w1, r.offsets_E1, r.rows_N, None, None)),
        2 * (T * D + E * D * S + N * S),
    )
    add(
        "down fwd (gate, scatter)",
        bench(lambda: op(h, w2, r.offsets_E1, None, gate, r.slot_N)),
        2 * (N * S + E * S * D + N * D),
    )
    add(
        "down dx (gather dy)",
        bench(lambda: op(gy_T, w2.transpose(1, 2), r.offsets_E1, group, None, None)),
        2 * (T * D + E * S * D + N * S),
    )
    add(
        "up dx (scatter)",
        bench(lambda: op(gh, w1.transpose(1, 2), r.offsets_E1, None, None, r.slot_N)),
        2 * (N * S + E * S * D + N * D),
    )
    # The narrow passes (I = 128) in the other grouped-GEMM form too, to keep the faster one as default.
    from moeut.kernels import expert_mm as triton_expert_mm

    rule = triton_expert_mm.use_loop_n
    forced = rule(S, D, N, E)
    triton_expert_mm.use_loop_n = lambda I, O, N, E: (not forced) and I <= 128  # the other form
    form = "loop over N" if not forced else "column blocks"
    add(
        f"down fwd [{form}]",
        bench(lambda: op(h, w2, r.offsets_E1, None, gate, r.slot_N)),
        2 * (N * S + E * S * D + N * D),
    )
    add(
        f"up dx [{form}]",
        bench(lambda: op(gh, w1.transpose(1, 2), r.offsets_E1, None, None, r.slot_N)),
        2 * (N * S + E * S * D + N * D),
    )
    triton_expert_mm.use_loop_n = rule
    # fp32 master weights (training under autocast): rounded tile by tile in the kernel, against a
    # cast to bf16 followed by the bf16 kernel (what every application did before).
    w1_32, w2_32 = w1.float(), w2.float()
    add(
        "up fwd, fp32 weight rounded in kernel",
        bench(lambda: op(x, w1_32, r.offsets_E1, r.rows_N, None, None)),
        2 * (T * D + 2 * E * D * S + N * S),
    )
    add(
        "up fwd, fp32 weight cast first",
        bench(lambda: op(x, w1_32.to(dt), r.offsets_E1, r.rows_N, None, None)),
        2 * (T * D + 2 * E * D * S + N * S),
    )
    add(
        "down dx, fp32 weight rounded in kernel",
        bench(lambda: op(gy_T, w2_32.transpose(1, 2), r.offsets_E1, group, None, None)),
        2 * (T * D + 2 * E * S * D + N * S),
    )
    add(
        "down dx, fp32 weight cast first",
        bench(lambda: op(gy_T, w2_32.to(dt).transpose(1, 2), r.offsets_E1, group, None, None)),
        2 * (T * D + 2 * E * S * D + N * S),
    )
    add(
        "up dW (gather x)",
        bench(lambda: wgrad(x, gh, r.offsets_E1, r.rows_N, None, None, torch.float32)),
        2 * (T * D + N * S) + 4 * E * D * S,
    )

    def down_dw():
        return wgrad(h, gy_T, r.offsets_E1, None, group, gate, torch.float32)

    down_dw_bytes = 2 * (N * S + T * D) + 4 * E * S * D
    add("down dW (gather, gate dy)", bench(down_dw), down_dw_bytes)
    # A shared weight's gradient summed over its applications (ops/shared_weights.py): each launch adds into
    # the fp32 sum, reading and writing it; with WGRAD_DEFER one launch sums several applications.
    from moeut.kernels.weight_grad import weight_grad_segments_triton

    for label, seg, io_bytes in (
        ("up dW", (x, gh, r.offsets_E1, r.rows_N, None, None, None), 2 * (T * D + N * S)),
        ("down dW", (h, gy_T, r.offsets_E1, None, group, gate, None), 2 * (N * S + T * D)),
    ):
        acc = torch.zeros(E, seg[0].shape[1], seg[1].shape[1], device="cuda")
        for n in (1, 3, 9):
            ms = bench(lambda: weight_grad_segments_triton([seg] * n, accumulate_into=acc)) / n
            add(
                f"{label}, {n} application{'s' if n > 1 else ''} per launch, added to fp32 (per application)",
                ms,
                io_bytes + 8 * E * D * S / n,
            )
    xs = x[r.rows_N]
    offs = r.offsets_E1[1:].to(torch.int32)
    for layout, wb in (("row-major", w1), ("column-major", w1.transpose(1, 2).contiguous().transpose(1, 2))):
        try:
            ms = bench(lambda: torch._grouped_mm(xs, wb, offs=offs))
            add(f"torch._grouped_mm up fwd (pre-gathered, {layout} B)", ms, 2 * (N * D + E * D * S + N * S))
            break
        except Exception as e:  # not every build or layout has it
            print(f"  torch._grouped_mm ({layout}) unavailable: {type(e).__name__}: {str(e)[:120]}")

    # The top-k sum over the [T, K, D] scatter buffer: bandwidth-bound, reported as TB/s.
    from moeut.ops.grouped_mm import _sum_choices_torch
    from moeut.kernels.sum_choices import sum_choices_triton

    y_ND = torch.randn(N, D, device="cuda", dtype=dt)
    for label, fn, out_size in (
        ("top-k sum, torch.sum -> bf16", lambda: _sum_choices_torch(y_ND, T, dt), 2),
        ("top-k sum, torch.sum -> bf16 -> fp32", lambda: _sum_choices_torch(y_ND, T, dt).float(), 2 + 4 + 4),
        ("top-k sum, kernel -> bf16", lambda: sum_choices_triton(y_ND, T, dt), 2),
        ("top-k sum, kernel -> fp32", lambda: sum_choices_triton(y_ND, T, torch.float32), 4),
    ):
        ms = bench(fn)
        add_bandwidth_bound(label, ms, 2 * N * D + out_size * T * D)

    # The router (sigmoid + top-k in one kernel) on bf16 logits, for a few launch shapes
    # (rows per program, warps); "rule" is what `sigmoid_topk_triton` picks.
    from moeut.kernels import router as triton_router

    logits = torch.randn(T, E, device="cuda", dtype=dt)
    for launch in (None, (8, 4), (4, 4), (4, 2), (2, 1), (1, 1)):
        ms = bench(lambda: triton_router.sigmoid_topk_triton(logits, K, launch=launch))
        add_bandwidth_bound(f"router sigmoid+top-{K}, launch {launch or 'rule'}", ms, 2 * T * E + (2 + 8) * T * K)

    moe = SigmaMoE(D, E, S, K).cuda()
    moe.reset_parameters(1.0)
    xin = torch.randn(T, D, device="cuda", requires_grad=True)

    current = [moe]

    def ffn_fwd():
        with torch.autocast("cuda", torch.bfloat16):
            return current[0](xin)

    def ffn_fwd_bwd():
        clear_grads(current[0], xin)
        with torch.autocast("cuda", torch.bfloat16):
            y = current[0](xin)
        y.backward(torch.ones_like(y))

    ffn_flops = 2 * flops
    roof_fwd, roof_fb = ffn_roofline_ms(rows, name)
    ffn = []
    # The whole FFN under autocast: fp32 parameters with their weights cast before the kernels (the
    # default, as the official figure was taken), and bf16
    # parameters (no cast: what an application costs in a training step, where the shared weights are
    # cast once per forward pass), in the same run.
    moe_bf16 = SigmaMoE(D, E, S, K).cuda().to(dt)
    moe_bf16.load_state_dict(moe.state_dict())
    for label, module in (("", moe), (" bf16 params", moe_bf16)):
        current[0] = module
        fwd_ms = bench(ffn_fwd)
        fb_ms = bench(ffn_fwd_bwd)
        # GPU busy time (sum of kernel durations): what the FFN costs inside a GPU-bound training step,
        # where the host runs ahead; wall time on the device's slow host is launch-bound for one FFN.
        fwd_k, fb_k = kernel_times(ffn_fwd, 5), kernel_times(ffn_fwd_bwd, 5)
        gpu_fwd, gpu_fb = busy_ms(fwd_k, 5), busy_ms(fb_k, 5)
        if top and not label:
            for what, per_kernel in (("forward", fwd_k), ("forward + backward", fb_k)):
                print(f"\n{name}: whole FFN {what}, fp32 parameters, GPU kernels per call")
                print_table(per_kernel, 5, top, unit="call")
        ffn.append(
            dict(
                shape=name + label,
                params=str(next(module.parameters()).dtype),
                ffn_fwd_ms=fwd_ms,
                ffn_fwd_tflops=ffn_flops / fwd_ms / 1e9,
                ffn_fwd_bwd_ms=fb_ms,
                ffn_fwd_bwd_tflops=3 * ffn_flops / fb_ms / 1e9,
                gpu_fwd_ms=gpu_fwd,
                gpu_fwd_tflops=ffn_flops / gpu_fwd / 1e9,
                gpu_fwd_bwd_ms=gpu_fb,
                gpu_fwd_bwd_tflops=3 * ffn_flops / gpu_fb / 1e9,
                roofline_fwd_tflops=ffn_flops / roof_fwd / 1e9,
                roofline_fwd_bwd_tflops=3 * ffn_flops / roof_fb / 1e9,
            )
        )
    return rows, ffn


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--shapes", default="44M,244M,1B")
    ap.add_argument(
        "--parity",
        choices=["yes", "no", "only"],
        default="yes",
        help="parity checks (run them under MOEUT_AUTOTUNE=0 to skip autotune compiles)",
    )
    ap.add_argument(
        "--kernels",
        type=int,
        default=0,
        metavar="N",
        help="also print the N costliest GPU kernels of the whole FFN (fp32 parameters), forward and forward+backward",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    mm_tflops, bw = ceilings()
    print(f"ceilings: bf16 matmul {mm_tflops:.0f} TFLOP/s, device copy {bw:.2f} TB/s")
    out = dict(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        ceilings=dict(mm_tflops=mm_tflops, copy_tbs=bw),
        parity={},
        passes=[],
        ffn=[],
    )
    for name in args.shapes.split(",") if args.parity != "no" else []:
        D, E, K = SHAPES[name]
        for dt in (torch.float32, torch.bfloat16):
            p = parity(D, E, K, 4096, dt)
            out["parity"][f"{name}/{dt}"] = p
            print(
                f"parity {name:5s} {str(dt):15s} fwd {p['fwd']:.2e} dx {p['dx']:.2e} dw {p['dw']:.2e} "
                f"empty-expert grad zero: {p['empty_expert_grad_zero']}"
            )
            c = parity_combine(D, E, K, 2048, dt)
            out["parity"][f"{name}/{dt}/combine"] = c
            print(f"parity {name:5s} {str(dt):15s} combine " + " ".join(f"{k} {v:.2e}" for k, v in c.items()))
    for name in args.shapes.split(",") if args.parity != "only" else []:
        D, E, K = SHAPES[name]
        rows, ffn = time_shape(name, D, E, K, args.tokens, mm_tflops, bw, args.kernels)
        out["passes"] += rows
        out["ffn"] += ffn
    print(f"\n{'shape':6s} {'pass':42s} {'ms':>8s} {'TFLOP/s':>8s} {'roofline TFLOP/s':>17s}")
    for r in out["passes"]:
        if "tb_per_s" in r:  # bandwidth-bound passes: TB/s against the copy bandwidth
            print(f"{r['shape']:6s} {r['pass_']:42s} {r['ms']:8.3f} {r['tb_per_s']:6.2f} TB/s (copy {bw:.2f})")
            continue
        print(f"{r['shape']:6s} {r['pass_']:42s} {r['ms']:8.3f} {r['tflops']:8.1f} {r['roofline_tflops']:17.1f}")
    print(
        f"\n{'shape':18s} {'FFN fwd ms':>10s} {'TFLOP/s':>8s} {'fwd+bwd ms':>11s} {'TFLOP/s':>8s}"
        f"  | GPU busy: {'fwd ms':>7s} {'TFLOP/s':>8s} {'fwd+bwd ms':>11s} {'TFLOP/s':>8s}"
        f"  | roofline TFLOP/s: {'fwd':>5s} {'fwd+bwd':>8s}"
    )
    for f in out["ffn"]:
        print(
            f"{f['shape']:18s} {f['ffn_fwd_ms']:10.3f} {f['ffn_fwd_tflops']:8.1f} {f['ffn_fwd_bwd_ms']:11.3f} "
            f"{f['ffn_fwd_bwd_tflops']:8.1f}  |           {f['gpu_fwd_ms']:7.3f} {f['gpu_fwd_tflops']:8.1f} "
            f"{f['gpu_fwd_bwd_ms']:11.3f} {f['gpu_fwd_bwd_tflops']:8.1f}  |                   "
            f"{f['roofline_fwd_tflops']:5.0f} {f['roofline_fwd_bwd_tflops']:8.0f}"
        )
    print(
        "(roofline: the sum of the passes' bounds above, top-k sums included; the router, casts and "
        "the gate's row dot not counted)"
    )
    from moeut.kernels.weight_grad import autotune_choices

    choices = autotune_choices()
    out["autotune"] = [dict(kernel=k, key=key, config=c) for k, key, c in choices]
    print("\nautotuning in this process (key -> config):")
    for k, key, c in choices:
        print(f"  {k} {key} -> {c}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
