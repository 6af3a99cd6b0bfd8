"""Issue 33's standalone measurement: the σ-MoE expert passes on quack's Hopper GEMMs (CuTe DSL: TMA +
wgmma, warp-specialised, persistent; `quack.gemm_interface`) against ours, in one process, at the
MoEUT_244M and MoEUT_1B FFN shapes. Each pass is checked against the fp32 reference
(`moeut.ops.grouped_mm`) before it is timed; a pass quack cannot run is reported with its error.

    python benchmarks/quack_experts.py --shapes 244M,1B --json quack.json     # needs quack-kernels on sm90

Passes (N = tokens × k routed rows, S = 128 expert units):
  up fwd          relu(x[rows] @ W1[e])                 quack: gemm_act(A_idx=rows, cu_seqlens_m)
  down fwd        gate * (h @ W2[e]) to (token, choice)  quack: gemm(cu_seqlens_m) + the gate and the
                                                         scatter in PyTorch (quack has no such epilogue)
  down dx         dy[token] @ W2[e]^T                    quack: gemm(A_idx=token, cu_seqlens_m)
  up dx           dh @ W1[e]^T to (token, choice)        quack: gemm(cu_seqlens_m) + the scatter in PyTorch
  up dW           x[rows_e]^T @ dh_e                     quack: gemm(A=x^T, A_idx=rows, cu_seqlens_k)
  down dW         computed as its transpose dy[token_e]^T @ (gate h)_e, [E, D, S] (quack gathers A's
                  K-columns only); the gated h in PyTorch
  up dW × 9       a shared weight's gradient over its nine applications: ours sums 9 segments per
                  launch into fp32; quack reads the 9 applications' rows regrouped by expert
                  (one cu_seqlens_k over E segments, A_idx into the 9 stacked inputs), given ready-made
  up dW × 9, distinct   the same over nine distinct inputs (as in a step), quack's regrouping timed
  ..., products only    up fwd, down fwd and up dx as bare products on both sides (no ReLU, gate or
                  scatter): what quack's GEMM could reach if the epilogues it lacks cost nothing
--sweep-until also times a few explicit sm90 tile configs per pass (quack's autotuner compiles ~40 per
pass, more than a device call holds) and reports quack's best; --only runs the passes whose names
contain one of the given parts; --tokens sets the token count (a 1B training step has 8192).
Figures: median ms (triton.testing.do_bench), TFLOP/s of the 2·N·D·S useful flops, and the share of the
roofline max(flops / measured matmul rate, compulsory bytes / measured copy bandwidth).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_bench import S, SHAPES, bench, ceilings, rel  # noqa: E402
from moeut.ops.expert_mm import route  # noqa: E402
from moeut.ops.grouped_mm import grouped_mm_reference, weight_grad_reference  # noqa: E402


SHAPES = {**SHAPES, "tiny": (64, 6, 2)}   # --emulate on a CPU


def inputs(D, E, K, T, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    dt = torch.bfloat16
    x = torch.randn(T, D, device=device, dtype=dt, generator=g)
    w1 = (torch.randn(E, D, S, device=device, dtype=dt, generator=g) / D ** 0.5)
    w2 = (torch.randn(E, S, D, device=device, dtype=dt, generator=g) / S ** 0.5)
    expert = torch.rand(T, E, device=device, generator=g).topk(K, dim=-1).indices
    r = route(expert, E)
    N = T * K
    h = torch.randn(N, S, device=device, dtype=dt, generator=g).relu()
    dh = torch.randn(N, S, device=device, dtype=dt, generator=g)
    dy = torch.randn(T, D, device=device, dtype=dt, generator=g)
    gate = torch.rand(N, device=device, generator=g)
    return dict(x=x, w1=w1, w2=w2, r=r, N=N, h=h, dh=dh, dy=dy, gate=gate, token=r.slot_N // K)


class EmulatedQuack:
    """quack's `gemm` / `gemm_act` contract in plain PyTorch, as its interface documents it (varlen M:
    out rows cu[i]:cu[i+1] = A[A_idx[those rows]] @ B[i]; varlen K: out[i] = A[:, A_idx[cu[i]:cu[i+1]]] @
    B[cu[i]:cu[i+1]]), for checking this script's operands on a CPU (`--emulate`)."""

    @staticmethod
    def gemm(A, B, cu_seqlens_m=None, cu_seqlens_k=None, A_idx=None, out_dtype=None, tuned=False):
        out_dtype = out_dtype or A.dtype
        A, B = A.float(), B.float()
        cu = (cu_seqlens_m if cu_seqlens_m is not None else cu_seqlens_k).long().tolist()
        if cu_seqlens_m is not None:
            rows = A if A_idx is None else A[A_idx.long()]
            out = torch.cat([rows[lo:hi] @ B[i] for i, (lo, hi) in enumerate(zip(cu[:-1], cu[1:]))])
        else:
            cols = A if A_idx is None else A[:, A_idx.long()]
            out = torch.stack([cols[:, lo:hi] @ B[lo:hi] for lo, hi in zip(cu[:-1], cu[1:])])
        return out.to(out_dtype)

    @classmethod
    def gemm_act(cls, A, B, activation=None, cu_seqlens_m=None, A_idx=None, store_preact=True, tuned=False):
        pre = cls.gemm(A, B, cu_seqlens_m=cu_seqlens_m, A_idx=A_idx, out_dtype=torch.float32)
        return (pre.to(A.dtype) if store_preact else None), pre.relu().to(A.dtype)


def passes(v, D, E, K, T, q=None):
    """{pass: (ours, quack, reference, compulsory bytes)} as zero-argument callables; `q` is quack's
    `gemm_interface` (or `EmulatedQuack`)."""
    if q is None:
        from quack import gemm_interface as q
    dev = v["x"].device
    op, wgrad = torch.ops.moeut.grouped_mm, torch.ops.moeut.grouped_mm_weight_grad
    x, w1, w2, r, N, h, dh, dy, gate, token = (v[k] for k in ("x", "w1", "w2", "r", "N", "h", "dh", "dy", "gate", "token"))
    cu = r.offsets_E1.to(torch.int32)
    rows32, token32, slot = r.rows_N.to(torch.int32), token.to(torch.int32), r.slot_N
    f32 = lambda t: t.float()  # noqa: E731

    def scatter(out_ND):
        return torch.empty_like(out_ND).index_copy_(0, slot, out_ND)

    def qgemm(A, B, cfg, **kw):
        """quack's `gemm` with its default Hopper config (cfg None) or an explicit one."""
        if cfg is None:
            return q.gemm(A, B, tuned=False, **kw)
        out_dtype = kw.pop("out_dtype", None) or A.dtype
        if kw.get("cu_seqlens_m") is not None:
            shape = (kw["A_idx"].shape[0] if kw.get("A_idx") is not None else A.shape[0], B.shape[-1])
        else:
            shape = (kw["cu_seqlens_k"].shape[0] - 1, A.shape[0], B.shape[-1])
        out = torch.empty(shape, device=A.device, dtype=out_dtype)
        q.gemm_tuned.fn(A, B, out, config=cfg, **kw)
        return out

    def up_fwd_quack(cfg=None):
        return q.gemm_act(x, w1, activation="relu", cu_seqlens_m=cu, A_idx=rows32, store_preact=False,
                          tuned=False, **({"config": cfg} if cfg is not None else {}))[1]

    def down_fwd_quack(cfg=None):
        y = qgemm(h, w2, cfg, cu_seqlens_m=cu)
        return scatter(y * gate[:, None].to(y.dtype))

    def down_dw_t_ours():   # ours writes [E, S, D]; compared as its transpose
        return wgrad(h, dy, r.offsets_E1, None, token, gate, torch.float32).transpose(1, 2)

    def down_dw_t_quack(cfg=None):
        return qgemm(dy.t(), (h * gate[:, None].to(h.dtype)), cfg, cu_seqlens_k=cu, A_idx=token32,
                     out_dtype=torch.float32)

    # Nine applications of a shared weight: the same routing nine times over nine stacked inputs.
    A = 9
    x9 = x.repeat(A, 1)
    dh9 = dh.repeat(A, 1)
    counts = (r.offsets_E1[1:] - r.offsets_E1[:-1])
    # Regrouped by expert: expert e's rows of application 0, then of application 1, ...
    order = torch.cat([torch.arange(int(lo), int(hi), device=dev).repeat(A) +
                       torch.arange(A, device=dev).repeat_interleave(int(hi - lo)) * N
                       for lo, hi in zip(r.offsets_E1[:-1].tolist(), r.offsets_E1[1:].tolist())])
    rows9 = (r.rows_N.repeat(A) + torch.arange(A, device=dev).repeat_interleave(N) * T)[order].to(torch.int32)
    dh9_grouped = dh9[order]
    cu9 = torch.cat([torch.zeros(1, device=dev, dtype=torch.long), (counts * A).cumsum(0)]).to(torch.int32)
    seg = (x, dh, r.offsets_E1, r.rows_N, None, None, None)
    acc = torch.zeros(E, D, S, device=dev)

    def up_dw9_ours():
        from moeut.kernels.weight_grad import weight_grad_segments_triton
        acc.zero_()
        weight_grad_segments_triton([seg] * A, accumulate_into=acc)
        return acc

    # The same, as a step has it: nine distinct inputs and output gradients (each application saves its
    # own), so quack's one regrouped operand pair must be built first: the inputs stacked, the
    # gradient rows sorted by (expert, application). That copy is timed with quack's GEMM.
    xs, dhs = [x.clone() for _ in range(A)], [dh.clone() for _ in range(A)]
    segs = [(xs[i], dhs[i], r.offsets_E1, r.rows_N, None, None, None) for i in range(A)]

    def up_dw9_distinct_ours():
        from moeut.kernels.weight_grad import weight_grad_segments_triton
        acc.zero_()
        weight_grad_segments_triton(segs, accumulate_into=acc)
        return acc

    def up_dw9_regrouped_quack(cfg=None):
        expert_of_n = torch.bucketize(torch.arange(N, device=dev), r.offsets_E1[1:], right=True)
        order = torch.argsort(torch.cat([expert_of_n * A + i for i in range(A)]), stable=True)
        dh_grouped = torch.cat(dhs).index_select(0, order)
        idx = torch.cat([r.rows_N + i * T for i in range(A)]).index_select(0, order).to(torch.int32)
        return qgemm(torch.cat(xs).t(), dh_grouped, cfg, cu_seqlens_k=(r.offsets_E1 * A).to(torch.int32),
                     A_idx=idx, out_dtype=torch.float32)

    return {
        "up fwd (gather, ReLU)": (lambda: op(x, w1, r.offsets_E1, r.rows_N, None, None, False, True), up_fwd_quack,
                                  lambda: grouped_mm_reference(f32(x), f32(w1), r.offsets_E1, r.rows_N, relu=True),
                                  2 * (T * D + E * D * S + N * S)),
        "down fwd (gate, scatter)": (lambda: op(h, w2, r.offsets_E1, None, gate, slot), down_fwd_quack,
                                     lambda: grouped_mm_reference(f32(h), f32(w2), r.offsets_E1, None, gate, slot),
                                     2 * (N * S + E * S * D + N * D)),
        "down dx (gather dy)": (lambda: op(dy, w2.transpose(1, 2), r.offsets_E1, token, None, None),
                                lambda cfg=None: qgemm(dy, w2.transpose(1, 2), cfg, cu_seqlens_m=cu, A_idx=token32),
                                lambda: grouped_mm_reference(f32(dy), f32(w2).transpose(1, 2), r.offsets_E1, token),
                                2 * (T * D + E * S * D + N * S)),
        "up dx (scatter)": (lambda: op(dh, w1.transpose(1, 2), r.offsets_E1, None, None, slot),
                            lambda cfg=None: scatter(qgemm(dh, w1.transpose(1, 2), cfg, cu_seqlens_m=cu)),
                            lambda: grouped_mm_reference(f32(dh), f32(w1).transpose(1, 2), r.offsets_E1, None,
                                                         None, slot),
                            2 * (N * S + E * S * D + N * D)),
        "up dW (gather x), fp32": (lambda: wgrad(x, dh, r.offsets_E1, r.rows_N, None, None, torch.float32),
                                   lambda cfg=None: qgemm(x.t(), dh, cfg, cu_seqlens_k=cu, A_idx=rows32,
                                                          out_dtype=torch.float32),
                                   lambda: weight_grad_reference(f32(x), f32(dh), r.offsets_E1, r.rows_N),
                                   2 * (T * D + N * S) + 4 * E * D * S),
        "down dW^T (gather dy, gate), fp32": (down_dw_t_ours, down_dw_t_quack,
                                              lambda: weight_grad_reference(f32(h), f32(dy), r.offsets_E1, None,
                                                                            token, gate).transpose(1, 2),
                                              2 * (N * S + T * D) + 4 * E * S * D),
        "up dW over 9 applications (per application)": (
            up_dw9_ours,
            lambda cfg=None: qgemm(x9.t(), dh9_grouped, cfg, cu_seqlens_k=cu9, A_idx=rows9, out_dtype=torch.float32),
            lambda: A * weight_grad_reference(f32(x), f32(dh), r.offsets_E1, r.rows_N),
            (2 * (T * D + N * S) + 4 * E * D * S / A)),
        # The forward passes as bare products (no ReLU, gate or scatter) on both sides: what quack's GEMM
        # could reach if the epilogues it lacks (or that fail to build) cost nothing.
        "up fwd, products only": (lambda: op(x, w1, r.offsets_E1, r.rows_N, None, None),
                                  lambda cfg=None: qgemm(x, w1, cfg, cu_seqlens_m=cu, A_idx=rows32),
                                  lambda: grouped_mm_reference(f32(x), f32(w1), r.offsets_E1, r.rows_N),
                                  2 * (T * D + E * D * S + N * S)),
        "down fwd, products only": (lambda: op(h, w2, r.offsets_E1, None, None, None),
                                    lambda cfg=None: qgemm(h, w2, cfg, cu_seqlens_m=cu),
                                    lambda: grouped_mm_reference(f32(h), f32(w2), r.offsets_E1, None),
                                    2 * (N * S + E * S * D + N * D)),
        "up dx, products only": (lambda: op(dh, w1.transpose(1, 2), r.offsets_E1, None, None, None),
                                 lambda cfg=None: qgemm(dh, w1.transpose(1, 2), cfg, cu_seqlens_m=cu),
                                 lambda: grouped_mm_reference(f32(dh), f32(w1).transpose(1, 2), r.offsets_E1, None),
                                 2 * (N * S + E * S * D + N * D)),
        "up dW over 9 distinct applications, regrouping timed (per application)": (
            up_dw9_distinct_ours, up_dw9_regrouped_quack,
            lambda: A * weight_grad_reference(f32(x), f32(dh), r.offsets_E1, r.rows_N),
            (2 * (T * D + N * S) + 4 * E * D * S / A)),
    }


def sweep_configs():
    """A few explicit sm90 configs beside quack's default (128×192 pingpong, cluster 2×1), since its
    autotuner (~40 CuTe compilations a pass) does not fit one device call. Tile N 128 matches the
    expert width S; a gathered A needs cluster_n = 1."""
    from quack.gemm_config import GemmConfig
    return {f"{m}x{n} {'pingpong' if pp else 'coop'}": GemmConfig(
                tile_m=m, tile_n=n, pingpong=pp, cluster_m=2, cluster_n=1, is_dynamic_persistent=False,
                device_capacity=9)
            for m, n, pp in ((128, 128, True), (256, 128, False), (128, 256, False), (192, 128, True))}


def measure(name, mm_tflops, bw, T, emulate=False, deadline=None, only=()):
    D, E, K = SHAPES[name]
    v = inputs(D, E, K, T, device="cpu" if emulate else "cuda")
    N = v["N"]
    flops = 2 * N * D * S
    rows = []
    for label, (ours, quack, reference, nbytes) in passes(v, D, E, K, T, EmulatedQuack if emulate else None).items():
        if only and not any(o in label for o in only):
            continue
        per = 9 if "over 9" in label else 1
        want = reference()
        row = dict(shape=name, pass_=label)
        bound = max(flops / mm_tflops / 1e9, nbytes / bw / 1e9) if not emulate else 0.0
        for who, fn in (("ours", ours), ("quack", quack)):
            try:
                got = fn()
                row[f"{who}_rel_err"] = rel(got.float(), want)
                if emulate:
                    continue
                torch.cuda.synchronize()
                ms = bench(fn) / per
                row[f"{who}_ms"] = ms
                row[f"{who}_tflops"] = flops / ms / 1e9
                row[f"{who}_roofline_share"] = bound / ms
            except Exception as e:   # a form quack (or this build) does not support: recorded, not fatal
                row[f"{who}_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}" if str(e) else type(e).__name__
                traceback.print_exc(limit=3)
        if deadline is not None and "quack_ms" in row:
            row["quack_sweep"] = {}
            for cname, cfg in sweep_configs().items():
                if time.monotonic() > deadline:
                    row["quack_sweep"][cname] = "not run: the call's time was spent"
                    continue
                fn = lambda: quack(cfg)  # noqa: E731
                try:
                    err = rel(fn().float(), want)
                    ms = bench(fn) / per
                    row["quack_sweep"][cname] = dict(ms=ms, tflops=flops / ms / 1e9, rel_err=err)
                except Exception as e:
                    row["quack_sweep"][cname] = f"{type(e).__name__}: {str(e).strip()[:160]}"
            best = min((v["ms"] for v in row["quack_sweep"].values() if isinstance(v, dict)), default=None)
            if best is not None and best < row["quack_ms"]:
                row["quack_best_ms"] = best
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="244M,1B")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--json")
    ap.add_argument("--emulate", action="store_true",
                    help="CPU: check this script's operands against quack's documented semantics in PyTorch "
                         "(no timing; use a small --shapes tiny --tokens 96 with TRITON_INTERPRET=1)")
    ap.add_argument("--only", default="", help="comma-separated parts of pass names to run (default: all)")
    ap.add_argument("--sweep-until", type=float, default=0,
                    help="after each pass's default-config timing, try explicit quack configs until this many "
                         "seconds after the start (0: no sweep)")
    args = ap.parse_args()
    start = time.monotonic()
    if args.emulate:
        rows = []
        for name in args.shapes.split(","):
            rows += measure(name, 0, 0, args.tokens, emulate=True)
        for r in rows:
            print(f"{r['shape']:5} {r['pass_']:45} ours {r.get('ours_rel_err', r.get('ours_error'))}  "
                  f"emulated quack {r.get('quack_rel_err', r.get('quack_error'))}")
        bad = [r for r in rows if not all(r.get(f"{w}_rel_err", 1) < 2e-2 for w in ("ours", "quack"))]
        sys.exit(1 if bad else 0)
    import quack
    mm_tflops, bw = ceilings()
    print(f"{torch.cuda.get_device_name()}, quack {getattr(quack, '__version__', '?')}, torch {torch.__version__}; "
          f"bf16 matmul {mm_tflops:.0f} TFLOP/s, copy {bw:.2f} TB/s; {args.tokens} tokens")
    rows = []
    for name in args.shapes.split(","):
        rows += measure(name, mm_tflops, bw, args.tokens,
                        deadline=start + args.sweep_until if args.sweep_until else None,
                        only=tuple(o for o in args.only.split(",") if o))
        if args.json:   # after each shape, so a call cut off still returns what it measured
            Path(args.json).write_text(json.dumps(dict(mm_tflops=mm_tflops, copy_tb_s=bw, rows=rows), indent=2))
    print("| shape | pass | ours ms | quack ms | quack / ours | ours TFLOP/s (roofline) | quack TFLOP/s (roofline) | "
          "rel. error ours / quack |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        def cell(who, key, fmt):
            return format(r[f"{who}_{key}"], fmt) if f"{who}_{key}" in r else "—"
        if "quack_best_ms" in r:
            r["quack_ms"] = r["quack_best_ms"]   # the table shows quack's best config
        speed = (f"{r['ours_ms'] / r['quack_ms']:.2f}× faster" if "quack_ms" in r and "ours_ms" in r else
                 r.get("quack_error", "—"))
        print(f"| {r['shape']} | {r['pass_']} | {cell('ours', 'ms', '.3f')} | {cell('quack', 'ms', '.3f')} | {speed} | "
              f"{cell('ours', 'tflops', '.0f')} ({cell('ours', 'roofline_share', '.0%')}) | "
              f"{cell('quack', 'tflops', '.0f')} ({cell('quack', 'roofline_share', '.0%')}) | "
              f"{cell('ours', 'rel_err', '.1e')} / {cell('quack', 'rel_err', '.1e')} |")
    for r in rows:
        for cname, v in r.get("quack_sweep", {}).items():
            print(f"  {r['shape']} {r['pass_']}: {cname}: " +
                  (f"{v['ms']:.3f} ms, {v['tflops']:.0f} TFLOP/s, err {v['rel_err']:.1e}" if isinstance(v, dict) else v))


if __name__ == "__main__":
    main()
