"""The routing shared by the σ-MoE feed-forward block and SwitchHead attention: scores from selector
logits, the top-k experts and their gates, and the entropy regulariser that keeps every expert in use.

    scores = activation(logits)               sigmoid (the paper's) or softmax over the experts
    gate, expert = top-k of scores            per row (token, or token x head)
    regulariser = -H(mean over positions and applications of softmax(logits))

The activation is an argument (`ACTIVATIONS`), not a name hard-wired in the blocks. The fast path is
the `sigmoid_topk` operator (`ops/router.py`: one Triton kernel on CUDA, with a joint gradient kernel
for the selection and the regulariser in training); it supports the activations in
`KERNEL_ACTIVATIONS` only (its bit-packed top-k key needs scores >= 0 and its backward is s(1 - s)).
Any other activation takes the reference path: plain PyTorch, differentiable, on every device.

Every activation here is monotone in the logits along a row, so the chosen experts are the top-k
logits whatever the activation (`chosen_experts`, for statistics that need no gates).

Shape suffixes follow the package legend (`moeut/__init__.py`).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from moeut.ops.dispatch import use_fused
from moeut.ops.router import joint_selection_applies, select_with_prob_sum, sigmoid_topk

ACTIVATIONS = ("sigmoid", "softmax")
KERNEL_ACTIVATIONS = ("sigmoid",)


def check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"router activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}")
    return activation


class RouterLogits(NamedTuple):
    """One router application's logits and, when the router computed it with its selection (training
    on CUDA: `ops.router.select_with_prob_sum`), the regulariser's softmax sum over positions."""

    logits: Tensor  # [B, T, E] or [B, T, H, E]
    prob_sum: Optional[Tensor] = None  # [B, E] or [B, H, E], fp32


def scores(logits: Tensor, activation: str) -> Tensor:
    """activation(logits) over the experts (the last dim)."""
    return torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, dim=-1)


def select_experts(
    logits: Tensor,
    k: int,
    activation: str = "sigmoid",
    *,
    fp32: bool = False,
    expert_dropout: float = 0.0,
    prob_sum: bool = False,
    n_valid: Optional[int] = None,
) -> Tuple[RouterLogits, Tensor, Tensor]:
    """(RouterLogits, gate [..., K], expert [..., K]) of selector logits [..., W] whose first `n_valid`
    columns (default all) are the experts' (the rest: alignment padding, never chosen).

    fp32: rank and gate in float32 whatever the logits' dtype. expert_dropout (training): each
    expert is masked out of the ranking with this probability, per row. prob_sum: compute the
    regulariser's softmax sum with the selection when one kernel can (`joint_selection_applies`)."""
    n_valid = logits.shape[-1] if n_valid is None else n_valid
    valid = logits[..., :n_valid]
    if expert_dropout > 0:
        s = scores(valid.float() if fp32 else valid, activation)
        with torch.no_grad():
            ranked = s.masked_fill(torch.rand_like(s) < expert_dropout, float("-inf"))
            expert = ranked.topk(k, dim=-1, sorted=False).indices
        return RouterLogits(valid), s.gather(-1, expert), expert
    if activation in KERNEL_ACTIVATIONS:
        if prob_sum and logits.dim() in (3, 4) and joint_selection_applies(logits):
            gate, expert, p_sum = select_with_prob_sum(logits, k, fp32=fp32, n_valid=n_valid)
            return RouterLogits(valid, p_sum), gate, expert
        gate, expert = sigmoid_topk(valid, k, fp32=fp32)  # one kernel on CUDA
        return RouterLogits(valid), gate, expert
    gate, expert = scores(valid.float() if fp32 else valid, activation).topk(k, dim=-1, sorted=True)
    return RouterLogits(valid), gate, expert


def chosen_experts(logits: Tensor, k: int) -> Tensor:
    """[..., K] the experts any activation of `ACTIVATIONS` chooses: the top-k logits."""
    return logits.float().topk(k, dim=-1).indices


class _ProbabilitySum(torch.autograd.Function):
    """softmax(logits in fp32, over experts).sum(1), saving the (bf16) logits instead of the fp32
    probabilities: the backward recomputes them. The probabilities of every layer application would
    otherwise stay alive until the backward (0.45 GiB at 244M, batch 16). On CUDA each direction is
    one Triton kernel (`kernels/entropy.py`; MOEUT_PYTORCH_OPS=entropy runs the PyTorch form below)."""

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:
        ctx.save_for_backward(logits)
        if use_fused(logits, "entropy"):
            from moeut.kernels.entropy import prob_sum_triton

            return prob_sum_triton(logits)
        return F.softmax(logits, dim=-1, dtype=torch.float32).sum(1)

    @staticmethod
    def backward(ctx, grad_sum: Tensor) -> Tensor:
        # Few ops on purpose (eager steps are launch-bound): the fp32 softmax of half-precision logits
        # is one kernel, its backward another, and one cast. The backward returns fp32: CUDA's can
        # return fp16 from fp32 gradients but not bf16 ("input to be at::Half and grad to be
        # at::Float"), so asking for bf16 would crash every GPU training step.
        (logits,) = ctx.saved_tensors
        if use_fused(logits, "entropy"):
            from moeut.kernels.entropy import prob_sum_backward_triton

            return prob_sum_backward_triton(grad_sum, logits)
        p = F.softmax(logits, dim=-1, dtype=torch.float32)
        g = grad_sum.unsqueeze(1).expand_as(p).contiguous()  # the same upstream gradient at every position
        return torch._softmax_backward_data(g, p, -1, p.dtype).to(logits.dtype)


def selection_probability_sum(logits: Tensor) -> Tensor:
    """Softmax over experts summed over positions: [B, T, E] -> [B, E] (or [B, T, H, E] -> [B, H, E])."""
    if logits.requires_grad and logits.dtype != torch.float32 and not torch.compiler.is_compiling():
        return _ProbabilitySum.apply(logits)
    return F.softmax(logits.float(), dim=-1).sum(1)


def router_prob_sum(router: RouterLogits) -> Tensor:
    """The regulariser's softmax sum of one router application: the one computed with the selection, else
    `selection_probability_sum` of its logits."""
    return router.prob_sum if router.prob_sum is not None else selection_probability_sum(router.logits)


def negative_entropy(mean_p: Tensor) -> Tensor:
    """Negative entropy of distributions over the last dim, averaged over the rest."""
    return (mean_p * mean_p.clamp_min(torch.finfo(mean_p.dtype).tiny).log()).sum(-1).mean()


def selection_entropy_loss(logits: List[Tensor]) -> Tensor:
    """Negative entropy of the mean expert distribution of one router, averaged over the batch.

    `logits` holds the router's selector logits from every application of the module in one
    forward pass, each [B, T, E] or [B, T, H, E]. Per sequence, the softmax over experts is averaged
    over all positions and applications, and the entropy of that mean is taken. Minimising this
    loss pushes the router to use all experts. The official code takes the mean in log
    space over the concatenated logits; summing probabilities per application gives the same value
    without keeping an fp32 copy of every application's logits (`MoEUT.forward` streams it).
    """
    total = sum(selection_probability_sum(l) for l in logits)
    return negative_entropy(total / sum(l.shape[1] for l in logits))
