"""σ-MoE feed-forward block and the entropy regulariser shared by every MoE router in MoEUT.

σ-MoE (Csordás et al. 2023): a linear selector (no bias) -> sigmoid -> top-k experts; each expert is
a two-layer ReLU MLP of `expert_size` units; the output is the gate-weighted sum of the k experts:
    y = sum_k gate_k * W2[e_k]^T relu(W1[e_k]^T x)
The selector may read a different input (MoEUT feeds it the layer-normalised residual while the
experts read the raw residual).

Shape suffixes follow the package legend (`moeut/__init__.py`).
"""
from __future__ import annotations

import math
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from moeut.ops.expert_gemv import gemv_applies, project
from moeut.ops.expert_mlp import expert_mlp
from moeut.ops.expert_mm import expert_mm, expert_mm_combine, route
from moeut.ops.dispatch import use_fused
from moeut.ops.router import joint_selection_applies, select_with_prob_sum, sigmoid_topk


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
        logits, = ctx.saved_tensors
        if use_fused(logits, "entropy"):
            from moeut.kernels.entropy import prob_sum_backward_triton
            return prob_sum_backward_triton(grad_sum, logits)
        p = F.softmax(logits, dim=-1, dtype=torch.float32)
        g = grad_sum.unsqueeze(1).expand_as(p).contiguous()   # the same upstream gradient at every position
        return torch._softmax_backward_data(g, p, -1, p.dtype).to(logits.dtype)


PADDING_MIN_ROWS = 1024   # fewer rows (decoding): the padded weight copy costs more than it saves


def aligned_width_padding(width: int, x: Tensor, multiple: int = 8) -> int:
    """Columns to add so that a product of x with `width` outputs has 16-byte aligned rows: 0 when
    already aligned or x has fewer than PADDING_MIN_ROWS rows."""
    pad = -width % multiple
    return pad if pad and x.numel() >= PADDING_MIN_ROWS * x.shape[-1] else 0


class RouterLogits(NamedTuple):
    """One router application's logits and, when the router computed it with its selection (training
    on CUDA: `router.select_with_prob_sum`), the regulariser's softmax sum over positions."""
    logits: Tensor                    # [B, T, E] or [B, T, H, E]
    prob_sum: Optional[Tensor] = None  # [B, E] or [B, H, E], fp32


def router_prob_sum(router: RouterLogits) -> Tensor:
    """The regulariser's softmax sum of one router application: the one computed with the selection, else
    `selection_probability_sum` of its logits."""
    return router.prob_sum if router.prob_sum is not None else selection_probability_sum(router.logits)


def selection_probability_sum(logits: Tensor) -> Tensor:
    """Softmax over experts summed over positions: [B, T, E] -> [B, E] (or [B, T, H, E] -> [B, H, E])."""
    if logits.requires_grad and logits.dtype != torch.float32 and not torch.compiler.is_compiling():
        return _ProbabilitySum.apply(logits)
    return F.softmax(logits.float(), dim=-1).sum(1)


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


def renorm_keep_std(weight: Tensor, dim: int = 0) -> None:
    """Give every slice along `dim` the same norm while keeping the tensor's overall std."""
    std = weight.std()
    weight.div_(weight.norm(dim=dim, keepdim=True))
    weight.mul_(std / weight.std())


class SigmaMoE(torch.nn.Module):
    def __init__(self, dmodel: int, n_experts: int, expert_size: int, k: int,
                 activation: Callable[[Tensor], Tensor] = F.relu, v_dim: Optional[int] = None,
                 expert_dropout: float = 0.0):
        super().__init__()
        self.k_dim = dmodel
        self.v_dim = v_dim if v_dim is not None else dmodel
        self.n_experts = n_experts
        self.expert_size = expert_size
        self.n_heads = k  # name kept from the official code: the number of active experts
        self.activation = activation
        self.expert_dropout = expert_dropout

        self.keys = torch.nn.Parameter(torch.empty(n_experts, dmodel, expert_size))         # W1 [E, D, S]
        self.values = torch.nn.Parameter(torch.empty(n_experts, expert_size, self.v_dim))   # W2 [E, S, D]
        self.expert_sel = torch.nn.Parameter(torch.empty(n_experts, dmodel))                # selector [E, D]

    @torch.no_grad()
    def reset_parameters(self, std_scale: float) -> None:
        torch.nn.init.normal_(self.expert_sel, 0, std_scale / math.sqrt(self.k_dim))
        torch.nn.init.normal_(self.keys, 0, std_scale / math.sqrt(self.k_dim))
        torch.nn.init.normal_(self.values, 0, std_scale / math.sqrt(self.n_experts * self.expert_size))
        renorm_keep_std(self.expert_sel, dim=1)

    def _selector_product(self, sel_input: Tensor) -> Tensor:
        """[..., W] router logits, W >= E: for many rows and E not a multiple of 8 (387 at 244M, 565 at
        1B) the selector is zero-padded to the next multiple of 8 and the logits are the first E
        columns of the wider product: with a row stride of E elements cuBLAS falls back to slow
        unaligned kernels (measured on the H200: 7 ms of a 244M training step for this small matmul,
        forward and backward). The padded columns are never read; the gradient of the parameter is
        that of its own rows."""
        pad = aligned_width_padding(self.n_experts, sel_input)
        if pad:
            return F.linear(sel_input, F.pad(self.expert_sel, (0, 0, 0, pad)))
        return F.linear(sel_input, self.expert_sel)

    def selector_logits(self, sel_input: Tensor) -> Tensor:
        """[..., E] router logits (a view of `_selector_product`)."""
        return self._selector_product(sel_input)[..., :self.n_experts]

    def select(self, sel_input: Tensor, prob_sum: bool = False) -> Tuple[RouterLogits, Tensor, Tensor]:
        """Router: (logits [..., E] with, when asked for and computed with them, the regulariser's softmax
        sum; gates [..., K], expert ids [..., K])."""
        product = self._selector_product(sel_input)
        logits = product[..., :self.n_experts]
        if self.training and self.expert_dropout > 0:
            scores = torch.sigmoid(logits)
            drop = torch.rand_like(scores) < self.expert_dropout
            gate, expert = scores.masked_fill(drop, float("-inf")).topk(self.n_heads, dim=-1, sorted=False)
            return RouterLogits(logits), gate, expert
        if prob_sum and product.dim() == 3 and joint_selection_applies(product):
            # one gradient kernel for the selection and the regulariser, into the padded product
            gate, expert, p_sum = select_with_prob_sum(product, self.n_heads, n_valid=self.n_experts)
            return RouterLogits(logits, p_sum), gate, expert
        gate, expert = sigmoid_topk(logits, self.n_heads)  # one kernel on CUDA
        return RouterLogits(logits), gate, expert

    def forward_with_logits(self, input: Tensor, sel_input: Optional[Tensor] = None,
                            add_input: bool = False, prob_sum: bool = False) -> Tuple[Tensor, RouterLogits]:
        """(output, router logits); with `add_input` the output is input + FFN(input) (a residual block:
        the fused path adds it inside its top-k sums, forward and backward); with `prob_sum` the router
        may compute the regulariser's softmax sum with its selection (`RouterLogits.prob_sum`)."""
        if add_input and self.v_dim != self.k_dim:
            raise ValueError(f"SigmaMoE: add_input needs v_dim == dmodel, got {self.v_dim} and {self.k_dim}")
        logits, gate_BTK, expert_BTK = self.select(sel_input if sel_input is not None else input, prob_sum)
        x_RD = input.reshape(-1, self.k_dim)
        K = self.n_heads
        folded = False   # whether out_RD already holds input + FFN(input)
        if gemv_applies(x_RD, expert_BTK.numel(), self.keys):  # decoding: a few tokens, no sort
            fuse_relu = self.activation is F.relu
            h_NF = project(x_RD, self.keys, expert_BTK, None, per_x=K, per_out=1, relu=fuse_relu)
            if not fuse_relu:
                h_NF = self.activation(h_NF)
            out_RD = project(h_NF, self.values, expert_BTK, gate_BTK, per_x=1, per_out=K)
        else:
            # The routing (sort by expert) is computed once and shared by both projections and their backward.
            routing = route(expert_BTK.reshape(-1, self.n_heads), self.n_experts)
            gate_RK = gate_BTK.reshape(-1, self.n_heads)
            if self.activation is F.relu:   # the ReLU and its backward ride on the kernels; so does the residual
                folded = add_input
                out_RD = expert_mlp(x_RD, self.keys, self.values, routing, gate_RK, residual=folded)
            else:   # any other activation: the two projections as separate operators
                h_NF = self.activation(expert_mm(x_RD, self.keys, routing))
                out_RD = expert_mm_combine(h_NF, self.values, routing, gate_RK, gather=False)
        out = out_RD.view(*input.shape[:-1], self.v_dim)
        return (input + out if add_input and not folded else out), logits

    def forward(self, input: Tensor, sel_input: Optional[Tensor] = None) -> Tensor:
        return self.forward_with_logits(input, sel_input)[0]
