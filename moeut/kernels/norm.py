"""Triton kernels of moeut's LayerNorm (contract in `norm.py`; the reference is `F.layer_norm`).

Forward: one program normalises BR rows held whole in registers (D <= norm.MAX_WIDTH), in fp32, and
writes them in the output dtype (the autocast dtype: the bf16 copy the next matmul would make), with
each row's mean and 1/std for the backward.

Backward: dx, plus x's gradient through its other uses when given (one kernel instead of dx and
autograd's add of x's gradients). A fixed number of programs (a function of the shape only, never of
the GPU) each walk a contiguous range of rows, writing dx and keeping their own running sums of dy·x̂
and dy. A second kernel adds those [programs, D] partial sums in a fixed order: the weight and bias
gradients are bitwise reproducible, with no atomics (torch's column sums took 16 µs each for 2 MB on
the H200). The order depends on BACKWARD_PROGRAMS and SUM_COLUMNS only, never on the GPU.
Runs under `TRITON_INTERPRET=1` on CPU tensors (CI).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

import triton
import triton.language as tl

BACKWARD_PROGRAMS = 512  # partial-sum rows of the weight gradient (≈ 4 per SM of the H200's 132)
# Columns per program of the partial sums' reduction: few columns and all partial rows in one tile, so
# that many programs share the (~4 MB) read; wide column blocks leave few programs, each walking many
# rows, and the reduction becomes latency-bound.
SUM_COLUMNS = 8
SUM_ROWS = 512  # partial rows per tile of that reduction (tests lower it to walk several tiles)


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    mean_ptr,
    rstd_ptr,
    xc_ptr,
    R,
    D,
    sxr,
    syr,
    eps,
    COPY: tl.constexpr,
    DP: tl.constexpr,
    BR: tl.constexpr,
):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, DP)
    row_ok = rows < R
    col_ok = cols < D
    m = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * sxr + cols[None, :], mask=m, other=0.0)
    if COPY:  # x in the copy's dtype, contiguous (`cast_relay`)
        tl.store(xc_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], x.to(xc_ptr.dtype.element_ty), mask=m)
    x = x.to(tl.float32)
    mean = tl.sum(x, 1) / D
    xc = tl.where(m, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + rows[:, None].to(tl.int64) * syr + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd_kernel(
    x_ptr,
    dy_ptr,
    w_ptr,
    mean_ptr,
    rstd_ptr,
    dx_ptr,
    dw_part_ptr,
    db_part_ptr,
    add_ptr,
    dxc_ptr,
    R,
    D,
    sxr,
    sdyr,
    sdxr,
    sar,
    rows_per_program,
    ADD: tl.constexpr,
    COPY: tl.constexpr,
    DP: tl.constexpr,
    BR: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, DP)
    col_ok = cols < D
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([DP], dtype=tl.float32)
    db_acc = tl.zeros([DP], dtype=tl.float32)
    start = pid * rows_per_program
    end = tl.minimum(start + rows_per_program, R)
    for r0 in range(start, end, BR):
        rows = r0 + tl.arange(0, BR)
        row_ok = rows < end
        m = row_ok[:, None] & col_ok[None, :]
        r64 = rows[:, None].to(tl.int64)
        x = tl.load(x_ptr + r64 * sxr + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + r64 * sdyr + cols[None, :], mask=m, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = tl.where(m, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, 1) / D
        c2 = tl.sum(wdy, 1) / D
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if ADD:  # x's gradient through its other uses (`layer_norm(..., pass_through=True)`)
            dx += tl.load(add_ptr + r64 * sar + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dx = dx.to(dx_ptr.dtype.element_ty)
        tl.store(dx_ptr + r64 * sdxr + cols[None, :], dx, mask=m)
        if COPY:  # dx as stored, rounded again to the copy's dtype: what dx.to(dtype) gives (`cast_relay`)
            tl.store(dxc_ptr + r64 * D + cols[None, :], dx.to(dxc_ptr.dtype.element_ty), mask=m)
        dw_acc += tl.sum(dy * xhat, 0)
        db_acc += tl.sum(dy, 0)
    tl.store(dw_part_ptr + pid.to(tl.int64) * D + cols, dw_acc, mask=col_ok)
    tl.store(db_part_ptr + pid.to(tl.int64) * D + cols, db_acc, mask=col_ok)


@triton.jit
def _layer_norm_sum_partials_kernel(dw_part_ptr, db_part_ptr, dw_ptr, db_ptr, P, D, BP: tl.constexpr, BD: tl.constexpr):
    cols = tl.program_id(0) * BD + tl.arange(0, BD)
    col_ok = cols < D
    dw = tl.zeros([BP, BD], dtype=tl.float32)
    db = tl.zeros([BP, BD], dtype=tl.float32)
    for p0 in range(0, P, BP):  # the same order every time: bitwise reproducible
        ps = p0 + tl.arange(0, BP)
        m = (ps < P)[:, None] & col_ok[None, :]
        offs = ps[:, None].to(tl.int64) * D + cols[None, :]
        dw += tl.load(dw_part_ptr + offs, mask=m, other=0.0)
        db += tl.load(db_part_ptr + offs, mask=m, other=0.0)
    tl.store(dw_ptr + cols, tl.sum(dw, 0).to(dw_ptr.dtype.element_ty), mask=col_ok)
    tl.store(db_ptr + cols, tl.sum(db, 0).to(db_ptr.dtype.element_ty), mask=col_ok)


def _tiles(D: int, elements: int = 4096) -> Tuple[int, int, int]:
    """(DP, BR, num_warps): the padded row width, rows per tile (about `elements`), warps. The backward
    takes 2048-element tiles (its per-row work is larger; benchmarks/norm.py --sweep compares)."""
    DP = triton.next_power_of_2(D)
    return DP, max(1, elements // DP), 8 if DP >= 4096 else 4


def _rows(t: Tensor) -> Tensor:
    """t as [rows, D] with unit column stride (a copy only when the last dim is strided)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def layer_norm_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    out_dtype: torch.dtype,
    copy_dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """(y in out_dtype shaped like x, mean [R] fp32, rstd [R] fp32, x in copy_dtype shaped like x and
    contiguous, or None without copy_dtype) over x's last dim."""
    x2 = _rows(x)
    R, D = x2.shape
    y = torch.empty(R, D, device=x.device, dtype=out_dtype)
    xc = torch.empty(R, D, device=x.device, dtype=copy_dtype) if copy_dtype is not None else None
    mean = torch.empty(R, device=x.device, dtype=torch.float32)
    rstd = torch.empty(R, device=x.device, dtype=torch.float32)
    if R:
        DP, BR, warps = _tiles(D)
        _layer_norm_fwd_kernel[(triton.cdiv(R, BR),)](
            x2,
            weight,
            bias,
            y,
            mean,
            rstd,
            xc if xc is not None else y,
            R,
            D,
            x2.stride(0),
            y.stride(0),
            float(eps),
            COPY=xc is not None,
            DP=DP,
            BR=BR,
            num_warps=warps,
        )
    return y.view(x.shape), mean, rstd, xc.view(x.shape) if xc is not None else None


def layer_norm_bwd(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    mean: Tensor,
    rstd: Tensor,
    grad_add: Optional[Tensor] = None,
    copy_dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """(dx in x's dtype, d weight, d bias in the weight's dtype, dx.to(copy_dtype) or None) of
    `layer_norm_fwd`; dx plus grad_add (x's shape) when given, added in fp32 before dx is rounded."""
    x2, dy2 = _rows(x), _rows(grad_y)
    add2 = _rows(grad_add) if grad_add is not None else None
    R, D = x2.shape
    dx = torch.empty(R, D, device=x.device, dtype=x.dtype)
    dxc = torch.empty(R, D, device=x.device, dtype=copy_dtype) if copy_dtype is not None else None
    copy = dxc.view(x.shape) if dxc is not None else None
    DP, BR, warps = _tiles(D, 2048)
    rows_per_program = BR * triton.cdiv(triton.cdiv(max(R, 1), BACKWARD_PROGRAMS), BR)
    programs = triton.cdiv(R, rows_per_program)
    dw = torch.empty(D, device=x.device, dtype=weight.dtype)
    db = torch.empty(D, device=x.device, dtype=weight.dtype)
    if not R:
        return dx.view(x.shape), dw.zero_(), db.zero_(), copy
    # every program writes its whole row of partial sums: no zero fill
    dw_part = torch.empty(programs, D, device=x.device, dtype=torch.float32)
    db_part = torch.empty(programs, D, device=x.device, dtype=torch.float32)
    _layer_norm_bwd_kernel[(programs,)](
        x2,
        dy2,
        weight,
        mean,
        rstd,
        dx,
        dw_part,
        db_part,
        add2 if add2 is not None else dx,
        dxc if dxc is not None else dx,
        R,
        D,
        x2.stride(0),
        dy2.stride(0),
        dx.stride(0),
        add2.stride(0) if add2 is not None else 0,
        rows_per_program,
        ADD=add2 is not None,
        COPY=dxc is not None,
        DP=DP,
        BR=BR,
        num_warps=warps,
    )
    BP = min(SUM_ROWS, max(16, triton.next_power_of_2(programs)))
    _layer_norm_sum_partials_kernel[(triton.cdiv(D, SUM_COLUMNS),)](
        dw_part, db_part, dw, db, programs, D, BP=BP, BD=SUM_COLUMNS, num_warps=4
    )
    return dx.view(x.shape), dw, db, copy
