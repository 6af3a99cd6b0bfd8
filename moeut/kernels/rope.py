"""Triton kernel of `moeut::rope` (contract and reference in `rope.py`).

One program rotates BT positions of one (batch, head): it loads the two rotated halves and the
unrotated rest of each row, combines them in fp32 with the position's (cos, sin), and writes a
[B, H, T, Dh] result, times `scale` (the attention scale): contiguous, or (`time_major`) stored as
[B, T, H, Dh] and transposed. `inverse` rotates by -angle, which is the backward pass. `rope.py`
asks for time-major both ways when the forward's input is a head view of a [B, T, H * Dh]
projection, so that neither the attention output's reshape nor the view's backward copies.
Runs under `TRITON_INTERPRET=1` on CPU tensors (CI).
"""

from __future__ import annotations

import torch
from torch import Tensor

import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    H,
    T,
    HALF,
    REST,
    scale,
    sxb,
    sxh,
    sxt,
    sxd,
    sob,
    soh,
    sot,
    sct,
    sst,
    SIGN: tl.constexpr,
    HP: tl.constexpr,
    RP: tl.constexpr,
    BT: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    t = tl.program_id(1) * BT + tl.arange(0, BT)
    t_ok = t < T
    c = tl.arange(0, HP)
    c_ok = c < HALF
    m = t_ok[:, None] & c_ok[None, :]
    x_row = x_ptr + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + t[:, None].to(tl.int64) * sxt
    o_row = out_ptr + b.to(tl.int64) * sob + h.to(tl.int64) * soh + t[:, None].to(tl.int64) * sot
    x1 = tl.load(x_row + c[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + (c[None, :] + HALF) * sxd, mask=m, other=0.0).to(tl.float32)
    cs = scale * tl.load(cos_ptr + t[:, None] * sct + c[None, :], mask=m, other=0.0)
    sn = (SIGN * scale) * tl.load(sin_ptr + t[:, None] * sst + c[None, :], mask=m, other=0.0)
    tl.store(o_row + c[None, :], (x1 * cs - x2 * sn).to(out_ptr.dtype.element_ty), mask=m)
    tl.store(o_row + c[None, :] + HALF, (x2 * cs + x1 * sn).to(out_ptr.dtype.element_ty), mask=m)
    if RP > 0:
        r = tl.arange(0, RP)
        mr = t_ok[:, None] & (r < REST)[None, :]
        rest = tl.load(x_row + (r[None, :] + 2 * HALF) * sxd, mask=mr, other=0.0).to(tl.float32)
        tl.store(o_row + 2 * HALF + r[None, :], (rest * scale).to(out_ptr.dtype.element_ty), mask=mr)


def rope_triton(
    x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False, scale: float = 1.0, time_major: bool = False
) -> Tensor:
    B, H, T, D = x.shape
    n_rotate = 2 * cos.shape[-1]  # half-width tables: both halves use the same angles
    # [B, H, T, Dh], stored as [B, T, H, Dh] when time-major (the allocation `rope.empty_rope_output`
    # gives the op's fake tensor)
    out = (
        torch.empty(B, T, H, D, device=x.device, dtype=x.dtype).transpose(1, 2)
        if time_major
        else torch.empty(B, H, T, D, device=x.device, dtype=x.dtype)
    )
    if out.numel() == 0:
        return out
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    half, rest = n_rotate // 2, D - n_rotate
    BT = 16
    _rope_kernel[(B * H, triton.cdiv(T, BT))](
        x,
        cos,
        sin,
        out,
        H,
        T,
        half,
        rest,
        float(scale),
        *x.stride(),
        *out.stride()[:3],
        cos.stride(0),
        sin.stride(0),
        SIGN=-1.0 if inverse else 1.0,
        HP=max(16, triton.next_power_of_2(half)),
        RP=0 if rest == 0 else max(16, triton.next_power_of_2(rest)),
        BT=BT,
        num_warps=4,
    )
    return out
