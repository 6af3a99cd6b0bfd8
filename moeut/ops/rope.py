"""Rotary position embedding (RoPE) on the first `n_rotate` channels of each head.

    y[:half] = x[:half] * cos - x[half:n_rotate] * sin        (half = n_rotate / 2)
    y[half:n_rotate] = x[half:n_rotate] * cos + x[:half] * sin,    channels past n_rotate unchanged

computed in fp32 and rounded to x's dtype. `rotate_reference` is the plain PyTorch form (CPU, and the
reference). On CUDA, `rotate` is one Triton kernel per call (`moeut::rope`) instead of about eight
elementwise kernels with fp32 intermediates; its backward is the same kernel rotating by -angle.
Both write in the layout of a head view input (see `_Rope`). `MOEUT_PYTORCH_OPS=rope` turns
the kernel off.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from moeut.ops.dispatch import use_fused


_INV_FREQ: dict = {}


def _inv_freq(n_rotate: int, base: float, device) -> Tensor:
    """base^(-2i/n_rotate) for i < n_rotate/2, fp32; kept per (n_rotate, base, device) outside torch.compile."""
    key = (n_rotate, base, str(device))
    cached = None if torch.compiler.is_compiling() else _INV_FREQ.get(key)
    if cached is None:
        cached = 1.0 / (base ** (torch.arange(0, n_rotate, 2, device=device, dtype=torch.float32) / n_rotate))
        if not torch.compiler.is_compiling():
            _INV_FREQ[key] = cached
    return cached


def rope_tables(n_rotate: int, offset, T: int, base: float, device) -> Tuple[Tensor, Tensor]:
    """(cos, sin) [T, n_rotate / 2] in fp32 for positions offset..offset+T-1 (`offset` an int, or a
    tensor of the T positions); both halves of the rotated channels use the same angles. Computed
    once per attention call and shared by q and k."""
    if torch.is_tensor(offset):
        pos = offset.to(torch.float32)
    else:
        pos = torch.arange(offset, offset + T, device=device, dtype=torch.float32)
    freqs = pos[:, None] * _inv_freq(n_rotate, base, device)[None, :]
    return freqs.cos(), freqs.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_reference(x: Tensor, cos: Tensor, sin: Tensor, scale: float = 1.0) -> Tensor:
    """scale * RoPE(x) with the tables of `rope_tables` on x [B, H, T, Dh], plain PyTorch."""
    n_rotate = 2 * cos.shape[-1]
    cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    rot = x[..., :n_rotate].float()
    rot = rot * cos + rotate_half(rot) * sin
    rest = x[..., n_rotate:]
    if scale != 1.0:
        rot, rest = rot * scale, (rest.float() * scale).to(x.dtype)
    return torch.cat((rot.to(x.dtype), rest), dim=-1)


def empty_rope_output(x: Tensor, time_major: bool) -> Tensor:
    """An uninitialised [B, H, T, Dh] like x: contiguous, or stored as [B, T, H, Dh] and transposed."""
    B, H, T, D = x.shape
    if time_major:
        return torch.empty(B, T, H, D, device=x.device, dtype=x.dtype).transpose(1, 2)
    return torch.empty(B, H, T, D, device=x.device, dtype=x.dtype)


def is_time_major(x: Tensor) -> bool:
    """Whether x [B, H, T, Dh] is a head view of a [B, T, H * Dh] projection (heads inside positions)."""
    return x.shape[1] > 1 and x.shape[2] > 1 and x.stride(1) < x.stride(2)


@torch.library.custom_op("moeut::rope", mutates_args=())
def _rope_op(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool, scale: float, time_major: bool) -> Tensor:
    if use_fused(x, "rope"):
        from moeut.kernels.rope import rope_triton

        return rope_triton(x, cos, sin, inverse, scale, time_major)
    return empty_rope_output(x, time_major).copy_(rotate_reference(x, cos, -sin if inverse else sin, scale))


@_rope_op.register_fake
def _(x, cos, sin, inverse, scale, time_major):
    return empty_rope_output(x, time_major)


# Where x is a head view of a projection (q and k in training), the kernel writes its output and its
# gradient in x's layout, [B, T, H, Dh] storage: cuDNN's attention then returns its output and q's and
# k's gradients in that layout too (it matches q's), so neither the output projection's reshape nor
# the head view's backward copies anything (two strided copies per layer application saved). Other
# inputs keep the contiguous [B, H, T, Dh] layout.


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, scale):
        ctx.save_for_backward(cos, sin)
        ctx.scale = scale
        ctx.time_major = is_time_major(x)
        return _rope_op(x, cos, sin, False, scale, ctx.time_major)

    @staticmethod
    def backward(ctx, grad_y):  # rotation and scaling commute: the adjoint is scale * rotation by -angle
        cos, sin = ctx.saved_tensors
        return _rope_op(grad_y, cos, sin, True, ctx.scale, ctx.time_major), None, None, None


def rotate(x: Tensor, cos: Tensor, sin: Tensor, scale: float = 1.0) -> Tensor:
    """scale * RoPE(x) with the tables of `rope_tables` on x [B, H, T, Dh]; one kernel on CUDA (the
    attention scale rides along for free)."""
    if not use_fused(x, "rope"):
        return rotate_reference(x, cos, sin, scale)
    return _Rope.apply(x, cos, sin, float(scale))
