"""LayerNorm over the last dim that writes its output in the autocast dtype (one Triton kernel each way).

Under bf16 autocast, torch's LayerNorm reads the fp32 residual and writes fp32; the matmul after it
then makes a bf16 copy, and the backward turns the bf16 gradient back into fp32 before LayerNorm's own
backward, whose weight/bias-gradient reduction is a latency-bound kernel of its own. Here the forward writes the bf16 result directly (the same single rounding of the fp32
result), and the backward reads the bf16 gradient, writes dx in x's dtype and sums the weight and bias
gradients deterministically (`kernels/norm.py`).

With `input_copy` / `grad_copy` (MoEUT's LayerNorms, whose input is the raw residual that its experts
also read) the kernels write a low-precision copy of x (forward) or of dx (backward) as well, for the
expert projection that would cast it otherwise (`ops/cast_relay.py`).

`LayerNorm` is a `torch.nn.LayerNorm` (same parameters, state-dict keys, `isinstance`): the fused form
runs on CUDA for a 1-D `normalized_shape` with weight and bias, outside torch.compile (which fuses
LayerNorm itself); everything else, and `MOEUT_PYTORCH_OPS=norm`, is torch's. Without autocast the output
keeps x's dtype, as torch's does.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from moeut.ops import cast_relay
from moeut.ops.dispatch import use_fused

MAX_WIDTH = 16384  # the kernels hold a row in registers; wider rows take torch's LayerNorm


class _LayerNormFunction(torch.autograd.Function):
    """y = LayerNorm(x) in out_dtype; with pass_through, (y, x): x's gradient through the second output
    (its other uses) is added inside this backward's kernel, not by autograd's [R, D] add."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        eps: float,
        out_dtype: torch.dtype,
        pass_through: bool,
        input_copy: bool = False,
        grad_copy: bool = False,
    ):
        from moeut.kernels.norm import layer_norm_fwd

        copies = out_dtype != x.dtype and x.is_contiguous()
        y, mean, rstd, x_copy = layer_norm_fwd(
            x, weight, bias, eps, out_dtype, copy_dtype=out_dtype if copies and input_copy else None
        )
        if x_copy is not None:
            cast_relay.offer(x, x_copy)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: nothing to add
        ctx.grad_copy_dtype = out_dtype if copies and grad_copy else None
        return (y, x) if pass_through else y  # x as is: autograd makes it a view whose gradient comes here

    @staticmethod
    def backward(ctx, grad_y: Optional[Tensor], grad_x_out: Optional[Tensor] = None):
        from moeut.kernels.norm import layer_norm_bwd

        if grad_y is None:
            return grad_x_out, None, None, None, None, None, None, None
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db, dx_copy = layer_norm_bwd(
            grad_y, x, weight, mean, rstd, grad_add=grad_x_out, copy_dtype=ctx.grad_copy_dtype
        )
        if dx_copy is not None:
            cast_relay.offer(dx, dx_copy)
        return dx, dw, db, None, None, None, None, None


def layer_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float = 1e-5,
    pass_through: bool = False,
    input_copy: bool = False,
    grad_copy: bool = False,
):
    """F.layer_norm over the last dim with the Triton kernels; the output in the autocast dtype when
    autocast is on for x's device, else in x's dtype. With pass_through, (output, x): see
    `LayerNorm.normalize_and_pass`. With input_copy / grad_copy, and an output dtype other than x's,
    x / its gradient are also written in the output dtype and offered to `cast_relay`."""
    if torch.is_autocast_enabled(x.device.type):
        out_dtype = torch.get_autocast_dtype(x.device.type)
    else:
        out_dtype = x.dtype
    return _LayerNormFunction.apply(x, weight, bias, float(eps), out_dtype, pass_through, input_copy, grad_copy)


def _fused_applies(norm: torch.nn.LayerNorm, x: Tensor) -> bool:
    return (
        use_fused(x, "norm")
        and not torch.compiler.is_compiling()
        and len(norm.normalized_shape) == 1
        and norm.weight is not None
        and norm.bias is not None
        and x.dim() > 0
        and x.shape[-1] == norm.normalized_shape[0] <= MAX_WIDTH
    )


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm; `input_copy` / `grad_copy`: with the kernels under autocast, also offer a copy
    of the input / of its gradient in the autocast dtype to the op that casts it next (`cast_relay`)."""

    def __init__(self, *args, input_copy: bool = False, grad_copy: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.input_copy, self.grad_copy = input_copy, grad_copy

    def forward(self, x: Tensor) -> Tensor:
        if _fused_applies(self, x):
            return layer_norm(x, self.weight, self.bias, self.eps, input_copy=self.input_copy, grad_copy=self.grad_copy)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)  # (its shape errors too)

    def normalize_and_pass(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(LayerNorm(x), x), for a residual stream x that other ops read too: give them the second
        output. With the kernels, x's gradient through them is then added inside this LayerNorm's
        backward, one kernel instead of LayerNorm's dx and autograd's [R, D] fp32 add of x's gradients."""
        if _fused_applies(self, x):
            return layer_norm(
                x,
                self.weight,
                self.bias,
                self.eps,
                pass_through=True,
                input_copy=self.input_copy,
                grad_copy=self.grad_copy,
            )
        return self(x), x
