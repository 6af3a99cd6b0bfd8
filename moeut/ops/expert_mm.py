"""Conditional (per-expert) matrix multiplication: routing, and the autograd Functions of every MoE projection.

Shape suffixes follow the package legend (`moeut/__init__.py`).

A routing (`Routing`, built once per layer application by `route`) sorts the R*K choices by expert.
Every projection then reads its rows in that order, so one expert's rows are contiguous and each
expert's product is one dense matmul over a segment. One primitive (`grouped_mm.grouped_mm`) does
all the work:

    grouped_mm(x, w, offsets, rows, scale, dst):  out[dst[n]] = scale[n] * (x[rows[n]] @ w[expert of n])
    (with scale_at_dst, the scale is read as scale[dst[n]]: a gate tensor in (row, choice) order)

`rows` gathers input rows (None: x is already in routed order), `scale` multiplies a row in fp32
before rounding (the router gate), `dst` scatters the result to (row, choice) order, where a
top-k sum is a contiguous `[X, C, O].sum(1)`. So neither the forward combine nor any backward pass
materialises a gathered or gate-scaled [N, D] copy, and no sum needs atomics: results are
bit-reproducible.

The operators themselves (and their plain-PyTorch forms) are in `ops/grouped_mm.py`, their Triton kernels
in `kernels/expert_mm.py` and `kernels/weight_grad.py`; this file composes them into `expert_mm` and
`expert_mm_combine` with their backward passes (the FFN's whole expert MLP is `ops/expert_mlp.py`). The
naive ground truths tests compare both implementations with are in `reference.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from moeut.ops import cast_relay
from moeut.ops.grouped_mm import grouped_mm, grouped_mm_dot, in_accumulation_dtype, row_dot, sum_choices_in
from moeut.ops.dispatch import use_fused
from moeut.ops.shared_weights import GradSink, shared_operand, weight_grad

__all__ = ["Routing", "route", "expert_mm", "expert_mm_combine", "combine", "row_dot"]


@dataclass
class Routing:
    """Where each top-k choice goes once choices are sorted by expert."""

    offsets_E1: Tensor  # int64 [E+1]: expert e owns routed rows offsets[e]:offsets[e+1]
    rows_N: Tensor  # int64 [N]: the input row each routed row reads (= slot_N // K)
    slot_N: Tensor  # int64 [N]: flat (row, choice) index r*K + k of each routed row (the sort order)
    # int64 [R, K]: routed position of choice k of row r (the inverse of slot_N). Only references and
    # tests read it, so the sort path computes it on first use (two launches fewer per routing).
    _choice_RK: Optional[Tensor] = None
    k: int = 0  # choices per row (for computing choice_RK)

    @property
    def choice_RK(self) -> Tensor:
        if self._choice_RK is None:
            N = self.slot_N.numel()
            inverse = torch.empty_like(self.slot_N).scatter_(0, self.slot_N, torch.arange(N, device=self.slot_N.device))
            self._choice_RK = inverse.view(-1, self.k)
        return self._choice_RK


def _route_kernel_applies(expert_RK: Tensor, n_experts: int) -> bool:
    if not use_fused(expert_RK, "route"):
        return False
    from moeut.kernels.route import MAX_EXPERTS, MAX_N

    return expert_RK.numel() <= MAX_N and n_experts <= MAX_EXPERTS


@torch.library.custom_op("moeut::route_small", mutates_args=())
def route_small(expert_RK: Tensor, n_experts: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """`route` in one Triton kernel (CUDA, small inputs): (offsets, rows, slot, choice)."""
    from moeut.kernels.route import route_small_triton

    return route_small_triton(expert_RK, n_experts)


@route_small.register_fake
def _(expert_RK, n_experts):
    N = expert_RK.numel()
    new = lambda *shape: expert_RK.new_empty(*shape, dtype=torch.long)
    return new(n_experts + 1), new(N), new(N), new(*expert_RK.shape)


def route(expert_RK: Tensor, n_experts: int) -> Routing:
    """Sort the (row, choice) pairs by expert. Stable, so ties keep row order (deterministic).

    Small inputs on CUDA (decoding) take one Triton kernel (`kernels/route.py`, MOEUT_PYTORCH_OPS=route
    turns it off); the rest sort with torch.
    """
    K = expert_RK.shape[1]
    if _route_kernel_applies(expert_RK, n_experts):
        return Routing(*route_small(expert_RK, n_experts))
    # The narrowest key type that holds every id: a GPU radix sort makes one pass per key byte
    # (2 for int16, 8 for int64).
    key_dtype = torch.int16 if n_experts < 2**15 else torch.int32
    flat_N = expert_RK.reshape(-1).to(key_dtype)
    sorted_N, slot_N = torch.sort(flat_N, stable=True)
    # Expert e's rows start at the number of choices below e. A fixed output size (E + 1) keeps
    # torch.compile free of graph breaks, and it costs two small kernels.
    offsets_E1 = torch.searchsorted(sorted_N, torch.arange(n_experts + 1, device=flat_N.device, dtype=key_dtype))
    return Routing(offsets_E1, slot_N // K, slot_N, k=K)


def combine(y_NO: Tensor, choice_XC: Tensor, gate_XC: Tensor) -> Tensor:
    """Gate-weighted sum of routed rows: out[x] = sum_c gate[x, c] * y[choice[x, c]]  -> [X, O].

    The plain (unfused) form of what `expert_mm_combine` computes; the tests' reference for it.
    """
    y_XCO = y_NO[choice_XC]
    return (gate_XC.to(y_XCO.dtype).unsqueeze(1) @ y_XCO).squeeze(1)


def kernel_operand(t: Tensor, dtype: torch.dtype, weight: bool = False) -> Tensor:
    """An input or weight as the kernels take it: in `dtype` (a shared MoEUT layer's fp32 weights are
    cast at each application, forward and backward), cast straight into a padded buffer when its rows
    are misaligned for the kernels (MoEUT_44M: one copy instead of a cast and a padded copy). Weights
    are cast before the kernels, never inside them: an fp32 operand breaks their bf16 pipelining."""
    if t.dtype != dtype and not weight:
        copy = cast_relay.take(t, dtype)  # written by the LayerNorm that read t (MoEUT's residual)
        if copy is not None:
            return copy
    if t.dtype == dtype or not use_fused(t) or torch.compiler.is_compiling():  # (no data_ptr under compile)
        return t.to(dtype)
    from moeut.kernels.expert_mm import aligned

    return aligned(t, copy_dtype=dtype, always_copy=True)


def routed_gates(gate_S: Tensor, slot_N: Tensor) -> Tensor:
    """Routed row n's gate at n: a permuted fp32 copy of the (group, choice)-ordered gates, for the
    backward kernels that scale by the gate inside their K loop (reading it through slot[n] there
    would put an indirect load in the loop)."""
    return in_accumulation_dtype(gate_S).index_select(0, slot_N)


class _ExpertMM(torch.autograd.Function):
    """y[n] = x[rows[n]] @ w[expert of n] in `dtype`, in routed order.

    x and w may be stored in higher precision than `dtype` (fp32 residual and parameters under bf16
    autocast). They are rounded inside forward and again inside backward instead of being saved as
    rounded copies: a shared MoEUT layer is applied n_layers/group_size times per step, and a
    saved bf16 copy of its expert weights per application cost 4 GiB at 244M; the fp32 input is
    kept alive by the LayerNorm next to it anyway. The weight gradient comes out of the kernel in
    the weight's own dtype, accumulated in fp32.
    """

    @staticmethod
    def forward(ctx, x_RI, w_master, offsets_E1, rows_N, slot_N, dtype, sink):
        ctx.save_for_backward(x_RI, w_master, offsets_E1, rows_N, slot_N)
        ctx.dtype, ctx.sink = dtype, sink
        return grouped_mm(
            kernel_operand(x_RI, dtype), kernel_operand(w_master, dtype, weight=True), offsets_E1, rows_N, None, None
        )

    @staticmethod
    def backward(ctx, grad_NO):
        x_master, w_master, offsets_E1, rows_N, slot_N = ctx.saved_tensors
        x_RI, w_EIO = kernel_operand(x_master, ctx.dtype), kernel_operand(w_master, ctx.dtype, weight=True)
        grad_NO = grad_NO.to(ctx.dtype).contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            if rows_N is None:
                grad_x = grouped_mm(grad_NO, w_EIO.transpose(1, 2), offsets_E1, None, None, None)
            else:  # written in (row, choice) order, so summing a row's K copies is contiguous
                grad_x = sum_choices_in(
                    grouped_mm(grad_NO, w_EIO.transpose(1, 2), offsets_E1, None, None, slot_N),
                    x_RI.shape[0],
                    x_master.dtype,
                )
            grad_x = grad_x.to(x_master.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(ctx.sink, x_RI, grad_NO, offsets_E1, rows_N, None, None, w_master.dtype)
        return grad_x, grad_w, None, None, None, None, None


class ResidualGradRelay:
    """Carries a residual's gradient from one combine's backward to another's, when the residual is also
    the other combine's input (SwitchHead: x feeds the value projection, and x + attention is summed
    inside the output projection). The output combine puts d out here instead of returning it for
    the residual; the value combine's backward, which autograd runs later (its output feeds the
    output combine), adds it inside its own top-k sum. x's two gradients are then summed with no
    [R, D] fp32 add kernel of their own (autograd's add of x's gradients, 45 µs per application at 244M)."""

    def __init__(self):
        self._grad: Optional[Tensor] = None

    def put(self, grad: Tensor) -> None:
        self._grad = grad

    def take(self) -> Tensor:
        grad, self._grad = self._grad, None
        if grad is None:
            raise RuntimeError(
                "ResidualGradRelay: the receiving combine's backward ran before the sending "
                "one's; the residual must feed the receiver and come after it"
            )
        return grad


class _ExpertMMCombine(torch.autograd.Function):
    """out[x] = sum_c gate[x, c] * (x_in[rows[n]] @ w[expert of n]) with n = choice[x, c].

    The forward writes gate-scaled rows in (group, choice) order and sums them; nothing of size
    [N, O] is saved. The backward gathers output-gradient rows inside the kernels (never as a copy)
    and gets the gate gradient <d out[x], y_n> from whichever side of the projection is narrower:
    the unscaled input gradient (I <= O, e.g. the FFN's down projection) or a recomputed y (I > O,
    e.g. SwitchHead's value projection). Inputs of higher precision than `dtype`: as in `_ExpertMM`.
    """

    @staticmethod
    def forward(
        ctx,
        x_RI,
        w_master,
        gate_XC,
        offsets_E1,
        rows_N,
        slot_N,
        dtype,
        sink,
        residual_XO,
        send_grad: Optional[ResidualGradRelay],
        receive_grad: Optional[ResidualGradRelay],
    ):
        # The gates are read in (group, choice) order at each row's destination: no permuted copy.
        out_SO = grouped_mm(
            kernel_operand(x_RI, dtype),
            kernel_operand(w_master, dtype, weight=True),
            offsets_E1,
            rows_N,
            gate_XC.reshape(-1),
            slot_N,
            scale_at_dst=True,
        )
        ctx.save_for_backward(x_RI, w_master, gate_XC, offsets_E1, rows_N, slot_N)
        ctx.dtype, ctx.sink, ctx.send_grad, ctx.receive_grad = dtype, sink, send_grad, receive_grad
        if residual_XO is not None:  # residual + the sums, in the residual's dtype, rounded once
            return sum_choices_in(out_SO, gate_XC.shape[0], residual_XO.dtype, init_XO=residual_XO)
        return sum_choices_in(out_SO, gate_XC.shape[0])

    @staticmethod
    def backward(ctx, grad_XO):
        x_master, w_master, gate_XC, offsets_E1, rows_N, slot_N = ctx.saved_tensors
        grad_residual = grad_XO if ctx.needs_input_grad[8] else None
        if grad_residual is not None and ctx.send_grad is not None:
            ctx.send_grad.put(grad_residual)  # summed into the receiving combine's input gradient instead
            grad_residual = None
        received = ctx.receive_grad.take() if ctx.receive_grad is not None and ctx.needs_input_grad[0] else None
        x_RI, w_EIO = kernel_operand(x_master, ctx.dtype), kernel_operand(w_master, ctx.dtype, weight=True)
        X, C = gate_XC.shape
        I, O = w_EIO.shape[1], w_EIO.shape[2]
        grad_XO = cast_relay.cast(grad_XO, x_RI.dtype).contiguous()  # (the LayerNorm's copy, when it wrote one)
        group_N = slot_N // C  # the output row each routed row adds into
        # The kernels that compute the gate gradient read the gates, and write their gradient, at slot[n]:
        # (group, choice) order, with no permuting copy.
        dot_gate, dot_dst = gate_XC.reshape(-1), slot_N
        w_T = w_EIO.transpose(1, 2)
        grad_x = None
        # The weight gradient's operands, one of them gated (x_n or d out_n times routed row n's gate) when
        # a pass below that reads the operand anyway writes that copy; else the weight-gradient kernel
        # gates in its K loop, where the operand goes through registers before the tensor-core product.
        gate_w = ctx.needs_input_grad[1]
        wgrad_x, wgrad_rows, wgrad_grad, wgrad_grad_rows = x_RI, rows_N, grad_XO, group_N
        wgrad_gated = False
        if I <= O:
            grad_in_NI = grouped_mm(grad_XO, w_T, offsets_E1, group_N, None, None)
            # the scaled rows (d x per choice) go straight to (row, choice) order when they are to be summed
            grad_gate_S, grad_x_NI, gated = row_dot(
                grad_in_NI,
                x_RI,
                rows_N,
                dot_gate if ctx.needs_input_grad[0] or gate_w else None,
                dot_dst,
                scaled_dst=slot_N if rows_N is not None else None,
                gate_b=gate_w,
            )
            if gate_w:  # x_n * gate_n, routed order
                wgrad_x, wgrad_rows, wgrad_gated = gated, None, True
            if ctx.needs_input_grad[0]:
                grad_x = (
                    grad_x_NI
                    if rows_N is None
                    else sum_choices_in(grad_x_NI, x_RI.shape[0], x_master.dtype, init_XO=received)
                )
        elif ctx.needs_input_grad[0] and rows_N is not None:
            # the gate gradient <d out, x W> as <d out W^T, x>, from the input gradient's product
            gate, at_dst = (dot_gate, True) if gate_w else (routed_gates(dot_gate, slot_N), False)
            grad_x_SI, grad_gate_S, gated = grouped_mm_dot(
                grad_XO, w_T, offsets_E1, group_N, gate, slot_N, at_dst, x_RI, rows_N, dot_dst, gate_x=gate_w
            )
            if gate_w:  # d out_n * gate_n, routed order
                wgrad_grad, wgrad_grad_rows, wgrad_gated = gated, None, True
            grad_x = sum_choices_in(grad_x_SI, x_RI.shape[0], x_master.dtype, init_XO=received)
        else:  # the gate gradient from the recomputed forward product (routed input rows, or no dx)
            gate_n = routed_gates(gate_XC.reshape(-1), slot_N)
            y_NO = grouped_mm(x_RI, w_EIO, offsets_E1, rows_N, None, None)
            grad_gate_S = row_dot(y_NO, grad_XO, group_N, None, dot_dst)[0]
            if ctx.needs_input_grad[0]:
                if rows_N is None:
                    grad_x = grouped_mm(grad_XO, w_T, offsets_E1, group_N, gate_n, None)
                else:
                    grad_x = sum_choices_in(
                        grouped_mm(grad_XO, w_T, offsets_E1, group_N, gate_n, slot_N),
                        x_RI.shape[0],
                        x_master.dtype,
                        init_XO=received,
                    )
        grad_gate = grad_gate_S.view(X, C).to(gate_XC.dtype)
        grad_w = None
        if ctx.needs_input_grad[1] and wgrad_gated:
            grad_w = weight_grad(
                ctx.sink, wgrad_x, wgrad_grad, offsets_E1, wgrad_rows, wgrad_grad_rows, None, w_master.dtype
            )
        elif ctx.needs_input_grad[1]:
            grad_w = weight_grad(
                ctx.sink,
                x_RI,
                grad_XO,
                offsets_E1,
                rows_N,
                group_N,
                routed_gates(gate_XC.reshape(-1), slot_N),
                w_master.dtype,
            )
        if grad_x is not None:
            grad_x = grad_x.to(x_master.dtype)
            if received is not None and rows_N is None:  # (routed inputs got it inside their top-k sum)
                grad_x = grad_x + received
        return grad_x, grad_w, grad_gate, None, None, None, None, None, grad_residual, None, None


def compute_dtype(x: Tensor, w: Tensor) -> torch.dtype:
    """Custom ops are not autocast by PyTorch: compute in the autocast dtype when autocast is on (like
    F.linear; the operands are rounded inside the autograd Functions), else x and w must agree."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    if x.dtype != w.dtype:
        raise TypeError(f"expert_mm: input dtype {x.dtype} differs from weight dtype {w.dtype}")
    return x.dtype


def shared_weight_operand(w_EIO: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Optional[GradSink]]:
    """The forward pass's shared copy of w and its gradient sink inside `share_weights`, else w itself."""
    shared, sink = shared_operand(w_EIO, dtype)
    return (w_EIO, None) if shared is None else (shared, sink)


def expert_mm(x_RI: Tensor, w_EIO: Tensor, routing: Routing, gather: bool = True) -> Tensor:
    """Routed rows [N, O]: row n is x[rows[n]] @ w[expert of n] (gather=False: x is already routed).

    Under autocast the product is computed in the autocast dtype, like `F.linear`.
    """
    dtype = compute_dtype(x_RI, w_EIO)
    w_EIO, sink = shared_weight_operand(w_EIO, dtype)
    rows = routing.rows_N if gather else None
    return _ExpertMM.apply(x_RI.contiguous(), w_EIO, routing.offsets_E1, rows, routing.slot_N, dtype, sink)


def expert_mm_combine(
    x_RI: Tensor,
    w_EIO: Tensor,
    routing: Routing,
    gate_XC: Tensor,
    gather: bool = True,
    residual_XO: Optional[Tensor] = None,
    send_residual_grad: Optional[ResidualGradRelay] = None,
    receive_grad: Optional[ResidualGradRelay] = None,
) -> Tensor:
    """`combine(expert_mm(x, w, routing, gather), choice, gate)`, fused: [X, O] with the grouping of
    the choices given by `gate_XC`'s shape (group x holds flat choices x*C .. x*C + C-1). With
    `residual_XO` it returns residual + that, in the residual's dtype: the add happens inside the top-k
    sum, before any rounding (a residual block's add, with no kernel of its own).

    `send_residual_grad` (with `residual_XO`): the residual's gradient goes to this relay, not to the
    residual; `receive_grad`: the relay's gradient is added to x's (see `ResidualGradRelay`). The
    caller guarantees that the residual is x of the receiving combine."""
    dtype = compute_dtype(x_RI, w_EIO)
    if gate_XC.numel() != routing.slot_N.numel():
        raise ValueError(f"expert_mm_combine: {gate_XC.numel()} gates for {routing.slot_N.numel()} routed rows")
    if residual_XO is not None and tuple(residual_XO.shape) != (gate_XC.shape[0], w_EIO.shape[2]):
        raise ValueError(
            f"expert_mm_combine: residual of shape {tuple(residual_XO.shape)} for an output of shape "
            f"{(gate_XC.shape[0], w_EIO.shape[2])}"
        )
    if send_residual_grad is not None and residual_XO is None:
        raise ValueError("expert_mm_combine: send_residual_grad needs residual_XO")
    w_EIO, sink = shared_weight_operand(w_EIO, dtype)
    rows = routing.rows_N if gather else None
    return _ExpertMMCombine.apply(
        x_RI.contiguous(),
        w_EIO,
        gate_XC,
        routing.offsets_E1,
        rows,
        routing.slot_N,
        dtype,
        sink,
        residual_XO,
        send_residual_grad,
        receive_grad,
    )
