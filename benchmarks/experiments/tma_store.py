"""The down projection with its output tiles stored through TMA (twelfth session).

A standalone copy of the loop-over-N down projection, writing expert-sorted rows. The output goes
through a device-side tensor descriptor whose row count ends at the expert's last row, so a tile never
writes the next expert's rows. Weight tiles can be loaded through TMA too. Each variant is held against
moeut's kernel. Answer on the H200 (RESULTS.md K.2, results/s12_call3_exp_tma_store.txt): no variant beat
the plain-store kernel (best TMA-store form 0.266 ms against 0.252 at 244M).

    python benchmarks/experiments/tma_store.py        (CUDA)
"""
import sys
from pathlib import Path
import torch
import triton
import triton.language as tl
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from moeut.expert_mm import route  # noqa: E402
from moeut.triton_expert_mm import _find_tile  # noqa: E402


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


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
    if TMA_OUT:
        desc = tl.make_tensor_descriptor(out_ptr, shape=[row_end.to(tl.int32), O], strides=[sor, 1], block_shape=[BM, BN])
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
    N, I = h.shape
    E, _, O = w.shape
    out = torch.empty(N, O, device=h.device, dtype=h.dtype)
    grid = (triton.cdiv(N, BM) + E,)
    _down[grid](h, w, out, offsets, gate, E, I, O, h.stride(0), w.stride(0), w.stride(1), out.stride(0),
                EP=triton.next_power_of_2(E), IP=I, BM=BM, BN=BN, TMA_OUT=tma_out, TMA_W=tma_w, STAGES=stages,
                num_warps=warps)
    return out


def main():
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    for name, (D, E, K, T) in {"244M": (1024, 387, 16, 16384), "1B": (1536, 565, 24, 8192)}.items():
        dt = torch.bfloat16
        S, N = 128, T * K
        expert = torch.rand(T, E, device="cuda").topk(K, dim=-1).indices
        r = route(expert, E)
        h = torch.randn(N, S, device="cuda", dtype=dt)
        w2 = torch.randn(E, S, D, device="cuda", dtype=dt) / S ** 0.5
        gate = torch.rand(N, device="cuda")
        op = torch.ops.moeut.grouped_mm
        want = op(h, w2, r.offsets_E1, None, gate, None)
        print(f"{name} moeut kernel (contiguous out)  {bench(lambda: op(h, w2, r.offsets_E1, None, gate, None)):.3f} ms")
        for tma_out in (False, True):
            for tma_w in (False, True):
                for BM, BN, warps, stages in ((128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 128, 4, 3),
                                              (64, 64, 4, 4), (128, 256, 8, 2), (256, 64, 8, 3)):
                    try:
                        got = down(h, w2, r.offsets_E1, gate, BM, BN, warps, stages, tma_out, tma_w)
                        ok = (got.float() - want.float()).abs().max().item()
                        ms = bench(lambda: down(h, w2, r.offsets_E1, gate, BM, BN, warps, stages, tma_out, tma_w))
                        print(f"{name} tma_out={tma_out:d} tma_w={tma_w:d} BM{BM} BN{BN} w{warps} s{stages}: "
                              f"{ms:.3f} ms  max diff {ok:.2e}")
                    except Exception as exc:
                        print(f"{name} tma_out={tma_out:d} tma_w={tma_w:d} BM{BM} BN{BN} w{warps} s{stages}: "
                              f"failed {type(exc).__name__}: {str(exc)[:150]}")


if __name__ == "__main__":
    main()
