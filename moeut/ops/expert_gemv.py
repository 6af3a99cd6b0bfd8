"""Expert projections for a handful of tokens (decoding): each choice reads its expert's weights
directly, with no routing (sort) at all.

`expert_mm` sorts the top-k choices by expert so that each expert is one dense matmul over its rows:
the right dataflow when experts get many rows. A decoding step has one row per sequence, so each
expert gets one or two rows, and the sort, the offsets and the separate top-k sum are a string of
tiny kernels that cost more than the products. Here one kernel walks the choices directly:

    out[j] = act( sum over choices c of output row j:  gate[c] * x[c // per_x] @ w[expert_of(c)] )
    choices c = j * per_out .. j * per_out + per_out - 1
    expert_of(c) = expert[c] + ((c // head_k) % n_heads) * head_experts

`expert` is the flat [S] tensor of the router's picks in (row, head, choice) order. The four uses in
MoEUT (B*T = R tokens, K picks, H heads with E experts each in SwitchHead):

    FFN up      x [R, D]      per_x = K      per_out = 1      -> [R*K, S], ReLU fused
    FFN down    x [R*K, S]    per_x = 1      per_out = K      -> [R, D], gated sum over the K picks
    value       x [R, D]      per_x = H*K    per_out = K      -> [R*H, Dh], heads offset by h*E
    output      x [R*H, Dh]   per_x = K      per_out = H*K    -> [R, D], heads offset by h*E

Inference only (no autograd). On CUDA it is one Triton kernel (`kernels/expert_gemv.py`); the plain
PyTorch form below (gathers the chosen weights) is the reference its tests compare with.
`MOEUT_PYTORCH_OPS=expert_gemv` turns the path off (the sorted path then runs for decoding too).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moeut.ops.dispatch import use_fused

# Use this path while experts get few choices on average. Reading weights per choice re-reads an
# expert picked several times; that is cheap while all experts' weights fit in L2 (50 MB on the H200),
# as SwitchHead's do (10 MB at 244M), and costs memory traffic once they do not, so experts whose
# weights exceed L2 take this path only at up to 2 choices each; the sorted path serves the rest.
MAX_CHOICES_PER_EXPERT = 8  # experts whose weights fit in L2
MAX_CHOICES_PER_EXPERT_PAST_L2 = 2  # larger expert sets
L2_BYTES = 32 * 2**20


def gemv_applies(x: Tensor, n_choices: int, w_EIO: Tensor) -> bool:
    """Whether an expert projection of `n_choices` picks over the experts of `w_EIO` takes this path."""
    if torch.is_grad_enabled() or not use_fused(x, "expert_gemv"):
        return False
    E = w_EIO.shape[0]
    fits = w_EIO.numel() * x.element_size() <= L2_BYTES
    return n_choices <= (MAX_CHOICES_PER_EXPERT if fits else MAX_CHOICES_PER_EXPERT_PAST_L2) * E


def _expert_ids(expert_S: Tensor, head_k: int, n_heads: int, head_experts: int) -> Tensor:
    c = torch.arange(expert_S.numel(), device=expert_S.device)
    return expert_S.reshape(-1) + (c // head_k) % n_heads * head_experts


def expert_gemv_reference(
    x_RI: Tensor,
    w_EIO: Tensor,
    expert_S: Tensor,
    gate_S: Optional[Tensor],
    per_x: int,
    per_out: int,
    head_k: int = 1,
    n_heads: int = 1,
    head_experts: int = 0,
    relu: bool = False,
) -> Tensor:
    """The contract above in plain PyTorch, accumulated in fp32 (fp64 for fp64 inputs), rounded to x's dtype."""
    S = expert_S.numel()
    acc = torch.promote_types(x_RI.dtype, torch.float32)
    c = torch.arange(S, device=x_RI.device)
    w_SIO = w_EIO[_expert_ids(expert_S, head_k, n_heads, head_experts)].to(acc)
    y_SO = torch.bmm(x_RI[c // per_x].to(acc).unsqueeze(1), w_SIO).squeeze(1)
    if gate_S is not None:
        y_SO = y_SO * gate_S.reshape(-1, 1).to(acc)
    out = y_SO.view(S // per_out, per_out, -1).sum(1)
    return (out.relu() if relu else out).to(x_RI.dtype)


def _check(x_RI: Tensor, w_EIO: Tensor, expert_S: Tensor, gate_S: Optional[Tensor], per_x: int, per_out: int) -> None:
    S = expert_S.numel()
    torch._check(
        x_RI.dim() == 2 and w_EIO.dim() == 3 and x_RI.shape[1] == w_EIO.shape[1],
        lambda: f"expert_gemv: x {tuple(x_RI.shape)} does not fit weight {tuple(w_EIO.shape)}",
    )
    torch._check(x_RI.dtype == w_EIO.dtype, lambda: f"expert_gemv: x is {x_RI.dtype} but weight is {w_EIO.dtype}")
    torch._check(
        S % per_out == 0 and S == x_RI.shape[0] * per_x,
        lambda: f"expert_gemv: {S} choices do not match {x_RI.shape[0]} rows x {per_x} / groups of {per_out}",
    )
    torch._check(gate_S is None or gate_S.numel() == S, lambda: "expert_gemv: one gate per choice")


@torch.library.custom_op("moeut::expert_gemv", mutates_args=())
def expert_gemv(
    x: Tensor,
    weight: Tensor,
    expert: Tensor,
    gate: Optional[Tensor],
    per_x: int,
    per_out: int,
    head_k: int = 1,
    n_heads: int = 1,
    head_experts: int = 0,
    relu: bool = False,
) -> Tensor:
    """[S / per_out, O]: see the module docstring. No autograd."""
    _check(x, weight, expert, gate, per_x, per_out)
    if use_fused(x):
        from moeut.kernels.expert_gemv import expert_gemv_triton

        return expert_gemv_triton(x, weight, expert, gate, per_x, per_out, head_k, n_heads, head_experts, relu)
    return expert_gemv_reference(x, weight, expert, gate, per_x, per_out, head_k, n_heads, head_experts, relu)


@expert_gemv.register_fake
def _(x, weight, expert, gate, per_x, per_out, head_k=1, n_heads=1, head_experts=0, relu=False):
    return x.new_empty(expert.numel() // per_out, weight.shape[2])


def project(
    x_RI: Tensor,
    w_EIO: Tensor,
    expert: Tensor,
    gate: Optional[Tensor],
    per_x: int,
    per_out: int,
    head_k: int = 1,
    n_heads: int = 1,
    head_experts: int = 0,
    relu: bool = False,
) -> Tensor:
    """`expert_gemv` in the autocast dtype when autocast is on (like `F.linear`), else in x's dtype."""
    dtype = x_RI.dtype
    if torch.is_autocast_enabled(x_RI.device.type):
        dtype = torch.get_autocast_dtype(x_RI.device.type)
    elif w_EIO.dtype != dtype:
        raise TypeError(f"expert_gemv: input dtype {x_RI.dtype} differs from weight dtype {w_EIO.dtype}")
    return expert_gemv(
        x_RI.to(dtype), w_EIO.to(dtype), expert.reshape(-1), gate, per_x, per_out, head_k, n_heads, head_experts, relu
    )
