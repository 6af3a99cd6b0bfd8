"""Weight tiles through TMA in the K-loop passes (seventeenth session; not yet run on a GPU).

The twelfth session loaded the weight through TMA only in the loop-over-N down projection, which is
bound by its stores (RESULTS K.2: no change). The wide-input passes loop over K = d_model instead:
the FFN's up projection (gathered x rows @ w1[e], ReLU) is the step's largest GEMM, at ~386 TFLOP/s,
half the H200's dense peak, and the down projection's input gradient (gathered d out rows @ w2[e]^T)
runs at ~339. There the gathered row tile has to come through ordinary loads (Hopper's TMA cannot
gather rows), but the weight tile of expert e is a plain 2D block of w1 viewed as [E * d_model, 128]
(of w2 viewed as [E * 128, d_model], transposed in shared memory). This times a standalone copy of
both passes with the weight loaded by pointer and through a device-side tensor descriptor, over a few
tile configs, against moeut's kernel; and the TMA form with Triton's automatic warp specialization,
which the twelfth session found to change nothing with both operands loaded by pointer (K.2) and which
is built around TMA producers.

Compiled for sm_90 on a machine without a GPU (Triton 3.9, `compile_sm90.py`'s fake driver), both
passes' TMA forms are wgmma pipelines fed by one TMA copy (the weight) and one cp.async copy (the
gathered rows) per stage, with the same shared memory as the pointer forms (+40 bytes). There the
warp-specialization flag left the loop unpartitioned (its IR holds no partitions), likely because the
gathered rows cannot come through TMA.

    python benchmarks/experiments/tma_weight_kloop.py      (CUDA; on CPU the tiny shape, interpreted)
"""
import torch

from common import DEVICE, bench, ffn_problem, shapes, try_variant
import triton
import triton.language as tl
from moeut.ops.grouped_mm import grouped_mm
from moeut.kernels.expert_mm import _find_tile

CONFIGS = [(128, 128, 32, 8, 5), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4),
           (64, 128, 64, 4, 5)] if DEVICE == "cuda" else [(16, 16, 16, 8, 2)]   # BM, BN, BK, warps, stages


@triton.jit
def _kloop_pass(x_ptr, w_ptr, out_ptr, offsets_ptr, rows_ptr, E, I, O, swe, swi, swo,
                EP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TMA_W: tl.constexpr,
                W_T: tl.constexpr, RELU: tl.constexpr, UPCAST: tl.constexpr, WS: tl.constexpr, STAGES: tl.constexpr):
    # out[n] = act(x[rows[n]] @ w[expert of n]) in routed order. w is [E, I, O] contiguous, or with W_T
    # the transpose of an [E, O, I] tensor (the down projection's input gradient reads w2 so). I % BK == 0
    # and O % BN == 0 (asserted by the caller), so no weight block crosses into the next expert's rows
    # of the [E * I, O] (or [E * O, I]) view.
    pid = tl.program_id(0)
    n_col = O // BN
    e, row0, row_end, live = _find_tile(offsets_ptr, pid // n_col, E, EP, BM)
    if not live:
        return
    n0 = (pid % n_col) * BN
    rows = row0 + tl.arange(0, BM)
    row_ok = rows < row_end
    src = tl.load(rows_ptr + rows, mask=row_ok, other=0)
    ks = tl.arange(0, BK)
    cols = n0 + tl.arange(0, BN)
    a_ptrs = x_ptr + src[:, None].to(tl.int64) * I + ks[None, :]
    if TMA_W:
        if W_T:
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E * O, I], strides=[I, 1], block_shape=[BN, BK])
        else:
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E * I, O], strides=[O, 1], block_shape=[BK, BN])
    else:
        b_ptrs = w_ptr + e.to(tl.int64) * swe + ks[:, None] * swi + cols[None, :] * swo
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in tl.range(0, I, BK, num_stages=STAGES, warp_specialize=WS):
        a = tl.load(a_ptrs + k0, mask=row_ok[:, None], other=0.0)
        if TMA_W:
            if W_T:
                b = tl.trans(w_desc.load([(e * O).to(tl.int32) + n0, k0]))
            else:
                b = w_desc.load([(e * I).to(tl.int32) + k0, n0])
        else:
            b = tl.load(b_ptrs + k0 * swi)
        if UPCAST:   # the interpreter's bf16 dots are not exact (as in moeut's kernels)
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32))
        else:
            acc = tl.dot(a, b, acc)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * O + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])


def _scratch(size: int, alignment: int, stream):
    """Global memory for device-side tensor descriptors (Triton asks for it through set_allocator)."""
    return torch.empty(size, device=DEVICE, dtype=torch.int8)


def kloop_pass(x, w, offsets, rows, relu, BM, BN, BK, warps, stages, tma_w, ws=False):
    """relu?(x[rows[n]] @ w[expert of n]) -> [N, O]; w [E, I, O], contiguous or a transposed [E, O, I]."""
    N, (E, I, O) = rows.shape[0], w.shape
    assert I % BK == 0 and O % BN == 0, (I, BK, O, BN)
    w_t = w.stride(1) == 1 and not w.is_contiguous()
    assert w.is_contiguous() or (w_t and w.transpose(1, 2).is_contiguous())
    out = torch.empty(N, O, device=x.device, dtype=x.dtype)
    grid = ((triton.cdiv(N, BM) + E) * (O // BN),)   # enough tiles for any split of N over E experts
    _kloop_pass[grid](x, w, out, offsets, rows, E, I, O, *w.stride(), EP=triton.next_power_of_2(E), BM=BM, BN=BN,
                      BK=BK, TMA_W=tma_w, W_T=w_t, RELU=relu, UPCAST=DEVICE != "cuda", WS=ws, STAGES=stages,
                      num_warps=warps)
    return out


def main(names=None):
    triton.set_allocator(_scratch)
    results = []
    for name in shapes(names):
        p = ffn_problem(name)
        r = p.r
        flop = 2.0 * p.N * p.D * p.S
        # up fwd: gathered x @ w1[e], ReLU; down dx: gathered d out @ w2[e]^T (w2 stored [E, S, D])
        gy = torch.randn_like(p.x)
        for label, x, w, relu in (("up fwd", p.x, p.w1, True), ("down dx", gy, p.w2.transpose(1, 2), False)):
            want = grouped_mm(x, w, r.offsets_E1, r.rows_N, None, None, relu=relu)
            ms = bench(lambda: grouped_mm(x, w, r.offsets_E1, r.rows_N, None, None, relu=relu))
            if ms == ms:
                print(f"{name}  {label}  moeut (autotuned): {ms:.3f} ms {flop / ms / 1e9:.0f} TFLOP/s", flush=True)
            for tma_w, ws in ((False, False), (True, False), (True, True)):
                for BM, BN, BK, warps, stages in CONFIGS:
                    if ws and warps < 8:   # Triton 3.6's warp specialization crashed with 4 warps (RESULTS K.2)
                        continue
                    got = []

                    def run():
                        got[:] = [kloop_pass(x, w, r.offsets_E1, r.rows_N, relu, BM, BN, BK, warps, stages, tma_w, ws)]
                    results.append(try_variant(f"{name}  {label}  tma_w={int(tma_w)} ws={int(ws)} BM{BM} BN{BN} BK{BK} "
                                               f"w{warps} s{stages}", run,
                                               lambda: (got[0].float() - want.float()).abs().max().item(), flop))
    return results


if __name__ == "__main__":
    main()
