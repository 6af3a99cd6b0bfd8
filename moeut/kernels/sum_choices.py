"""Triton kernel for `moeut::sum_choices`: [X*C, O] rows in (group, choice) order -> [X, O] sums.

The top-k sums of the MoE projections (the FFN output, the input gradient of the up projection,
SwitchHead's output and value gradients) read C = k rows per output row: 0.5 GB per sum at 244M.
`torch.sum` over the middle dim of [X, C, O] ran at about 2.5 TB/s on the H200 and rounds to the
input's dtype, after which the backward converted the bf16 sum to the fp32 residual's dtype in one
more kernel. This kernel walks the C rows of a block of outputs with contiguous loads, accumulates in
fp32 and writes the result once, in the dtype the caller wants (fp32 gradients are not rounded to
bf16 on the way). It can add a tensor of the output's shape to the sums (the residual stream in the
forward, the residual's gradient in the backward), saving an elementwise pass over [X, O] fp32. Reference: the plain PyTorch sum of `ops/grouped_mm.py`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moeut.kernels.expert_mm import INTERPRET, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _sum_choices_kernel(
        y_ptr, init_ptr, out_ptr, X, C, O, syr, sir, sxr, INIT: tl.constexpr, BX: tl.constexpr, BO: tl.constexpr
    ):
        xs = tl.program_id(0) * BX + tl.arange(0, BX)
        os_ = tl.program_id(1) * BO + tl.arange(0, BO)
        mask = (xs < X)[:, None] & (os_ < O)[None, :]
        ptrs = y_ptr + (xs[:, None].to(tl.int64) * C) * syr + os_[None, :]
        acc = tl.zeros((BX, BO), dtype=tl.float32)
        for _ in range(0, C):
            acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            ptrs += syr
        if INIT:  # added after the choices, as `_sum_choices_torch` does
            acc += tl.load(init_ptr + xs[:, None].to(tl.int64) * sir + os_[None, :], mask=mask, other=0.0).to(
                tl.float32
            )
        tl.store(out_ptr + xs[:, None].to(tl.int64) * sxr + os_[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def sum_choices_triton(y_SO: Tensor, n_groups: int, out_dtype: torch.dtype, init_XO: Optional[Tensor] = None) -> Tensor:
    """init_XO (any float dtype, read as fp32): added to each sum before it is rounded, e.g. the residual
    stream, which then needs no add kernel of its own."""
    S, O = y_SO.shape
    out = torch.empty(n_groups, O, device=y_SO.device, dtype=out_dtype)
    if n_groups == 0 or O == 0:
        return out
    y_SO = y_SO if y_SO.stride(1) == 1 else y_SO.contiguous()
    if init_XO is not None and init_XO.stride(1) != 1:
        init_XO = init_XO.contiguous()
    C = S // n_groups
    BX, BO = (4, 16) if INTERPRET else (8, 256)
    grid = (triton.cdiv(n_groups, BX), triton.cdiv(O, BO))
    _sum_choices_kernel[grid](
        y_SO,
        y_SO if init_XO is None else init_XO,
        out,
        n_groups,
        C,
        O,
        y_SO.stride(0),
        0 if init_XO is None else init_XO.stride(0),
        out.stride(0),
        INIT=init_XO is not None,
        BX=BX,
        BO=BO,
        num_warps=4,
    )
    return out
