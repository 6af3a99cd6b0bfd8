"""Triton kernels for `moeut::expert_mm`'s forward and input gradient, and the row dot beside them.

Same contract as the plain-PyTorch version in `ops/grouped_mm.py` (the reference every test compares with):
routed rows are sorted by expert, expert e owns rows offsets[e]:offsets[e+1].

* `grouped_mm_triton`: a grouped GEMM over row tiles that never straddle two experts. The tile ->
  (expert, first row) table is built on the device without a host sync; the row gather is fused into
  the operand load, a ReLU, the gate scale and the scatter to (row, choice) order into the epilogue, so no
  gathered, scaled or permuted copy is ever written. A row tile's column blocks are adjacent programs,
  so they run together and read the tile's input rows once from memory. For narrow inputs (I <= 128,
  e.g. the FFN down projection: 128 -> d_model), the "loop over N" form loads the input tile once and
  walks all output columns in one program (`use_loop_n`). That form can also dot each output row,
  before scale and rounding, with a gathered row of another tensor (`ROW_DOT`: SwitchHead's value
  gate gradient, see `grouped_mm.grouped_mm_dot`), and write its gated input rows (`GATE_X`: the
  weight gradient's operand).
* `row_dot_triton`: the row dot products around the products (a combine's gate gradient), with the
  gate-scaled input gradient and the gated operand of the weight gradient written in the same pass.

The weight gradient's kernel is in `kernels/weight_grad.py`; it shares this file's `dot_acc` helper
and `aligned`.

All run under `TRITON_INTERPRET=1` on CPU tensors, which is how CI checks their logic.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the model works without Triton; only this fast path needs it
    triton = None

from moeut.settings import settings

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_loop_n(I: int, O: int, N: int, E: int) -> bool:
    """Narrow inputs (I <= 128) with many rows per expert: one program per row tile walking all of O.

    With many rows per expert (the 244M/1B FFN's down projection and up input-gradient: about 700)
    this beats one program per (row tile, column block), which re-reads each row tile per column block.
    With few rows per expert (decoding: N = 512 rows over 387 experts) it serialises each expert's
    weight reads in one program, and batch-32 decoding became 2x slower: there the column blocks
    keep the parallelism.
    """
    if I > 128:  # the input tile stays in registers for the whole program
        return False
    return O > 128 and N >= 128 * E


def available() -> bool:
    return triton is not None and settings.triton


if triton is not None:
    _INTERPRET = tl.constexpr(INTERPRET)  # jit functions may only read constexpr globals

    def _mm_configs():
        if INTERPRET:
            return [triton.Config({"BM": 16, "BN": 16, "BK": 16}, num_warps=4)]
        return [
            # Few configs on purpose: every kernel variant compiles each of them once per process.
            # The first two serve the wide-input passes (up forward, down input gradient), the third the
            # "loop over N" ones (down forward, up input gradient); benchmarks/kernel_sweep.py picks them.
            triton.Config({"BM": 128, "BN": 128, "BK": 32}, num_warps=8, num_stages=5),
            triton.Config({"BM": 256, "BN": 128, "BK": 64}, num_warps=8, num_stages=4),
            triton.Config({"BM": 128, "BN": 64, "BK": 64}, num_warps=8, num_stages=4),
            # Fallback for variants none of the above fits in shared memory (fp32 "loop over N").
            triton.Config({"BM": 64, "BN": 64, "BK": 32}, num_warps=4, num_stages=2),
        ]

    def _smem_estimate(cfg, kw, w_size: int = 0) -> int:
        """Bytes of shared memory a config's pipelined operand tiles take (num_stages buffers: Triton
        3.6 asked for 240 KB where num_stages - 1 predicted 196, for an fp32 weight rounded on load);
        w_size: bytes per weight element when the weight is wider than x."""
        es = 4 if kw.get("FP32") else 2
        ws = max(es, w_size)
        m, buffers = cfg.kwargs, cfg.num_stages
        if kw.get("LOOP_N"):
            return m["BM"] * kw["IP"] * es + buffers * kw["IP"] * m["BN"] * ws
        return buffers * (m["BM"] * m["BK"] * es + m["BK"] * m["BN"] * ws)

    def _smem_limit() -> int:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(0.9 * getattr(props, "shared_memory_per_block_optin", 232448))

    def _prune_mm_configs(configs, named_args, **kwargs):
        """Configs that fit in shared memory (the fallback only when none of the others does); with
        `settings.autotune` off the first of them, so short runs compile one config per variant."""
        limit = _smem_limit()
        w = named_args.get("w_ptr")
        w_size = w.element_size() if w is not None and hasattr(w, "element_size") else 0
        fit = [c for c in configs[:-1] if _smem_estimate(c, kwargs, w_size) <= limit] or configs[-1:]
        return fit if settings.autotune else fit[:1]

    @triton.jit
    def dot_acc(a, b, acc, FP32: tl.constexpr):
        if FP32:
            return acc + tl.dot(a, b, input_precision="ieee")
        elif _INTERPRET:
            # Triton's CPU interpreter computes garbage for bf16 dots (3.9); upcast there only.
            return acc + tl.dot(a.to(tl.float32), b.to(tl.float32))
        else:
            return acc + tl.dot(a, b)

    @triton.jit
    def _find_tile(offsets_ptr, pid, E, EP: tl.constexpr, BM: tl.constexpr):
        # Row tiles never straddle experts: expert e owns cdiv(count_e, BM) tiles. Every program
        # recomputes the (tiny) prefix sum over experts, so no host-side table or sync is needed.
        eids = tl.arange(0, EP)
        in_range = eids < E
        lo = tl.load(offsets_ptr + eids, mask=in_range, other=0)
        hi = tl.load(offsets_ptr + eids + 1, mask=in_range, other=0)
        tiles = (hi - lo + BM - 1) // BM
        cum = tl.cumsum(tiles, 0)
        total = tl.sum(tiles, 0)
        e = tl.sum((cum <= pid).to(tl.int32), 0)
        mine = eids == e
        first_tile = tl.sum(tl.where(mine, cum - tiles, 0), 0)
        row0 = tl.sum(tl.where(mine, lo, 0), 0) + (pid - first_tile) * BM
        row_end = tl.sum(tl.where(mine, hi, 0), 0)
        return e, row0, row_end, pid < total

    # Passes that differ only in the weight's layout share a key, and so a config (fewer compilations;
    # the weight's stride is left out of the key).
    @triton.autotune(
        configs=_mm_configs(),
        key=["I", "O", "GATHER", "SCALE", "SCATTER", "FP32", "LOOP_N", "SCALE_AT_DST", "RELU", "ROW_DOT"],
        prune_configs_by={"early_config_prune": _prune_mm_configs},
    )
    @triton.jit
    def _expert_mm_kernel(
        x_ptr,
        w_ptr,
        out_ptr,
        offsets_ptr,
        rows_ptr,
        scale_ptr,
        dst_ptr,
        dotx_ptr,
        dotrows_ptr,
        dotdst_ptr,
        dot_ptr,
        gated_ptr,
        E,
        I,
        O,
        sxr,
        sxi,
        swe,
        swi,
        swo,
        sor,
        soo,
        sdr,
        sdc,
        GATHER: tl.constexpr,
        SCALE: tl.constexpr,
        SCATTER: tl.constexpr,
        FP32: tl.constexpr,
        LOOP_N: tl.constexpr,
        SCALE_AT_DST: tl.constexpr,
        RELU: tl.constexpr,
        ROW_DOT: tl.constexpr,
        DOT_AT_DST: tl.constexpr,
        GATE_X: tl.constexpr,
        EP: tl.constexpr,
        IP: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if LOOP_N:
            pid_m = pid
            pid_n = 0
        else:
            n_col_blocks = tl.cdiv(O, BN)
            pid_m = pid // n_col_blocks
            pid_n = pid % n_col_blocks
        e, row0, row_end, live = _find_tile(offsets_ptr, pid_m, E, EP, BM)
        if not live:
            return
        rows = row0 + tl.arange(0, BM)
        row_ok = rows < row_end
        if GATHER:
            src = tl.load(rows_ptr + rows, mask=row_ok, other=0)
        else:
            src = rows
        if SCATTER:
            dst = tl.load(dst_ptr + rows, mask=row_ok, other=0)
        else:
            dst = rows
        if SCALE:  # the router gate, applied in fp32 before rounding
            if SCALE_AT_DST:
                gate = tl.load(scale_ptr + dst, mask=row_ok, other=0.0).to(tl.float32)
            else:
                gate = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        out_rows = out_ptr + dst[:, None].to(tl.int64) * sor
        if LOOP_N:  # I <= IP: one input tile, every output column block
            ks = tl.arange(0, IP)
            k_ok = ks < I
            a = tl.load(
                x_ptr + src[:, None].to(tl.int64) * sxr + ks[None, :] * sxi,
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            w_rows = w_ptr + e.to(tl.int64) * swe + ks[:, None] * swi
            if GATE_X:  # the weight gradient's gated operand, in routed order ([N, I] contiguous)
                tl.store(
                    gated_ptr + rows[:, None].to(tl.int64) * I + ks[None, :],
                    (a.to(tl.float32) * gate[:, None]).to(gated_ptr.dtype.element_ty),
                    mask=row_ok[:, None] & k_ok[None, :],
                )
            if ROW_DOT:  # a program holds whole output rows: it can dot them with another tensor's rows
                dot_src = tl.load(dotrows_ptr + rows, mask=row_ok, other=0)
                dot_rows = dotx_ptr + dot_src[:, None].to(tl.int64) * sdr
                row_dot = tl.zeros((BM,), dtype=tl.float32)
            for n0 in range(0, O, BN):
                cols = n0 + tl.arange(0, BN)
                col_ok = cols < O
                b = tl.load(w_rows + cols[None, :] * swo, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                b = b.to(x_ptr.dtype.element_ty)  # an fp32 master weight, rounded as it is loaded
                acc = dot_acc(a, b, tl.zeros((BM, BN), dtype=tl.float32), FP32)
                if ROW_DOT:  # the product before activation, scale and rounding
                    other = tl.load(dot_rows + cols[None, :] * sdc, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
                    row_dot += tl.sum(acc * other.to(tl.float32), axis=1)
                if RELU:
                    acc = tl.maximum(acc, 0.0)
                if SCALE:
                    acc = acc * gate[:, None]
                tl.store(
                    out_rows + cols[None, :] * soo,
                    acc.to(out_ptr.dtype.element_ty),
                    mask=row_ok[:, None] & col_ok[None, :],
                )
            if ROW_DOT:
                if DOT_AT_DST:
                    dot_at = tl.load(dotdst_ptr + rows, mask=row_ok, other=0)
                else:
                    dot_at = rows
                tl.store(dot_ptr + dot_at, row_dot, mask=row_ok)
        else:
            cols = pid_n * BN + tl.arange(0, BN)
            col_ok = cols < O
            ks = tl.arange(0, BK)
            a_ptrs = x_ptr + src[:, None].to(tl.int64) * sxr + ks[None, :] * sxi
            b_ptrs = w_ptr + e.to(tl.int64) * swe + ks[:, None] * swi + cols[None, :] * swo
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, I, BK):
                k_ok = (k0 + ks) < I
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(x_ptr.dtype.element_ty)
                acc = dot_acc(a, b, acc, FP32)
                a_ptrs += BK * sxi
                b_ptrs += BK * swi
            if RELU:
                acc = tl.maximum(acc, 0.0)
            if SCALE:
                acc = acc * gate[:, None]
            tl.store(
                out_rows + cols[None, :] * soo, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :]
            )

    AUTOTUNED_MM_KERNEL = _expert_mm_kernel  # for `triton_weight_grad.autotune_choices`


if triton is not None:

    @triton.jit
    def _row_dot_kernel(
        a_ptr,
        b_ptr,
        rows_ptr,
        scale_ptr,
        dst_ptr,
        sdst_ptr,
        dot_ptr,
        scaled_ptr,
        gated_ptr,
        N,
        I,
        sar,
        sai,
        sbr,
        sbi,
        ssr,
        GATHER: tl.constexpr,
        SCALE: tl.constexpr,
        DST: tl.constexpr,
        RELU_MASK: tl.constexpr,
        SCALED_DST: tl.constexpr,
        GATE_B: tl.constexpr,
        IP: tl.constexpr,
        BR: tl.constexpr,
    ):
        n = tl.program_id(0) * BR + tl.arange(0, BR)
        n_ok = n < N
        i = tl.arange(0, IP)
        m = n_ok[:, None] & (i < I)[None, :]
        if GATHER:
            src = tl.load(rows_ptr + n, mask=n_ok, other=0)
        else:
            src = n
        if DST:  # gate and its gradient in (row, choice) order: routed row n's slot is dst[n]
            at = tl.load(dst_ptr + n, mask=n_ok, other=0)
        else:
            at = n
        a = tl.load(a_ptr + n[:, None].to(tl.int64) * sar + i[None, :] * sai, mask=m, other=0.0)
        b = tl.load(b_ptr + src[:, None].to(tl.int64) * sbr + i[None, :] * sbi, mask=m, other=0.0)
        tl.store(dot_ptr + at, tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1), mask=n_ok)
        if SCALE:
            s = tl.load(scale_ptr + at, mask=n_ok, other=0.0).to(tl.float32)
            scaled = a.to(tl.float32) * s[:, None]
            if RELU_MASK:  # b is a ReLU's output: the gradient of its input is zero where b is
                scaled = tl.where(b > 0, scaled, 0.0)
            if SCALED_DST:  # written in (row, choice) order, ready for a top-k sum
                s_at = tl.load(sdst_ptr + n, mask=n_ok, other=0)
            else:
                s_at = n
            tl.store(
                scaled_ptr + s_at[:, None].to(tl.int64) * ssr + i[None, :],
                scaled.to(scaled_ptr.dtype.element_ty),
                mask=m,
            )
            if GATE_B:  # the weight gradient's gated operand, in routed order ([N, I] contiguous)
                tl.store(
                    gated_ptr + n[:, None].to(tl.int64) * I + i[None, :],
                    (b.to(tl.float32) * s[:, None]).to(gated_ptr.dtype.element_ty),
                    mask=m,
                )


def row_dot_triton(
    a_NI: Tensor,
    b_MI: Tensor,
    b_rows_N: Optional[Tensor],
    scale_N: Optional[Tensor],
    dst_N: Optional[Tensor] = None,
    relu_mask: bool = False,
    scaled_dst_N: Optional[Tensor] = None,
    gate_b: bool = False,
    rows_per_program: Optional[int] = None,
):
    """(dot [N] fp32, scaled [N, I] or [0, I], gated [N, I] or [0, I]): see `grouped_mm.row_dot`.
    rows_per_program: rows each program walks (default: as many as fit 8192 elements, at most 64)."""
    N, I = a_NI.shape
    dot = torch.empty(N, device=a_NI.device, dtype=torch.float32)
    scaled = torch.empty(N if scale_N is not None else 0, I, device=a_NI.device, dtype=a_NI.dtype)
    gated = torch.empty(N if gate_b else 0, I, device=a_NI.device, dtype=b_MI.dtype)
    if N == 0:
        return dot, scaled, gated
    IP = max(16, triton.next_power_of_2(I))
    BR = rows_per_program or (4 if INTERPRET else max(1, min(64, 8192 // IP)))
    scale = scale_N.contiguous() if scale_N is not None else None  # any float dtype: read as fp32
    _row_dot_kernel[(triton.cdiv(N, BR),)](
        a_NI,
        b_MI,
        or_default(b_rows_N, dot),
        or_default(scale, dot),
        or_default(dst_N, dot),
        or_default(scaled_dst_N, dot),
        dot,
        scaled if scale_N is not None else dot,
        gated if gate_b else dot,
        N,
        I,
        a_NI.stride(0),
        a_NI.stride(1),
        b_MI.stride(0),
        b_MI.stride(1),
        scaled.stride(0) if scale_N is not None else 0,
        GATHER=b_rows_N is not None,
        SCALE=scale_N is not None,
        DST=dst_N is not None,
        RELU_MASK=relu_mask,
        SCALED_DST=scaled_dst_N is not None,
        GATE_B=gate_b,
        IP=IP,
        BR=BR,
        num_warps=4,
    )
    return dot, scaled, gated


ALIGN = 16  # elements: Triton specialises integer arguments divisible by 16 and vectorises loads along them


def _padding_order(t: Tensor) -> Optional[list]:
    """The memory order of t's dims (outermost first) if a padded copy would align its rows, else None."""
    if t.dim() < 2 or t.numel() == 0:
        return None
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    phys = t.permute(order)
    if phys.stride(-1) != 1:
        return None  # no unit-stride dim: the kernels read any strides, just slowly
    if (
        all(st % ALIGN == 0 or size == 1 for st, size in zip(phys.stride()[:-1], phys.shape[:-1]))
        and t.data_ptr() % 16 == 0
    ):
        return None
    return order


def aligned(t: Tensor, copy_dtype: Optional[torch.dtype] = None, always_copy: bool = False) -> Tensor:
    """t, or a copy of it whose row strides are multiples of ALIGN elements (same shape and dim order);
    a copy is made in `copy_dtype` if given (an fp32 weight is then rounded in the same pass), and
    made even of an aligned t with `always_copy` (a cast that pads when it has to).

    A row stride such as 412 (MoEUT_44M's d_model) or 82 (its d_head) makes Triton load element by
    element: on the H200 the 44M down projection's input gradient ran at 17 TFLOP/s against 323 at
    244M. The copy goes into a buffer whose innermost dim is padded (412 -> 416, never read), a few µs
    against milliseconds saved per pass. Operands only; outputs keep the operators' contiguous layout.
    """
    order = _padding_order(t)
    if order is None:
        return t.to(copy_dtype) if always_copy and copy_dtype is not None else t
    phys = t.permute(order)
    inner = phys.shape[-1]
    buf = phys.new_empty(*phys.shape[:-1], -(-inner // ALIGN) * ALIGN, dtype=copy_dtype or t.dtype)[..., :inner]
    buf.copy_(phys)
    return buf.permute([order.index(d) for d in range(t.dim())])


def grouped_mm_triton(
    x_RI: Tensor,
    w_EIO: Tensor,
    offsets_E1: Tensor,
    rows_N: Optional[Tensor],
    scale_N: Optional[Tensor] = None,
    dst_N: Optional[Tensor] = None,
    scale_at_dst: bool = False,
    relu: bool = False,
    dot_x_MO: Optional[Tensor] = None,
    dot_rows_N: Optional[Tensor] = None,
    dot_dst_N: Optional[Tensor] = None,
    gate_x: bool = False,
):
    """The grouped GEMM [N, O]; with dot_x (needs `loop_n_dot_applies`), also (out, dot, gated_x): dot [N]
    fp32 is <routed row n's product before activation and scale, dot_x[dot_rows[n]]>, written at dot_dst[n]
    if given, else at n; gated_x [N, I] (or [0, I] without gate_x) is routed row n's input row times its
    scale, rounded to x's dtype, in routed order (the gated operand of the weight gradient)."""
    N = x_RI.shape[0] if rows_N is None else rows_N.shape[0]
    E, I, O = w_EIO.shape
    out_NO = torch.empty(N, O, device=x_RI.device, dtype=x_RI.dtype)
    row_dot = dot_x_MO is not None
    dot_N = torch.empty(N if row_dot else 0, device=x_RI.device, dtype=torch.float32)
    torch._check(
        not gate_x or (row_dot and scale_N is not None), lambda: "grouped_mm_triton: gate_x needs dot_x and a scale"
    )
    gated_NI = torch.empty(N if gate_x else 0, I, device=x_RI.device, dtype=x_RI.dtype)
    if N == 0:
        return (out_NO, dot_N, gated_NI) if row_dot else out_NO
    x_RI, w_EIO = aligned(x_RI), aligned(w_EIO, copy_dtype=x_RI.dtype)
    unused = offsets_E1  # pointer for the arguments a constexpr flag switches off (never read)
    scale = scale_N.contiguous() if scale_N is not None else None  # any float dtype: read as fp32

    loop_n = use_loop_n(I, O, N, E)
    if row_dot:
        torch._check(loop_n, lambda: "grouped_mm_triton: a row dot needs the loop-over-N form")
        torch._check(
            dot_rows_N is not None and dot_x_MO.shape[1] == O, lambda: "grouped_mm_triton: dot_x [M, O] and dot_rows"
        )
        dot_x_MO = aligned(dot_x_MO)

    def grid(meta):
        # Upper bound on the number of row tiles; programs past the real count return at once.
        row_tiles = triton.cdiv(N, meta["BM"]) + E
        return (row_tiles if loop_n else row_tiles * triton.cdiv(O, meta["BN"]),)

    _expert_mm_kernel[grid](
        x_RI,
        w_EIO,
        out_NO,
        offsets_E1,
        or_default(rows_N, unused),
        or_default(scale, unused),
        or_default(dst_N, unused),
        or_default(dot_x_MO, unused),
        or_default(dot_rows_N, unused),
        or_default(dot_dst_N, unused),
        dot_N,
        gated_NI if gate_x else unused,
        E,
        I,
        O,
        x_RI.stride(0),
        x_RI.stride(1),
        w_EIO.stride(0),
        w_EIO.stride(1),
        w_EIO.stride(2),
        out_NO.stride(0),
        out_NO.stride(1),
        dot_x_MO.stride(0) if row_dot else 0,
        dot_x_MO.stride(1) if row_dot else 0,
        GATHER=rows_N is not None,
        SCALE=scale_N is not None,
        SCATTER=dst_N is not None,
        FP32=x_RI.dtype == torch.float32,
        LOOP_N=loop_n,
        SCALE_AT_DST=scale_at_dst,
        RELU=relu,
        ROW_DOT=row_dot,
        DOT_AT_DST=dot_dst_N is not None,
        GATE_X=gate_x,
        EP=triton.next_power_of_2(E),
        IP=max(16, triton.next_power_of_2(I)),
    )
    return (out_NO, dot_N, gated_NI) if row_dot else out_NO


def or_default(t: Optional[Tensor], default: Tensor) -> Tensor:
    return default if t is None else t
