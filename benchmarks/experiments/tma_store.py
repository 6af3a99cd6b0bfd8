"""The down projection with its output tiles stored through TMA (twelfth session).

A standalone copy of the loop-over-N down projection, writing expert-sorted rows. The output goes
through a device-side tensor descriptor whose row count ends at the expert's last row, so a tile never
writes the next expert's rows. Weight tiles can be loaded through TMA too. Each variant is held against
moeut's kernel. Answer on the H200 (RESULTS.md K.2, results/s12_call3_exp_tma_store.txt): no variant beat
the plain-store kernel (best TMA-store form 0.266 ms against 0.252 at 244M).

    python benchmarks/experiments/tma_store.py        (CUDA; on CPU the tiny shape, interpreted)
"""
import torch

from common import DEVICE, bench, ffn_problem, shapes, try_variant
import triton
import triton.language as tl
from moeut.kernels.expert_mm import _find_tile

CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4), (128, 256, 8, 2),
           (256, 64, 8, 3)] if DEVICE == "cuda" else [(16, 16, 4, 2)]   # BM, BN, warps, stages


@triton.jit
def _down(x_ptr, w_ptr, out_ptr, offsets_ptr, scale_ptr, E, I, O, sxr, swe, swi, sor,
          EP: tl.constexpr, IP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
          TMA_OUT: tl.constexpr, TMA_W: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    e, row0, row_end, live = _find_tile(offsets_ptr, pid, E, EP, BM)
    if not live:
        return
    rows = row0 + tl.arange(0, BM)
    row_ok = rows < row_end
    ks = tl.arange(0, IP)
    a = tl.load(x_ptr + rows[:, None].to(tl.int64) * sxr + ks[None, :], mask=row_ok[:, None], other=0.0)
    gate = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    if TMA_OUT:   # rows past row_end (the next expert's) are outside the descriptor: never written
        desc = tl.make_tensor_descriptor(out_ptr, shape=[row_end.to(tl.int32), O], strides=[sor, 1],
                                         block_shape=[BM, BN])
    if TMA_W:
        wdesc = tl.make_tensor_descriptor(w_ptr, shape=[E * IP, O], strides=[swi, 1], block_shape=[IP, BN])
    for n0 in tl.range(0, O, BN, num_stages=STAGES):
        cols = n0 + tl.arange(0, BN)
        if TMA_W:
            b = wdesc.load([(e * IP).to(tl.int32), n0])
        else:
            b = tl.load(w_ptr + e.to(tl.int64) * swe + ks[:, None] * swi + cols[None, :])
        acc = tl.dot(a, b)
        acc = (acc * gate[:, None]).to(out_ptr.dtype.element_ty)
        if TMA_OUT:
            desc.store([row0.to(tl.int32), n0], acc)
        else:
            tl.store(out_ptr + rows[:, None].to(tl.int64) * sor + cols[None, :], acc, mask=row_ok[:, None])


def down(h, w, offsets, gate, BM, BN, warps, stages, tma_out, tma_w):
    """out [N, O] = gate * (h @ w[expert]), rows in expert-sorted order (as moeut's kernel with no dst)."""
    N, I = h.shape
    E, _, O = w.shape
    out = torch.empty(N, O, device=h.device, dtype=h.dtype)
    _down[(triton.cdiv(N, BM) + E,)](h, w, out, offsets, gate, E, I, O, h.stride(0), w.stride(0), w.stride(1),
                                     out.stride(0), EP=triton.next_power_of_2(E), IP=I, BM=BM, BN=BN,
                                     TMA_OUT=tma_out, TMA_W=tma_w, STAGES=stages, num_warps=warps)
    return out


def main(names=None):
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=DEVICE))
    results = []
    for name in shapes(names):
        p = ffn_problem(name)
        op = torch.ops.moeut.grouped_mm
        want = op(p.h, p.w2, p.r.offsets_E1, None, p.gate, None)
        print(f"{name} moeut kernel (contiguous out): {bench(lambda: op(p.h, p.w2, p.r.offsets_E1, None, p.gate, None)):.3f} ms")
        for tma_out in (False, True):
            for tma_w in (False, True):
                for BM, BN, warps, stages in CONFIGS:
                    out = []

                    def run():
                        out[:] = [down(p.h, p.w2, p.r.offsets_E1, p.gate, BM, BN, warps, stages, tma_out, tma_w)]
                    results.append(try_variant(
                        f"{name} tma_out={tma_out:d} tma_w={tma_w:d} BM{BM} BN{BN} w{warps} s{stages}", run,
                        lambda: (out[0].float() - want.float()).abs().max().item()))
    return results


if __name__ == "__main__":
    main()
