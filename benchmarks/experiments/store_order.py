"""Is the down projection's scattered store what keeps it at 65% of its bound? (twelfth session)

Times the σ-MoE down projection (I = 128 -> d_model, gate in the epilogue) writing its rows scattered to
(row, choice) order, as moeut does, against writing them in expert-sorted order; the top-k sum reading
(row, choice) order against reading sorted rows through the inverse permutation; and plain write and copy
bandwidth. Answer on the H200 (RESULTS.md K.2, results/s12_call2_exp_store_order.txt): no. Both orders
take 0.252 ms at 244M, while writing the same bytes alone takes 0.162.

    python benchmarks/experiments/store_order.py      (CUDA)
"""
import sys
from pathlib import Path
import torch
import triton
import triton.language as tl
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from moeut.expert_mm import route  # noqa: E402
from moeut.triton_sum import sum_choices_triton  # noqa: E402


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


@triton.jit
def _sum_gathered(y_ptr, idx_ptr, out_ptr, X, C, O, syr, sxr, BX: tl.constexpr, BO: tl.constexpr):
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


def main():
    for name, (D, E, K, T) in {"244M": (1024, 387, 16, 16384), "1B": (1536, 565, 24, 8192)}.items():
        dt = torch.bfloat16
        S = 128
        N = T * K
        expert = torch.rand(T, E, device="cuda").topk(K, dim=-1).indices
        r = route(expert, E)
        h = torch.randn(N, S, device="cuda", dtype=dt)
        w2 = torch.randn(E, S, D, device="cuda", dtype=dt) / S ** 0.5
        gate = torch.rand(N, device="cuda")
        op = torch.ops.moeut.grouped_mm
        inv = r.choice_RK.reshape(-1).contiguous()
        y_sorted = op(h, w2, r.offsets_E1, None, gate, None)
        y_scat = op(h, w2, r.offsets_E1, None, gate, r.slot_N)
        gb = 2 * (N * S + N * D) / 1e9
        rows = [("down fwd scatter", bench(lambda: op(h, w2, r.offsets_E1, None, gate, r.slot_N)), gb),
                ("down fwd contiguous", bench(lambda: op(h, w2, r.offsets_E1, None, gate, None)), gb)]
        big = torch.empty(N, D, device="cuda", dtype=dt)
        rows.append(("fill [N, D] (write only)", bench(lambda: big.fill_(1.0)), 2 * N * D / 1e9))
        rows.append(("copy [N, D]", bench(lambda: big.copy_(y_scat)), 4 * N * D / 1e9))
        ref = sum_choices_triton(y_scat, T, dt)
        got = sum_gathered(y_sorted, inv, T, K, dt)
        print(name, "gathered sum matches:", torch.equal(ref, got))
        sgb = (2 * N * D + 2 * T * D) / 1e9
        rows.append(("sum (row, choice) order", bench(lambda: sum_choices_triton(y_scat, T, dt)), sgb))
        for BX, BO, wp in ((8, 256, 4), (4, 512, 4), (16, 128, 4), (8, 512, 8), (2, 1024, 4)):
            rows.append((f"sum gathered BX{BX} BO{BO} w{wp}", bench(lambda: sum_gathered(y_sorted, inv, T, K, dt, BX, BO, wp)), sgb))
        for label, ms, g in rows:
            print(f"{name}  {label:36s} {ms:7.3f} ms  {g / ms:6.2f} TB/s")


if __name__ == "__main__":
    main()
