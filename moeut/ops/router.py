"""The σ-MoE router's selection: sigmoid scores, the top-k experts per row and their gates.

    gate[r], expert[r] = top-k over e of sigmoid(logits[r, e])      (k largest, descending)

`sigmoid_topk` is one operator. On CUDA it is a single Triton kernel (`kernels/router.py`): it reads
the [R, E] logits once and writes [R, K] gates and expert ids, where the plain PyTorch form runs a
sigmoid, a top-k and a gather (three kernels, an [R, E] score tensor in between). Its backward
scatters d gate * s * (1 - s) into a zero [R, E] gradient, which is what autograd computes for the
plain form.

In training, `select_with_prob_sum` makes the selection and the entropy regulariser's softmax sum of
the same logits one autograd node, whose backward is one kernel for both terms
(`triton_entropy.router_backward_triton`); elsewhere they are separate autograd nodes.

Ties: scores are ranked after rounding to the logits' dtype, exactly as `torch.topk` on the rounded
sigmoid sees them (with fp32=True: in fp32, as for the logits' float copy). `torch.topk` breaks ties
in an unspecified order; the kernel takes the lowest expert id, so its choice is reproducible. The plain form (CPU, and any device without Triton) is
the reference the tests compare the kernel with. `MOEUT_PYTORCH_OPS=router` turns the kernel off.

Shape suffixes follow the package legend (`moeut/__init__.py`); the operator sees the R rows as
[R0, G, E] (R = R0 * G, e.g. tokens x heads) so that strided slices need no copy.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from moeut.ops.dispatch import use_fused


def sigmoid_topk_reference(logits_RE: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """(gate [R, K] in the logits' dtype, expert [R, K] int64), plain PyTorch, differentiable."""
    return torch.sigmoid(logits_RE).topk(k, dim=-1, sorted=True)


@torch.library.custom_op("moeut::sigmoid_topk", mutates_args=())
def _sigmoid_topk_op(logits: Tensor, k: int, fp32: bool = False) -> Tuple[Tensor, Tensor]:
    """logits [R0, G, E], any strides (e.g. heads x experts sliced out of a wider projection): rows
    r = r0 * G + g."""
    if use_fused(logits, "router"):
        from moeut.kernels.router import sigmoid_topk_triton

        return sigmoid_topk_triton(logits, k, fp32)
    with torch.no_grad():
        flat = logits.reshape(-1, logits.shape[-1])
        return sigmoid_topk_reference(flat.float() if fp32 else flat, k)


@_sigmoid_topk_op.register_fake
def _(logits, k, fp32=False):
    R = logits.shape[0] * logits.shape[1]
    return (
        logits.new_empty(R, k, dtype=torch.float32 if fp32 else logits.dtype),
        logits.new_empty(R, k, dtype=torch.long),
    )


@torch.library.custom_op("moeut::sigmoid_topk_backward", mutates_args=())
def _sigmoid_topk_backward_op(
    grad_gate: Tensor, gate: Tensor, expert: Tensor, n_experts: int, dtype: torch.dtype
) -> Tensor:
    """[R, E] gradient of the logits: d gate * s * (1 - s) (in fp32, rounded to `dtype`) scattered
    to the chosen experts' columns, zeros elsewhere. (In training the gradient kernel of
    `select_with_prob_sum` computes this term; these PyTorch ops serve the other paths.)"""
    s = gate.float()
    grad = (grad_gate.float() * ((1 - s) * s)).to(dtype)
    return torch.zeros(gate.shape[0], n_experts, dtype=dtype, device=gate.device).scatter_(1, expert, grad)


@_sigmoid_topk_backward_op.register_fake
def _(grad_gate, gate, expert, n_experts, dtype):
    return gate.new_empty(gate.shape[0], n_experts, dtype=dtype)


class _SigmoidTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_RE, k, fp32):
        gate_RK, expert_RK = _sigmoid_topk_op(logits_RE, k, fp32)
        ctx.save_for_backward(gate_RK, expert_RK)
        ctx.shape, ctx.logits_dtype = logits_RE.shape, logits_RE.dtype
        ctx.mark_non_differentiable(expert_RK)
        ctx.set_materialize_grads(False)  # no zero tensor for the expert ids' (absent) gradient
        return gate_RK, expert_RK

    @staticmethod
    def backward(ctx, grad_gate_RK, _grad_expert):
        if grad_gate_RK is None:
            return None, None, None
        gate_RK, expert_RK = ctx.saved_tensors
        grad_RE = _sigmoid_topk_backward_op(grad_gate_RK, gate_RK, expert_RK, ctx.shape[-1], ctx.logits_dtype)
        return grad_RE.view(ctx.shape), None, None


def _as_rows_GE(logits: Tensor) -> Tensor:
    """logits [..., E] as [R0, G, E] (row r = r0 * G + g, the order of the leading dims), without a copy
    where the strides allow: the kernels take any strides, also those of a sliced projection."""
    E = logits.shape[-1]
    try:
        return logits.view(-1, *logits.shape[-2:]) if logits.dim() >= 3 else logits.reshape(-1, 1, E)
    except RuntimeError:
        return logits.reshape(-1, 1, E)


def sigmoid_topk(logits: Tensor, k: int, fp32: bool = False) -> Tuple[Tensor, Tensor]:
    """(gate [..., K], expert [..., K]) of the k largest sigmoid(logits) over the last dim, descending.

    fp32=True ranks and returns the gates in float32 whatever the logits' dtype: the result of
    `sigmoid_topk(logits.float(), k)` without the float copy of the logits."""
    E = logits.shape[-1]
    if not 0 < k <= E:
        raise ValueError(f"sigmoid_topk: k={k} must be in 1..{E} (the number of experts)")
    if not logits.is_floating_point():
        raise TypeError(f"sigmoid_topk: logits must be floating point, got {logits.dtype}")
    lead = logits.shape[:-1]
    gate, expert = _SigmoidTopK.apply(_as_rows_GE(logits), k, fp32)
    return gate.view(*lead, k), expert.view(*lead, k)


def joint_selection_applies(logits: Tensor) -> bool:
    """Whether `select_with_prob_sum` runs here (CUDA with Triton, gradients wanted, outside torch.compile)."""
    return (
        logits.requires_grad
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and use_fused(logits, "router")
        and use_fused(logits, "entropy")
    )


class _SelectWithProbSum(torch.autograd.Function):
    """The router's top-k selection and the entropy regulariser's softmax sum of the same logits as
    one autograd node. Separately, the logits' gradient is the selection's scatter (six PyTorch
    kernels), the regulariser's kernel, autograd's add of the two and, for a zero-padded projection
    (the FFN's selector), the slice's zero fill and copy into the padded width. Here it is one kernel
    (`triton_entropy.router_backward_triton`), both terms added in fp32 and rounded once, the
    selection's term written as a sparse second store."""

    @staticmethod
    def forward(ctx, logits, k, fp32, n_valid):
        from moeut.kernels.entropy import prob_sum_triton
        from moeut.kernels.router import sigmoid_topk_triton

        valid = logits[..., :n_valid]
        gate_RK, expert_RK = sigmoid_topk_triton(_as_rows_GE(valid), k, fp32)
        prob_sum = prob_sum_triton(valid)
        ctx.save_for_backward(logits, gate_RK, expert_RK)
        ctx.n_valid = n_valid
        ctx.mark_non_differentiable(expert_RK)
        ctx.set_materialize_grads(False)
        return gate_RK, expert_RK, prob_sum

    @staticmethod
    def backward(ctx, grad_gate_RK, _grad_expert, grad_prob_sum):
        from moeut.kernels.entropy import router_backward_triton

        logits, gate_RK, expert_RK = ctx.saved_tensors
        if grad_gate_RK is None and grad_prob_sum is None:
            return None, None, None, None
        grad = router_backward_triton(logits, ctx.n_valid, grad_prob_sum, gate_RK, expert_RK, grad_gate_RK)
        return grad, None, None, None


def select_with_prob_sum(
    logits: Tensor, k: int, fp32: bool = False, n_valid: int = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """(gate [..., K], expert [..., K], prob_sum) where gate, expert = sigmoid_topk(logits[..., :n_valid], k, fp32)
    and prob_sum = softmax(logits[..., :n_valid] in fp32).sum(1) ([B, T, W] -> [B, E], [B, T, G, W] ->
    [B, G, E]): the values of the separate operators, with one gradient kernel for both (see
    `_SelectWithProbSum`; needs `joint_selection_applies`). `logits` may be a zero-padded projection
    of width W >= n_valid: its extra columns get a zero gradient, with no slice in between."""
    W = logits.shape[-1]
    n_valid = W if n_valid is None else n_valid
    if logits.dim() not in (3, 4) or not 0 < n_valid <= W:
        raise ValueError(
            f"select_with_prob_sum: logits must be [B, T, (G,) W] with 0 < n_valid <= W, got "
            f"{tuple(logits.shape)} and n_valid={n_valid}"
        )
    if not 0 < k <= n_valid:
        raise ValueError(f"select_with_prob_sum: k={k} must be in 1..{n_valid} (the number of experts)")
    gate_RK, expert_RK, prob_sum = _SelectWithProbSum.apply(logits, k, fp32, n_valid)
    lead = logits.shape[:-1]
    return gate_RK.view(*lead, k), expert_RK.view(*lead, k), prob_sum
