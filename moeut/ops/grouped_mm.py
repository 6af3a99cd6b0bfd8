"""The `moeut::` custom operators behind every MoE projection, each with its plain-PyTorch form.

    grouped_mm(x, w, offsets, rows, scale, dst):  out[dst[n]] = scale[n] * (x[rows[n]] @ w[expert of n])
    grouped_mm_dot:  the same, plus a row dot taken in its epilogue (a gate gradient)
    grouped_mm_weight_grad(_add):  per-expert sum of x_n^T g_n (optionally into an accumulator)
    row_dot, sum_choices:  the small passes around the products

Shape suffixes follow the package legend (`moeut/__init__.py`). The operators are plain functions of tensors (no autograd), so
torch.compile sees them as opaque nodes with known output shapes; the autograd Functions in
`ops/expert_mm.py` and `ops/expert_mlp.py` compose them.

Two implementations sit behind each operator: the plain-PyTorch one here (one matmul per expert
segment; CPU, and the reference) and the Triton one in `kernels/expert_mm.py` and
`kernels/weight_grad.py` (CUDA, `use_fused`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from moeut.ops.dispatch import use_fused


def _check(x: Tensor, w: Tensor, offsets: Tensor) -> None:
    torch._check(x.dim() == 2, lambda: f"expert_mm: x must be 2-D [rows, in], got {tuple(x.shape)}")
    torch._check(w.dim() == 3, lambda: f"expert_mm: weight must be 3-D [experts, in, out], got {tuple(w.shape)}")
    torch._check(
        x.shape[1] == w.shape[1], lambda: f"expert_mm: x has {x.shape[1]} columns, weight expects {w.shape[1]}"
    )
    torch._check(offsets.numel() == w.shape[0] + 1, lambda: "expert_mm: offsets must have n_experts + 1 entries")
    torch._check(
        x.dtype == w.dtype or (w.dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16)),
        lambda: f"expert_mm: x is {x.dtype} but weight is {w.dtype} (a weight may only be fp32 for bf16 / fp16 inputs)",
    )


def in_accumulation_dtype(t: Tensor) -> Tensor:
    """t in its accumulation precision: fp32, or fp64 for fp64 inputs."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _scale_rows(t_NO: Tensor, scale_N: Tensor) -> Tensor:
    return (in_accumulation_dtype(t_NO) * in_accumulation_dtype(scale_N).unsqueeze(1)).to(t_NO.dtype)


def _routed_count(x: Tensor, rows: Optional[Tensor]) -> int:
    return x.shape[0] if rows is None else rows.shape[0]


# ---------------------------------------------------------------------------------------------
# Plain-PyTorch implementation (CPU and any device without Triton).
# ---------------------------------------------------------------------------------------------


def _segments(offsets_E1: Tensor):
    bounds = offsets_E1.tolist()
    for e in range(len(bounds) - 1):
        if bounds[e + 1] > bounds[e]:
            yield e, bounds[e], bounds[e + 1]


def grouped_mm_reference(
    x_RI: Tensor,
    w_EIO: Tensor,
    offsets_E1: Tensor,
    rows_N: Optional[Tensor],
    scale_N: Optional[Tensor] = None,
    dst_N: Optional[Tensor] = None,
    scale_at_dst: bool = False,
    relu: bool = False,
) -> Tensor:
    x_NI = x_RI if rows_N is None else x_RI.index_select(0, rows_N)
    w_EIO = w_EIO.to(x_NI.dtype)
    out_NO = x_NI.new_empty(x_NI.shape[0], w_EIO.shape[2])
    for e, lo, hi in _segments(offsets_E1):
        torch.mm(x_NI[lo:hi], w_EIO[e], out=out_NO[lo:hi])
    if relu:
        out_NO.relu_()
    if scale_N is not None:
        out_NO = _scale_rows(out_NO, scale_N.index_select(0, dst_N) if scale_at_dst else scale_N)
    if dst_N is not None:
        out_NO = torch.empty_like(out_NO).index_copy_(0, dst_N, out_NO)
    return out_NO


# A gated weight gradient, sum_n x_n^T (s_n g_n) = sum_n (s_n x_n)^T g_n, scales the input rows x_n (in
# fp32, rounded to x's dtype): on Hopper the kernel's left operand may come from registers while its
# right one is staged in shared memory, so scaling x costs no extra pass through shared memory.


def weight_grad_reference(
    x_RI: Tensor,
    grad_MO: Tensor,
    offsets_E1: Tensor,
    rows_N: Optional[Tensor],
    grad_rows_N: Optional[Tensor] = None,
    grad_scale_N: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    scale_dst_N: Optional[Tensor] = None,
) -> Tensor:
    x_NI = x_RI if rows_N is None else x_RI.index_select(0, rows_N)
    g_NO = grad_MO if grad_rows_N is None else grad_MO.index_select(0, grad_rows_N)
    if grad_scale_N is not None and scale_dst_N is not None:
        grad_scale_N = grad_scale_N.index_select(0, scale_dst_N)
    if grad_scale_N is not None:
        x_NI = _scale_rows(x_NI, grad_scale_N)
    out_dtype = out_dtype or x_RI.dtype
    if out_dtype != x_NI.dtype:  # accumulate in the output precision (the kernel accumulates in fp32)
        x_NI, g_NO = x_NI.to(out_dtype), g_NO.to(out_dtype)
    E = offsets_E1.numel() - 1
    grad_EIO = g_NO.new_zeros(E, x_RI.shape[1], g_NO.shape[1])
    for e, lo, hi in _segments(offsets_E1):
        torch.mm(x_NI[lo:hi].t(), g_NO[lo:hi], out=grad_EIO[e])
    return grad_EIO


# ---------------------------------------------------------------------------------------------
# The operators: plain functions of tensors (no autograd), so torch.compile sees them as opaque
# nodes with known output shapes. Autograd is defined by the two Functions below.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("moeut::grouped_mm", mutates_args=())
def grouped_mm(
    x: Tensor,
    weight: Tensor,
    offsets: Tensor,
    rows: Optional[Tensor],
    scale: Optional[Tensor],
    dst: Optional[Tensor],
    scale_at_dst: bool = False,
    relu: bool = False,
) -> Tensor:
    """[N, O]: out[dst[n]] = scale[n] * act(x[rows[n]] @ weight[expert of n]); None skips a step, act is
    ReLU with `relu`, else the identity. scale_at_dst: the scale of routed row n is scale[dst[n]] (needs
    dst). An fp32 weight with bf16 / fp16 x is rounded to x's dtype first (the Triton kernel rounds
    each tile as it loads it: no copy)."""
    _check(x, weight, offsets)
    torch._check(not scale_at_dst or dst is not None, lambda: "grouped_mm: scale_at_dst needs dst")
    if use_fused(x):
        from moeut.kernels.expert_mm import grouped_mm_triton

        return grouped_mm_triton(x, weight, offsets, rows, scale, dst, scale_at_dst, relu)
    return grouped_mm_reference(x, weight, offsets, rows, scale, dst, scale_at_dst, relu)


@grouped_mm.register_fake
def _(x, weight, offsets, rows, scale, dst, scale_at_dst=False, relu=False):
    return x.new_empty(_routed_count(x, rows), weight.shape[2])


@torch.library.custom_op("moeut::grouped_mm_dot", mutates_args=())
def grouped_mm_dot(
    x: Tensor,
    weight: Tensor,
    offsets: Tensor,
    rows: Optional[Tensor],
    scale: Optional[Tensor],
    dst: Optional[Tensor],
    scale_at_dst: bool,
    dot_x: Tensor,
    dot_rows: Tensor,
    dot_dst: Optional[Tensor],
    gate_x: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(grouped_mm(x, weight, offsets, rows, scale, dst, scale_at_dst), dot [N] fp32, gated_x) where dot[n]
    is <x[rows[n]] @ weight[expert of n], dot_x[dot_rows[n]]>, the product taken before the scale and, on
    the kernel path, before rounding; written at dot_dst[n] if given, else at n. gate_x (needs scale):
    gated_x [N, I] is x[rows[n]] times routed row n's scale, rounded to x's dtype, in routed order (the
    gated operand of the weight gradient, see `row_dot`); else [0, I].

    The gate gradient of a combine whose input is wider than its output (SwitchHead's value projection,
    1024 -> 128) is <d out, y> with y that projection's output, which is not saved. As
    <d out @ W^T, x>, it comes out of the input-gradient GEMM's epilogue, when one program holds whole
    output rows ("loop over N"); elsewhere y is recomputed (one more GEMM) and dotted in a second pass."""
    _check(x, weight, offsets)
    torch._check(not gate_x or scale is not None, lambda: "grouped_mm_dot: gate_x needs a scale")

    def routed_scale():  # scale[n] of routed row n (the loop-over-N kernel reads it at dst itself)
        return scale.index_select(0, dst) if scale_at_dst else scale

    if use_fused(x):
        from moeut.kernels.expert_mm import grouped_mm_triton, row_dot_triton, use_loop_n

        N, (E, I, O) = _routed_count(x, rows), weight.shape
        if use_loop_n(I, O, N, E):
            return grouped_mm_triton(
                x,
                weight,
                offsets,
                rows,
                scale,
                dst,
                scale_at_dst,
                dot_x_MO=dot_x,
                dot_rows_N=dot_rows,
                dot_dst_N=dot_dst,
                gate_x=gate_x,
            )
        out = grouped_mm_triton(x, weight, offsets, rows, scale, dst, scale_at_dst)
        y = grouped_mm_triton(dot_x, weight.transpose(1, 2), offsets, dot_rows)
        gated = _gated_rows(x, rows, routed_scale()) if gate_x else x.new_empty(0, x.shape[1])
        return out, row_dot_triton(y, x, rows, None, dot_dst)[0], gated
    plain = grouped_mm_reference(x, weight, offsets, rows)
    dot = (in_accumulation_dtype(plain) * in_accumulation_dtype(dot_x.index_select(0, dot_rows))).sum(-1)
    if dot_dst is not None:
        dot = torch.empty_like(dot).index_copy_(0, dot_dst, dot)
    if scale is not None:
        plain = _scale_rows(plain, routed_scale())
    if dst is not None:
        plain = torch.empty_like(plain).index_copy_(0, dst, plain)
    return plain, dot, _gated_rows(x, rows, routed_scale()) if gate_x else x.new_empty(0, x.shape[1])


def _gated_rows(x: Tensor, rows: Optional[Tensor], scale_N: Tensor) -> Tensor:
    return _scale_rows(x if rows is None else x.index_select(0, rows), scale_N)


@grouped_mm_dot.register_fake
def _(x, weight, offsets, rows, scale, dst, scale_at_dst, dot_x, dot_rows, dot_dst, gate_x=False):
    N = _routed_count(x, rows)
    return (
        x.new_empty(N, weight.shape[2]),
        x.new_empty(N, dtype=torch.promote_types(x.dtype, torch.float32)),
        x.new_empty(N if gate_x else 0, x.shape[1]),
    )


@torch.library.custom_op("moeut::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(
    x: Tensor,
    grad: Tensor,
    offsets: Tensor,
    rows: Optional[Tensor],
    grad_rows: Optional[Tensor],
    grad_scale: Optional[Tensor],
    out_dtype: torch.dtype,
    scale_dst: Optional[Tensor] = None,
) -> Tensor:
    """[E, I, O] in `out_dtype`: out[e] = sum over e's routed rows n of
    (grad_scale[n] * x[rows[n]])^T grad[grad_rows[n]], accumulated in fp32 (fp64 for fp64 inputs); the
    scaled row is rounded to x's dtype.
    scale_dst: the scale of routed row n is grad_scale[scale_dst[n]] (gates in (row, choice) order)."""
    if use_fused(x):
        from moeut.kernels.weight_grad import grouped_mm_weight_grad_triton

        return grouped_mm_weight_grad_triton(
            x, grad, offsets, rows, grad_rows, grad_scale, out_dtype, scale_dst_N=scale_dst
        )
    return weight_grad_reference(x, grad, offsets, rows, grad_rows, grad_scale, out_dtype, scale_dst)


@grouped_mm_weight_grad.register_fake
def _(x, grad, offsets, rows, grad_rows, grad_scale, out_dtype, scale_dst=None):
    return grad.new_empty(offsets.shape[0] - 1, x.shape[1], grad.shape[1], dtype=out_dtype)


@torch.library.custom_op("moeut::grouped_mm_weight_grad_add", mutates_args=("acc",))
def grouped_mm_weight_grad_add(
    acc: Tensor,
    x: Tensor,
    grad: Tensor,
    offsets: Tensor,
    rows: Optional[Tensor],
    grad_rows: Optional[Tensor],
    grad_scale: Optional[Tensor],
    scale_dst: Optional[Tensor] = None,
) -> None:
    """acc += grouped_mm_weight_grad(x, grad, ..., acc.dtype, scale_dst): the Triton kernel adds its fp32
    tile to acc's in its epilogue (one pass over acc instead of a separate add); the same rounding."""
    torch._check(
        acc.shape == (offsets.shape[0] - 1, x.shape[1], grad.shape[1]),
        lambda: f"grouped_mm_weight_grad_add: accumulator of shape {tuple(acc.shape)}",
    )
    if use_fused(x):
        from moeut.kernels.weight_grad import grouped_mm_weight_grad_triton

        grouped_mm_weight_grad_triton(
            x, grad, offsets, rows, grad_rows, grad_scale, acc.dtype, accumulate_into=acc, scale_dst_N=scale_dst
        )
    else:
        acc.add_(weight_grad_reference(x, grad, offsets, rows, grad_rows, grad_scale, acc.dtype, scale_dst))


@torch.library.custom_op("moeut::row_dot", mutates_args=())
def row_dot(
    a: Tensor,
    b: Tensor,
    b_rows: Optional[Tensor],
    scale: Optional[Tensor],
    dst: Optional[Tensor] = None,
    relu_mask: bool = False,
    scaled_dst: Optional[Tensor] = None,
    gate_b: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dot [N] fp32, scaled [N, I] or [0, I], gated_b [N, I] or [0, I]): dot[n] = <a[n], b[b_rows[n]]>
    accumulated in fp32 (fp64 for fp64 inputs); scaled[n] = scale[n] * a[n] rounded to a's dtype (empty
    when scale is None). The gate gradient of a combine and the gate-scaled input gradient in one pass
    over a. With dst (a permutation of 0..N-1): scale is read as scale[dst[n]] and the dot is written to
    dot[dst[n]], so gates and their gradient stay in (row, choice) order with no gather or scatter of their
    own. relu_mask: scaled[n] is zero where b[b_rows[n]] is not positive (b is a ReLU's output: scaled is
    then the gradient of the ReLU's input). scaled_dst (a permutation of 0..N-1): scaled row n is written
    at row scaled_dst[n] (e.g. straight into (row, choice) order for a top-k sum, no permuting copy).
    gate_b (needs scale): gated_b[n] = scale[n] * b[b_rows[n]] rounded to b's dtype, in routed order: the
    gated operand of the projection's weight gradient, written by the pass that reads b anyway, so that
    the weight-gradient kernel needs no gate in its K loop."""
    torch._check(not gate_b or scale is not None, lambda: "row_dot: gate_b needs a scale")
    if a.dtype != torch.float64 and use_fused(a, "row_dot"):
        from moeut.kernels.expert_mm import row_dot_triton

        return row_dot_triton(a, b, b_rows, scale, dst, relu_mask, scaled_dst, gate_b)
    b_NI = b if b_rows is None else b.index_select(0, b_rows)
    dot = (in_accumulation_dtype(a) * in_accumulation_dtype(b_NI)).sum(-1)
    if dst is not None:
        dot = torch.empty_like(dot).index_copy_(0, dst, dot)
        scale = scale.index_select(0, dst) if scale is not None else None
    scaled = _scale_rows(a, scale) if scale is not None else a.new_empty(0, a.shape[1])
    gated_b = _scale_rows(b_NI, scale) if gate_b else b.new_empty(0, b.shape[1])
    if relu_mask and scale is not None:
        scaled = torch.where(b_NI > 0, scaled, scaled.new_zeros(()))
    if scaled_dst is not None and scale is not None:
        scaled = torch.empty_like(scaled).index_copy_(0, scaled_dst, scaled)
    return dot, scaled, gated_b


@row_dot.register_fake
def _(a, b, b_rows, scale, dst=None, relu_mask=False, scaled_dst=None, gate_b=False):
    acc = torch.promote_types(a.dtype, torch.float32)
    return (
        a.new_empty(a.shape[0], dtype=acc),
        a.new_empty(a.shape[0] if scale is not None else 0, a.shape[1]),
        b.new_empty(a.shape[0] if gate_b else 0, b.shape[1]),
    )


def _sum_choices_torch(y_SO: Tensor, n_groups: int, out_dtype: torch.dtype, init_XO: Optional[Tensor] = None) -> Tensor:
    if n_groups == 0:
        return y_SO.new_zeros(0, y_SO.shape[1], dtype=out_dtype)
    acc = torch.promote_types(y_SO.dtype, torch.float32)
    total = y_SO.view(n_groups, -1, y_SO.shape[1]).sum(1, dtype=acc)
    if init_XO is not None:
        total = total + init_XO.to(acc)
    return total.to(out_dtype)


@torch.library.custom_op("moeut::sum_choices", mutates_args=())
def sum_choices(y: Tensor, n_groups: int, out_dtype: torch.dtype, init: Optional[Tensor] = None) -> Tensor:
    """[X*C, O] rows in (group, choice) order -> [X, O] sums in `out_dtype`, accumulated in fp32 (fp64
    for fp64 inputs), plus `init` [X, O] if given, and rounded once (`kernels/sum_choices.py` on CUDA)."""
    torch._check(
        y.dim() == 2 and (n_groups == 0 or y.shape[0] % n_groups == 0),
        lambda: f"sum_choices: {tuple(y.shape)} rows do not split into {n_groups} groups",
    )
    torch._check(
        init is None or tuple(init.shape) == (n_groups, y.shape[1]),
        lambda: f"sum_choices: init of shape {tuple(init.shape)} for {n_groups} sums of width {y.shape[1]}",
    )
    if y.dtype != torch.float64 and (init is None or init.dtype != torch.float64) and use_fused(y, "topk_sum"):
        from moeut.kernels.sum_choices import sum_choices_triton

        return sum_choices_triton(y, n_groups, out_dtype, init)
    return _sum_choices_torch(y, n_groups, out_dtype, init)


@sum_choices.register_fake
def _(y, n_groups, out_dtype, init=None):
    return y.new_empty(n_groups, y.shape[1], dtype=out_dtype)


def sum_choices_in(
    y_SO: Tensor, n_groups: int, out_dtype: Optional[torch.dtype] = None, init_XO: Optional[Tensor] = None
) -> Tensor:
    return sum_choices(y_SO, n_groups, out_dtype or y_SO.dtype, init_XO)
