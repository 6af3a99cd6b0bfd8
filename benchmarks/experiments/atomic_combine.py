"""Could atomic adds replace the top-k sum's round trip? (seventeenth session)

The down projection writes one bf16 row of d_model per (token, choice) and the top-k sum reads them back
(PERF_NOTES, "the FFN's bytes"). Adding each row into its token's output with atomics would skip that
round trip. Floating-point atomics add in an order that changes from run to run, which breaks bitwise
determinism; integer (fixed-point) atomics do not, since integer addition is associative. This times the
memory side of both dataflows on the same routed rows, without the GEMM:

- today: the scattered bf16 store of [N, D] rows, then the top-k sum reading them into [T, D];
- fixed point: zero an int64 [T, D], add round(y * 2^32) into it with atomics, convert it back;
- fp32 atomics (not deterministic; only to show what the hardware's atomics cost).

    python benchmarks/experiments/atomic_combine.py      (CUDA; on CPU the tiny shape, interpreted)
"""
import torch

from common import DEVICE, bench, ffn_problem, shapes, try_variant
import triton
import triton.language as tl
from moeut.kernels.sum_choices import sum_choices_triton

FIXED_ONE = 2.0 ** 32   # one unit in the int64 sum is 2^-32


@triton.jit
def _scatter_rows(y_ptr, dest_ptr, out_ptr, N, D, MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    # MODE 0: store row n at out[dest[n]] (bf16); 1: atomic add into int64 fixed point; 2: fp32 atomic add
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    ok = rows < N
    mask = ok[:, None] & (cols < D)[None, :]
    v = tl.load(y_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dest = tl.load(dest_ptr + rows, mask=ok, other=0).to(tl.int64)
    ptr = out_ptr + dest[:, None] * D + cols[None, :]
    if MODE == 0:
        tl.store(ptr, v.to(out_ptr.dtype.element_ty), mask=mask)
    elif MODE == 1:
        tl.atomic_add(ptr, (v * 4294967296.0).to(tl.int64), mask=mask, sem="relaxed")
    else:
        tl.atomic_add(ptr, v, mask=mask, sem="relaxed")


@triton.jit
def _fixed_to_float(acc_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    a = tl.load(acc_ptr + offs, mask=ok, other=0)
    tl.store(out_ptr + offs, (a.to(tl.float64) * (1.0 / 4294967296.0)).to(tl.float32), mask=ok)


def scatter(y, dest, out, mode, BM=64, BN=128, warps=4):
    N, D = y.shape
    _scatter_rows[(triton.cdiv(N, BM), triton.cdiv(D, BN))](y, dest, out, N, D, MODE=mode, BM=BM, BN=BN,
                                                          num_warps=warps)
    return out


def fixed_to_float(acc):
    out = torch.empty(acc.shape, device=acc.device, dtype=torch.float32)
    _fixed_to_float[(triton.cdiv(acc.numel(), 1024),)](acc, out, acc.numel(), BLOCK=1024)
    return out


def main(names=None):
    """The variants' results (each checked against the top-k sum); the memory rows are only printed."""
    results = []
    for name in shapes(names):
        p = ffn_problem(name)
        N, D, T, K, r = p.N, p.D, p.T, p.K, p.r
        y = torch.randn(N, D, device=DEVICE, dtype=p.h.dtype)           # routed (expert-sorted) rows
        dest_row = r.slot_N.contiguous()                                 # -> its (row, choice) slot
        dest_tok = (r.slot_N // K).contiguous()                          # -> its token
        big = torch.empty(N, D, device=DEVICE, dtype=p.h.dtype)
        want = sum_choices_triton(scatter(y, dest_row, big, 0), T, torch.float32)
        acc = torch.zeros(T, D, device=DEVICE, dtype=torch.int64)
        acc32 = torch.zeros(T, D, device=DEVICE, dtype=torch.float32)
        gb = lambda b: b / 1e9   # noqa: E731
        rows = [("store [N, D] bf16 scattered", lambda: scatter(y, dest_row, big, 0), gb(4 * N * D)),
                ("sum [N, D] -> [T, D] fp32", lambda: sum_choices_triton(big, T, torch.float32), gb(2 * N * D + 4 * T * D)),
                ("zero int64 [T, D]", lambda: acc.zero_(), gb(8 * T * D)),
                ("atomic add int64 fixed point", lambda: scatter(y, dest_tok, acc, 1), gb(2 * N * D)),
                ("int64 -> fp32 [T, D]", lambda: fixed_to_float(acc), gb(12 * T * D)),
                ("atomic add fp32 (not deterministic)", lambda: scatter(y, dest_tok, acc32, 2), gb(2 * N * D))]
        for label, fn, g in rows:
            ms = bench(fn)
            print(f"{name}  {label:40s} {ms:7.3f} ms  {g / ms:6.2f} TB/s (rows' bytes)")

        def fixed_point(BM=64, BN=128, warps=4):
            acc.zero_()
            scatter(y, dest_tok, acc, 1, BM, BN, warps)
            return fixed_to_float(acc)
        results.append(try_variant(f"{name}  today, whole", lambda: sum_choices_triton(scatter(y, dest_row, big, 0), T, torch.float32),
                                   lambda: (sum_choices_triton(big, T, torch.float32) - want).abs().max().item()))
        for BM, BN, warps in [(64, 128, 4)] + ([(128, 128, 8), (32, 256, 4), (64, 64, 4)] if DEVICE == "cuda" else []):
            results.append(try_variant(f"{name}  fixed point, whole, BM{BM} BN{BN} w{warps}",
                                       lambda: fixed_point(BM, BN, warps),
                                       lambda: (fixed_to_float(acc) - want).abs().max().item()))
    return results


if __name__ == "__main__":
    main()
