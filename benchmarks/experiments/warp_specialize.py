"""Triton's automatic warp specialization on the expert GEMMs (twelfth session).

The gathered up projection (forward) and its weight gradient as standalone loops, each written with
`tl.range(..., warp_specialize=True)` and without it, at the 244M and 1B shapes. Both are held against
moeut's kernels. Answer on the H200 with Triton 3.6 (RESULTS.md K.2,
results/s12_call5_exp_warp_specialize.txt): with 8 warps the flag changed nothing (within 1%). With 4
warps the compiler's warp-specialization pass crashed.

    python benchmarks/experiments/warp_specialize.py  (CUDA)
"""
import sys
from pathlib import Path
import torch
import triton
import triton.language as tl
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from moeut.expert_mm import route  # noqa: E402
from moeut.triton_expert_mm import _find_tile, weight_grad_segments_triton  # noqa: E402


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


@triton.jit
def _up_fwd(x_ptr, w_ptr, out_ptr, offsets_ptr, rows_ptr, E, I, O, sxr, swe, swi, sor,
            EP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WS: tl.constexpr,
            STAGES: tl.constexpr):
    pid = tl.program_id(0)
    n_col = tl.cdiv(O, BN)
    e, row0, row_end, live = _find_tile(offsets_ptr, pid // n_col, E, EP, BM)
    if not live:
        return
    rows = row0 + tl.arange(0, BM)
    row_ok = rows < row_end
    src = tl.load(rows_ptr + rows, mask=row_ok, other=0)
    cols = (pid % n_col) * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    a_ptrs = x_ptr + src[:, None].to(tl.int64) * sxr + ks[None, :]
    b_ptrs = w_ptr + e.to(tl.int64) * swe + ks[:, None] * swi + cols[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in tl.range(0, I, BK, num_stages=STAGES, warp_specialize=WS):
        a = tl.load(a_ptrs + k0, mask=row_ok[:, None], other=0.0)
        b = tl.load(b_ptrs + k0 * swi)
        acc = tl.dot(a, b, acc)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * sor + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _up_dw(x_ptr, g_ptr, out_ptr, offsets_ptr, rows_ptr, I, O, sxr, sgr, soe, soi,
           BI: tl.constexpr, BO: tl.constexpr, BK: tl.constexpr, WS: tl.constexpr, STAGES: tl.constexpr):
    n_o = tl.cdiv(O, BO)
    n_tiles = tl.cdiv(I, BI) * n_o
    e = tl.program_id(0) // n_tiles
    pid = tl.program_id(0) % n_tiles
    ii = (pid // n_o) * BI + tl.arange(0, BI)
    oo = (pid % n_o) * BO + tl.arange(0, BO)
    lo = tl.load(offsets_ptr + e)
    hi = tl.load(offsets_ptr + e + 1)
    ks = tl.arange(0, BK)
    acc = tl.zeros((BI, BO), dtype=tl.float32)
    for r0 in tl.range(lo, hi, BK, num_stages=STAGES, warp_specialize=WS):
        rr = r0 + ks
        r_ok = rr < hi
        src = tl.load(rows_ptr + rr, mask=r_ok, other=0)
        a = tl.load(x_ptr + src[None, :].to(tl.int64) * sxr + ii[:, None], mask=r_ok[None, :], other=0.0)
        b = tl.load(g_ptr + rr[:, None].to(tl.int64) * sgr + oo[None, :], mask=r_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(out_ptr + e.to(tl.int64) * soe + ii[:, None] * soi + oo[None, :], acc)


def main():
    for name, (D, E, K, T) in {"244M": (1024, 387, 16, 16384), "1B": (1536, 565, 24, 8192)}.items():
        dt, S = torch.bfloat16, 128
        N = T * K
        expert = torch.rand(T, E, device="cuda").topk(K, dim=-1).indices
        r = route(expert, E)
        x = torch.randn(T, D, device="cuda", dtype=dt)
        w1 = torch.randn(E, D, S, device="cuda", dtype=dt) / D ** 0.5
        gh = torch.randn(N, S, device="cuda", dtype=dt)
        op = torch.ops.moeut.grouped_mm
        fl = 2 * N * D * S / 1e9
        want = op(x, w1, r.offsets_E1, r.rows_N, None, None)
        ms = bench(lambda: op(x, w1, r.offsets_E1, r.rows_N, None, None))
        print(f"{name} up fwd moeut: {ms:.3f} ms {fl / ms:.0f} TFLOP/s")
        for BM, BN, BK, warps, stages in ((128, 128, 32, 8, 5), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
                                          (256, 128, 64, 8, 3), (128, 64, 64, 4, 5)):
            for ws in (False, True):
                out = torch.empty(N, S, device="cuda", dtype=dt)

                def run():
                    _up_fwd[(triton.cdiv(N, BM) + E) * triton.cdiv(S, BN),](
                        x, w1, out, r.offsets_E1, r.rows_N, E, D, S, x.stride(0), w1.stride(0), w1.stride(1),
                        out.stride(0), EP=triton.next_power_of_2(E), BM=BM, BN=BN, BK=BK, WS=ws, STAGES=stages,
                        num_warps=warps)
                try:
                    run()
                    err = (out.float() - want.float()).abs().max().item()
                    ms = bench(run)
                    print(f"{name} up fwd BM{BM} BN{BN} BK{BK} w{warps} s{stages} ws={ws:d}: {ms:.3f} ms "
                          f"{fl / ms:.0f} TFLOP/s  max diff {err:.1e}")
                except Exception as exc:
                    print(f"{name} up fwd BM{BM} BN{BN} BK{BK} w{warps} s{stages} ws={ws:d}: failed "
                          f"{type(exc).__name__}: {str(exc)[:200]}")
        seg = [(x, gh, r.offsets_E1, r.rows_N, None, None, None)]
        want = weight_grad_segments_triton(seg, torch.float32)
        ms = bench(lambda: weight_grad_segments_triton(seg, torch.float32))
        print(f"{name} up dW moeut: {ms:.3f} ms {fl / ms:.0f} TFLOP/s")
        for BI, BO, BK, warps, stages in ((128, 128, 32, 8, 5), (64, 128, 64, 4, 4), (128, 128, 64, 4, 4),
                                          (128, 128, 64, 8, 4), (256, 128, 32, 8, 4)):
            for ws in (False, True):
                out = torch.empty(E, D, S, device="cuda", dtype=torch.float32)

                def run():
                    _up_dw[(E * triton.cdiv(D, BI) * triton.cdiv(S, BO),)](
                        x, gh, out, r.offsets_E1, r.rows_N, D, S, x.stride(0), gh.stride(0), out.stride(0),
                        out.stride(1), BI=BI, BO=BO, BK=BK, WS=ws, STAGES=stages, num_warps=warps)
                try:
                    run()
                    err = ((out - want).norm() / want.norm()).item()
                    ms = bench(run)
                    print(f"{name} up dW BI{BI} BO{BO} BK{BK} w{warps} s{stages} ws={ws:d}: {ms:.3f} ms "
                          f"{fl / ms:.0f} TFLOP/s  rel err {err:.1e}")
                except Exception as exc:
                    print(f"{name} up dW BI{BI} BO{BO} BK{BK} w{warps} s{stages} ws={ws:d}: failed "
                          f"{type(exc).__name__}: {str(exc)[:200]}")


if __name__ == "__main__":
    main()
