"""Triton's automatic warp specialization on the expert GEMMs (twelfth session).

The gathered up projection (forward) and its weight gradient as standalone loops, each written with
`tl.range(..., warp_specialize=True)` and without it, at the 244M and 1B shapes. Both are held against
moeut's kernels. Answer on the H200 with Triton 3.6 (RESULTS.md K.2,
results/s12_call5_exp_warp_specialize.txt): with 8 warps the flag changed nothing (within 1%). With 4
warps the compiler's warp-specialization pass crashed.

    python benchmarks/experiments/warp_specialize.py  (CUDA; on CPU the tiny shape, interpreted)
"""
import torch

from common import DEVICE, bench, ffn_problem, shapes, try_variant
import triton
import triton.language as tl
from moeut.kernels.expert_mm import _find_tile
from moeut.kernels.weight_grad import weight_grad_segments_triton

# (rows or input block, output block, inner block, warps, stages)
FWD_CONFIGS = [(128, 128, 32, 8, 5), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (256, 128, 64, 8, 3),
               (128, 64, 64, 4, 5)] if DEVICE == "cuda" else [(16, 16, 16, 4, 2)]
WGRAD_CONFIGS = [(128, 128, 32, 8, 5), (64, 128, 64, 4, 4), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4),
                 (256, 128, 32, 8, 4)] if DEVICE == "cuda" else [(16, 16, 16, 4, 2)]


@triton.jit
def _up_fwd(x_ptr, w_ptr, out_ptr, offsets_ptr, rows_ptr, E, I, O, sxr, swe, swi, sor,
            EP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WS: tl.constexpr,
            STAGES: tl.constexpr):
    # out[n] = x[rows[n]] @ w[expert of n]: one program per (row tile, column block)
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
        acc = tl.dot(tl.load(a_ptrs + k0, mask=row_ok[:, None], other=0.0), tl.load(b_ptrs + k0 * swi), acc)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * sor + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _up_dw(x_ptr, g_ptr, out_ptr, offsets_ptr, rows_ptr, I, O, sxr, sgr, soe, soi,
           BI: tl.constexpr, BO: tl.constexpr, BK: tl.constexpr, WS: tl.constexpr, STAGES: tl.constexpr):
    # out[e] = x[rows of e]^T @ g[routed rows of e]: one program per (expert, output tile), no atomics
    tiles_per_expert = tl.cdiv(I, BI) * tl.cdiv(O, BO)
    e = tl.program_id(0) // tiles_per_expert
    tile = tl.program_id(0) % tiles_per_expert
    ii = (tile // tl.cdiv(O, BO)) * BI + tl.arange(0, BI)
    oo = (tile % tl.cdiv(O, BO)) * BO + tl.arange(0, BO)
    ks = tl.arange(0, BK)
    acc = tl.zeros((BI, BO), dtype=tl.float32)
    hi = tl.load(offsets_ptr + e + 1)
    for r0 in tl.range(tl.load(offsets_ptr + e), hi, BK, num_stages=STAGES, warp_specialize=WS):
        rr = r0 + ks
        r_ok = rr < hi
        src = tl.load(rows_ptr + rr, mask=r_ok, other=0)
        a = tl.load(x_ptr + src[None, :].to(tl.int64) * sxr + ii[:, None], mask=r_ok[None, :], other=0.0)
        b = tl.load(g_ptr + rr[:, None].to(tl.int64) * sgr + oo[None, :], mask=r_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(out_ptr + e.to(tl.int64) * soe + ii[:, None] * soi + oo[None, :], acc)


def main(names=None):
    results = []
    for name in shapes(names):
        p = ffn_problem(name)
        x, w1, gh, r, D, S, E, N = p.x, p.w1, p.gh, p.r, p.D, p.S, p.E, p.N
        flop = 2 * N * D * S
        op = torch.ops.moeut.grouped_mm
        want = op(x, w1, r.offsets_E1, r.rows_N, None, None)
        ms = bench(lambda: op(x, w1, r.offsets_E1, r.rows_N, None, None))
        print(f"{name} up fwd moeut: {ms:.3f} ms {flop / ms / 1e9:.0f} TFLOP/s")
        out = torch.empty(N, S, device=DEVICE, dtype=x.dtype)
        for BM, BN, BK, warps, stages in FWD_CONFIGS:
            for ws in (False, True):
                def run():
                    _up_fwd[((triton.cdiv(N, BM) + E) * triton.cdiv(S, BN),)](
                        x, w1, out, r.offsets_E1, r.rows_N, E, D, S, x.stride(0), w1.stride(0), w1.stride(1),
                        out.stride(0), EP=triton.next_power_of_2(E), BM=BM, BN=BN, BK=BK, WS=ws, STAGES=stages,
                        num_warps=warps)
                results.append(try_variant(f"{name} up fwd BM{BM} BN{BN} BK{BK} w{warps} s{stages} ws={ws:d}", run,
                                           lambda: (out.float() - want.float()).abs().max().item(), flop))
        segment = [(x, gh, r.offsets_E1, r.rows_N, None, None, None)]
        want_dw = weight_grad_segments_triton(segment, torch.float32)
        ms = bench(lambda: weight_grad_segments_triton(segment, torch.float32))
        print(f"{name} up dW moeut: {ms:.3f} ms {flop / ms / 1e9:.0f} TFLOP/s")
        dw = torch.empty(E, D, S, device=DEVICE, dtype=torch.float32)
        for BI, BO, BK, warps, stages in WGRAD_CONFIGS:
            for ws in (False, True):
                def run():
                    _up_dw[(E * triton.cdiv(D, BI) * triton.cdiv(S, BO),)](
                        x, gh, dw, r.offsets_E1, r.rows_N, D, S, x.stride(0), gh.stride(0), dw.stride(0),
                        dw.stride(1), BI=BI, BO=BO, BK=BK, WS=ws, STAGES=stages, num_warps=warps)
                results.append(try_variant(f"{name} up dW BI{BI} BO{BO} BK{BK} w{warps} s{stages} ws={ws:d}", run,
                                           lambda: ((dw - want_dw).norm() / want_dw.norm()).item(), flop))
    return results


if __name__ == "__main__":
    main()
