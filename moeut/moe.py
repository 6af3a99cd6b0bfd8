"""σ-MoE feed-forward block (the routing and the entropy regulariser it shares with SwitchHead: `router`).

σ-MoE (Csordás et al. 2023): a linear selector (no bias) -> sigmoid (or another activation of
`router.ACTIVATIONS`) -> top-k experts; each expert is a two-layer ReLU MLP of `expert_size` units;
the output is the gate-weighted sum of the k experts:
    y = sum_k gate_k * W2[e_k]^T relu(W1[e_k]^T x)
The selector may read a different input (MoEUT feeds it the layer-normalised residual while the
experts read the raw residual).

Shape suffixes follow the package legend (`moeut/__init__.py`).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from moeut.ops.expert_gemv import gemv_applies, project
from moeut.ops.expert_mlp import expert_mlp
from moeut.ops.expert_mm import expert_mm, expert_mm_combine, route
from moeut.router import RouterLogits, check_activation, select_experts


PADDING_MIN_ROWS = 1024  # fewer rows (decoding): the padded weight copy costs more than it saves


def aligned_width_padding(width: int, x: Tensor, multiple: int = 8) -> int:
    """Columns to add so that a product of x with `width` outputs has 16-byte aligned rows: 0 when
    already aligned or x has fewer than PADDING_MIN_ROWS rows."""
    pad = -width % multiple
    return pad if pad and x.numel() >= PADDING_MIN_ROWS * x.shape[-1] else 0


def renorm_keep_std(weight: Tensor, dim: int = 0) -> None:
    """Give every slice along `dim` the same norm while keeping the tensor's overall std."""
    std = weight.std()
    weight.div_(weight.norm(dim=dim, keepdim=True))
    weight.mul_(std / weight.std())


class SigmaMoE(torch.nn.Module):
    def __init__(
        self,
        dmodel: int,
        n_experts: int,
        expert_size: int,
        k: int,
        activation: Callable[[Tensor], Tensor] = F.relu,
        v_dim: Optional[int] = None,
        expert_dropout: float = 0.0,
        router_activation: str = "sigmoid",
    ):
        super().__init__()
        self.k_dim = dmodel
        self.v_dim = v_dim if v_dim is not None else dmodel
        self.n_experts = n_experts
        self.expert_size = expert_size
        self.n_heads = k  # name kept from the official code: the number of active experts
        self.activation = activation
        self.expert_dropout = expert_dropout
        self.router_activation = check_activation(router_activation)

        self.keys = torch.nn.Parameter(torch.empty(n_experts, dmodel, expert_size))  # W1 [E, D, S]
        self.values = torch.nn.Parameter(torch.empty(n_experts, expert_size, self.v_dim))  # W2 [E, S, D]
        self.expert_sel = torch.nn.Parameter(torch.empty(n_experts, dmodel))  # selector [E, D]

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
        return self._selector_product(sel_input)[..., : self.n_experts]

    def select(self, sel_input: Tensor, prob_sum: bool = False) -> Tuple[RouterLogits, Tensor, Tensor]:
        """Router: (logits [..., E] with, when asked for and computed with them, the regulariser's softmax
        sum; gates [..., K], expert ids [..., K])."""
        product = self._selector_product(sel_input)
        dropout = self.expert_dropout if self.training else 0.0
        return select_experts(
            product,
            self.n_heads,
            self.router_activation,
            expert_dropout=dropout,
            prob_sum=prob_sum and product.dim() == 3,
            n_valid=self.n_experts,
        )

    def forward_with_logits(
        self, input: Tensor, sel_input: Optional[Tensor] = None, add_input: bool = False, prob_sum: bool = False
    ) -> Tuple[Tensor, RouterLogits]:
        """(output, router logits); with `add_input` the output is input + FFN(input) (a residual block:
        the fused path adds it inside its top-k sums, forward and backward); with `prob_sum` the router
        may compute the regulariser's softmax sum with its selection (`RouterLogits.prob_sum`)."""
        if add_input and self.v_dim != self.k_dim:
            raise ValueError(f"SigmaMoE: add_input needs v_dim == dmodel, got {self.v_dim} and {self.k_dim}")
        logits, gate_BTK, expert_BTK = self.select(sel_input if sel_input is not None else input, prob_sum)
        x_RD = input.reshape(-1, self.k_dim)
        K = self.n_heads
        folded = False  # whether out_RD already holds input + FFN(input)
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
            if self.activation is F.relu:  # the ReLU and its backward ride on the kernels; so does the residual
                folded = add_input
                out_RD = expert_mlp(x_RD, self.keys, self.values, routing, gate_RK, residual=folded)
            else:  # any other activation: the two projections as separate operators
                h_NF = self.activation(expert_mm(x_RD, self.keys, routing))
                out_RD = expert_mm_combine(h_NF, self.values, routing, gate_RK, gather=False)
        out = out_RD.view(*input.shape[:-1], self.v_dim)
        return (input + out if add_input and not folded else out), logits

    def forward(self, input: Tensor, sel_input: Optional[Tensor] = None) -> Tensor:
        return self.forward_with_logits(input, sel_input)[0]
