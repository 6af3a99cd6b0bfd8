"""Ground truths: the MoE computations written the naive way, with no routing, sorting or kernels.

Every fast path (the PyTorch operators in this package and the Triton kernels behind them) is tested
against these. They are slow and memory-hungry on purpose (one weight copy per (row, choice)): the
point is that a reader can check them against the paper's equations at a glance.

Shape suffixes follow the package legend (`moeut/__init__.py`).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from moeut.ops.expert_mm import Routing
from moeut.ops.grouped_mm import grouped_mm_reference, weight_grad_reference


def reference_expert_mm(x_RI: Tensor, w_EIO: Tensor, expert_RK: Tensor) -> Tensor:
    """[R, K, O]: choice k of row r is x[r] @ w[expert_RK[r, k]]."""
    return torch.einsum("ri,rkio->rko", x_RI, w_EIO[expert_RK])


def sigma_moe_mlp_reference(x_RD: Tensor, w1_EDF: Tensor, w2_EFD: Tensor, expert_RK: Tensor, gate_RK: Tensor) -> Tensor:
    """[R, D]: the σ-MoE feed-forward block after routing, y_r = sum_k gate[r, k] ReLU(x_r W1[e]) W2[e] with
    e = expert_RK[r, k]. Differentiable in x, both weights and the gates (autograd gives the backward
    ground truth)."""
    h_RKF = torch.einsum("rd,rkdf->rkf", x_RD, w1_EDF[expert_RK]).relu()
    y_RKD = torch.einsum("rkf,rkfd->rkd", h_RKF, w2_EFD[expert_RK])
    return (gate_RK.unsqueeze(-1) * y_RKD).sum(1)


def fp64_reference(x_RI: Tensor, w_EIO: Tensor, grad_NO: Tensor, routing: Routing) -> Tuple[Tensor, Tensor, Tensor]:
    """(out, grad_x, grad_w) of `expert_mm` in float64 through the per-expert PyTorch operators: a
    lighter truth for large shapes, where `reference_expert_mm` would hold R*K weight copies."""
    x, w, g = x_RI.detach().double(), w_EIO.detach().double(), grad_NO.detach().double()
    out = grouped_mm_reference(x, w, routing.offsets_E1, routing.rows_N)
    grad_x = grouped_mm_reference(g, w.transpose(1, 2), routing.offsets_E1, None)[routing.choice_RK].sum(1)
    grad_w = weight_grad_reference(x, g, routing.offsets_E1, routing.rows_N)
    return out, grad_x, grad_w
