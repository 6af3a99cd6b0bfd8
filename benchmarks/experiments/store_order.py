"""Is the down projection's scattered store what keeps it at 65% of its bound? (twelfth session)

Times the σ-MoE down projection (I = 128 -> d_model, gate in the epilogue) writing its rows scattered to
(row, choice) order, as moeut does, against writing them in expert-sorted order; the top-k sum reading
(row, choice) order against reading sorted rows through the inverse permutation; and plain write and copy
bandwidth. Answer on the H200 (RESULTS.md K.2, results/s12_call2_exp_store_order.txt): no. Both orders
take 0.252 ms at 244M, while writing the same bytes alone takes 0.162.

    python benchmarks/experiments/store_order.py      (CUDA; on CPU the tiny shape, interpreted)
"""
import torch

from common import DEVICE, bench, ffn_problem, shapes, try_variant
import triton
import triton.language as tl
from moeut.kernels.sum_choices import sum_choices_triton

SUM_LAUNCHES = [(8, 256, 4), (4, 512, 4), (16, 128, 4), (8, 512, 8), (2, 1024, 4)] if DEVICE == "cuda" \
    else [(4, 16, 4)]   # rows, columns per program; warps


@triton.jit
def _sum_gathered(y_ptr, idx_ptr, out_ptr, X, C, O, syr, sxr, BX: tl.constexpr, BO: tl.constexpr):
    # out[x] = sum over c of y[idx[x * C + c]]: the top-k sum reading rows through a permutation
    xs = tl.program_id(0) * BX + tl.arange(0, BX)
    os_ = tl.program_id(1) * BO + tl.arange(0, BO)
    xok = xs < X
    mask = xok[:, None] & (os_ < O)[None, :]
    acc = tl.zeros((BX, BO), dtype=tl.float32)
    for c in range(0, C):
        r = tl.load(idx_ptr + xs * C + c, mask=xok, other=0)
        acc += tl.load(y_ptr + r[:, None].to(tl.int64) * syr + os_[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + xs[:, None].to(tl.int64) * sxr + os_[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def sum_gathered(y, idx, X, C, dtype, BX=8, BO=256, warps=4):
    O = y.shape[1]
    out = torch.empty(X, O, device=y.device, dtype=dtype)
    _sum_gathered[(triton.cdiv(X, BX), triton.cdiv(O, BO))](y, idx, out, X, C, O, y.stride(0), out.stride(0),
                                                         BX=BX, BO=BO, num_warps=warps)
    return out


def main(names=None):
    results = []
    for name in shapes(names):
        p = ffn_problem(name)
        N, S, D, T, K, r = p.N, p.S, p.D, p.T, p.K, p.r
        op = torch.ops.moeut.grouped_mm
        inverse = r.choice_RK.reshape(-1).contiguous()   # (row, choice) -> routed position
        y_sorted = op(p.h, p.w2, r.offsets_E1, None, p.gate, None)
        y_scattered = op(p.h, p.w2, r.offsets_E1, None, p.gate, r.slot_N)
        assert torch.equal(y_sorted[inverse], y_scattered), "the two orders hold different rows"
        big = torch.empty(N, D, device=DEVICE, dtype=p.h.dtype)
        proj_gb, sum_gb = 2 * (N * S + N * D) / 1e9, (2 * N * D + 2 * T * D) / 1e9
        rows = [("down fwd scatter", bench(lambda: op(p.h, p.w2, r.offsets_E1, None, p.gate, r.slot_N)), proj_gb),
                ("down fwd contiguous", bench(lambda: op(p.h, p.w2, r.offsets_E1, None, p.gate, None)), proj_gb),
                ("fill [N, D] (write only)", bench(lambda: big.fill_(1.0)), 2 * N * D / 1e9),
                ("copy [N, D]", bench(lambda: big.copy_(y_scattered)), 4 * N * D / 1e9),
                ("sum (row, choice) order", bench(lambda: sum_choices_triton(y_scattered, T, p.h.dtype)), sum_gb)]
        for label, ms, gb in rows:
            print(f"{name}  {label:36s} {ms:7.3f} ms  {gb / ms:6.2f} TB/s")
        want = sum_choices_triton(y_scattered, T, p.h.dtype)
        for BX, BO, warps in SUM_LAUNCHES:
            got = []

            def run():
                got[:] = [sum_gathered(y_sorted, inverse, T, K, p.h.dtype, BX, BO, warps)]
            results.append(try_variant(f"{name}  sum gathered BX{BX} BO{BO} w{warps}", run,
                                       lambda: (got[0].float() - want.float()).abs().max().item()))
    return results


if __name__ == "__main__":
    main()
