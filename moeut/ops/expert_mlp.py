"""The σ-MoE expert MLP as one autograd Function: up projection, ReLU, gated down projection, top-k sum.

    out[r] = sum_k gate[r, k] * relu(x[r] @ W1[e_rk]) @ W2[e_rk]      (+ x[r] with `residual`)

It computes exactly what `expert_mm_combine(relu(expert_mm(x, W1, routing)), W2, routing, gate)`
computes, with the same kernels, and two elementwise passes fewer per application: the ReLU runs in
the up projection's epilogue, and its backward (zero the gradient where h = 0) rides on the pass
that already reads h and the gradient of h: the row dot that gives the gates' gradient. Composing
the two operators cannot do that: the combine does not know that its input is a ReLU's output.
With `residual` (MoEUT's FFN block, x + FFN(x)) the top-k sum also adds x, and in the backward the
sum of the K input gradients also adds the output's gradient: two [R, D] fp32 add kernels fewer.

Shape suffixes follow the package legend (`moeut/__init__.py`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moeut.ops import cast_relay
from moeut.ops.expert_mm import Routing, compute_dtype, kernel_operand, shared_weight_operand
from moeut.ops.grouped_mm import sum_choices_in, grouped_mm, row_dot
from moeut.ops.shared_weights import GradSink, weight_grad

__all__ = ["expert_mlp"]


class _ExpertMLP(torch.autograd.Function):
    """Inputs of higher precision than `dtype` (the fp32 residual and parameters under autocast) are
    rounded in forward and again in backward, as in `expert_mm._ExpertMM`. Saved: x and the weights
    (alive anyway), h [N, S] (needed by the down projection's weight gradient) and the routing."""

    @staticmethod
    def forward(
        ctx,
        x_RD: Tensor,
        w1_master: Tensor,
        w2_master: Tensor,
        gate_RK: Tensor,
        offsets_E1: Tensor,
        rows_N: Tensor,
        slot_N: Tensor,
        dtype: torch.dtype,
        sink1: Optional[GradSink],
        sink2: Optional[GradSink],
        residual: bool,
    ) -> Tensor:
        h_NF = grouped_mm(
            kernel_operand(x_RD, dtype),
            kernel_operand(w1_master, dtype, weight=True),
            offsets_E1,
            rows_N,
            None,
            None,
            relu=True,
        )
        out_SD = grouped_mm(
            h_NF,
            kernel_operand(w2_master, dtype, weight=True),
            offsets_E1,
            None,
            gate_RK.reshape(-1),
            slot_N,
            scale_at_dst=True,
        )
        ctx.save_for_backward(x_RD, w1_master, w2_master, gate_RK, h_NF, offsets_E1, rows_N, slot_N)
        ctx.dtype, ctx.sinks, ctx.residual = dtype, (sink1, sink2), residual
        if residual:
            return sum_choices_in(out_SD, gate_RK.shape[0], x_RD.dtype, init_XO=x_RD)
        return sum_choices_in(out_SD, gate_RK.shape[0])

    @staticmethod
    def backward(ctx, grad_RD: Tensor):
        x_master, w1_master, w2_master, gate_RK, h_NF, offsets_E1, rows_N, slot_N = ctx.saved_tensors
        sink1, sink2 = ctx.sinks
        dtype = ctx.dtype
        x_RD = kernel_operand(x_master, dtype)
        w1, w2 = kernel_operand(w1_master, dtype, weight=True), kernel_operand(w2_master, dtype, weight=True)
        R, K = gate_RK.shape
        grad_out_RD = grad_RD if ctx.residual else None  # x's gradient through the residual path
        grad_RD = cast_relay.cast(grad_RD, dtype).contiguous()  # (the next LayerNorm's copy, when it wrote one)
        group_N = rows_N  # the FFN's output row of routed row n is its input row
        dot_gate, dot_dst = gate_RK.reshape(-1), slot_N  # the gate gradient in (row, choice) order

        # Down projection: d h (unscaled) from d out, then the gate gradient <d h, h> and the
        # gradient of the ReLU's input, gate * d h where h > 0, in one pass over d h and h; that pass
        # also writes gate * h, the down projection's weight-gradient operand, so that the weight-gradient
        # kernel needs no gate in its K loop.
        gate_w2 = ctx.needs_input_grad[2]
        grad_h_NF = grouped_mm(grad_RD, w2.transpose(1, 2), offsets_E1, group_N, None, None)
        grad_gate_S, grad_pre_NF, h_gated_NF = row_dot(
            grad_h_NF, h_NF, None, dot_gate, dot_dst, relu_mask=True, gate_b=gate_w2
        )
        grad_gate = grad_gate_S.view(R, K).to(gate_RK.dtype)
        grad_w2 = grad_w1 = grad_x = None
        if gate_w2:
            grad_w2 = weight_grad(sink2, h_gated_NF, grad_RD, offsets_E1, None, group_N, None, w2_master.dtype)
        # Up projection: d x (written in (row, choice) order and summed over the K choices), d W1.
        if ctx.needs_input_grad[0]:
            grad_x = sum_choices_in(
                grouped_mm(grad_pre_NF, w1.transpose(1, 2), offsets_E1, None, None, slot_N),
                R,
                x_master.dtype,
                init_XO=grad_out_RD,
            )
        if ctx.needs_input_grad[1]:
            grad_w1 = weight_grad(sink1, x_RD, grad_pre_NF, offsets_E1, rows_N, None, None, w1_master.dtype)
        return grad_x, grad_w1, grad_w2, grad_gate, None, None, None, None, None, None, None


def expert_mlp(
    x_RD: Tensor, w1_EDF: Tensor, w2_EFD: Tensor, routing: Routing, gate_RK: Tensor, residual: bool = False
) -> Tensor:
    """[R, D]: sum over each row's K chosen experts of gate * relu(x @ W1[e]) @ W2[e]; with `residual`,
    x plus that sum, in x's dtype (the sum is not rounded to the compute dtype first). Under autocast
    the products are computed in the autocast dtype, like `F.linear`."""
    dtype = compute_dtype(x_RD, w1_EDF)
    if residual and w2_EFD.shape[2] != x_RD.shape[1]:
        raise ValueError(
            f"expert_mlp: residual needs an output as wide as the input ({x_RD.shape[1]}), "
            f"the experts give {w2_EFD.shape[2]}"
        )
    if gate_RK.numel() != routing.slot_N.numel() or gate_RK.shape[0] != x_RD.shape[0]:
        raise ValueError(
            f"expert_mlp: gates of shape {tuple(gate_RK.shape)} for {x_RD.shape[0]} rows and "
            f"{routing.slot_N.numel()} routed rows"
        )
    w1, sink1 = shared_weight_operand(w1_EDF, dtype)
    w2, sink2 = shared_weight_operand(w2_EFD, dtype)
    return _ExpertMLP.apply(
        x_RD.contiguous(),
        w1,
        w2,
        gate_RK,
        routing.offsets_E1,
        routing.rows_N,
        routing.slot_N,
        dtype,
        sink1,
        sink2,
        residual,
    )
