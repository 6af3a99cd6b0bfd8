"""Triton kernels of the entropy regulariser's router statistics (`router._ProbabilitySum`):

    forward:  psum[b, g, :] = sum over t of softmax(logits[b, t, g, :])            (fp32)
    backward: d logits[b, t, g, :] = p * (d psum[b, g, :] - <p, d psum[b, g, :]>)  (p recomputed)

The PyTorch form (`router._ProbabilitySum`, the reference) writes the [R, E] fp32 probabilities and
reads them back for the sum; its backward recomputes them, expands the upstream gradient to [R, E],
runs the softmax backward and casts the result: five kernels per router application. Here each direction reads the logits once: the forward
sums each program's rows in registers and writes one partial sum per program (summed by one small
`torch.sum`, a fixed order: no atomics, so it is reproducible), the backward writes the gradient in
the logits' dtype. Logits may be any strided [B, T, G, E] view (SwitchHead's selectors are slices of a
wider projection), G = 1 for the FFN's router.

The backward kernel can also add the top-k selection's gradient (d gate * s * (1 - s) at the chosen
experts) and write zeros into a padded projection's extra columns: `router.select_with_prob_sum`
makes the router's selection and its statistics one autograd node whose gradient is this one kernel.
All run under `TRITON_INTERPRET=1` on CPU tensors (CI).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl

from moeut.kernels.expert_mm import INTERPRET


@triton.jit
def _row_starts(rows, T, G, sb, st, sg):
    """Element offsets of rows r = (b * T + t) * G + g of a [B, T, G, E] view."""
    b = rows // (T * G)
    t = (rows // G) % T
    g = rows % G
    return b.to(tl.int64) * sb + t.to(tl.int64) * st + g.to(tl.int64) * sg


@triton.jit
def _softmax_rows(logits_ptr, rows, row_ok, cols, col_ok, T, G, sb, st, sg, se):
    """(p, row max, row sum of exp(x - max)): the fp32 softmax of rows r = (b * T + t) * G + g of a
    [B, T, G, E] view; zeros for rows past the end."""
    at = _row_starts(rows, T, G, sb, st, sg)
    x = tl.load(
        logits_ptr + at[:, None] + cols[None, :].to(tl.int64) * se,
        mask=row_ok[:, None] & col_ok[None, :],
        other=float("-inf"),
    ).to(tl.float32)
    m = tl.where(row_ok, tl.max(x, axis=1), 0.0)
    ex = tl.exp(x - m[:, None])
    total = tl.where(row_ok, tl.sum(ex, axis=1), 1.0)
    return ex / total[:, None], m, total


@triton.jit
def _prob_sum_kernel(
    logits_ptr, partial_ptr, T, G, E, sb, st, sg, se, rows_per_program, EP: tl.constexpr, BT: tl.constexpr
):
    # program (b * G + g, c): positions c * rows_per_program ... of sequence b, head g
    bg = tl.program_id(0)
    c = tl.program_id(1)
    b = bg // G
    g = bg % G
    cols = tl.arange(0, EP)
    col_ok = cols < E
    acc = tl.zeros((EP,), dtype=tl.float32)
    t_end = tl.minimum(T, (c + 1) * rows_per_program)
    for t0 in range(c * rows_per_program, t_end, BT):
        ts = t0 + tl.arange(0, BT)
        t_ok = ts < t_end
        p, _, _ = _softmax_rows(logits_ptr, (b * T + ts) * G + g, t_ok, cols, col_ok, T, G, sb, st, sg, se)
        acc += tl.sum(p, axis=0)
    tl.store(partial_ptr + (bg * tl.num_programs(1) + c).to(tl.int64) * E + cols, acc, mask=col_ok)


@triton.jit
def _router_backward_kernel(
    logits_ptr,
    grad_sum_ptr,
    gate_ptr,
    expert_ptr,
    grad_gate_ptr,
    out_ptr,
    R,
    T,
    G,
    E,
    W,
    sb,
    st,
    sg,
    se,
    PROB: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    EP: tl.constexpr,
    BR: tl.constexpr,
):
    """Rows of d logits [R, W]: the regulariser's p * (d psum - <p, d psum>) (PROB) plus the selection's
    d gate * s * (1 - s) at each of the K (distinct) chosen experts, in fp32, rounded once; columns
    E..W-1 zero.

    The selection's term is a second, sparse store: the tile is stored without it; then, after a
    barrier (the same program rewrites K of those elements, perhaps from other threads), the K chosen
    elements are recomputed (the regulariser's term from their logit, the row's max and sum) plus the
    selection's term, and stored again: K gathers per row. Adding it densely (K compare-and-selects
    over the whole [BR, EP] tile) would cost K passes over the tile instead of K gathers per row."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    row_ok = rows < R
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, EP)
    col_ok = cols < E
    grad = tl.zeros((BR, EP), dtype=tl.float32)
    if PROB:
        p, m, total = _softmax_rows(logits_ptr, rows, row_ok, cols, col_ok, T, G, sb, st, sg, se)
        bg = (rows // (T * G)) * G + rows % G  # the row's (sequence, head): its upstream gradient
        mask = row_ok[:, None] & col_ok[None, :]
        up = tl.load(grad_sum_ptr + bg[:, None].to(tl.int64) * E + cols[None, :], mask=mask, other=0.0)
        dot = tl.sum(p * up, axis=1)
        grad = p * (up - dot[:, None])
    tl.store(
        out_ptr + rows64[:, None] * W + cols[None, :],
        grad.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (cols[None, :] < W),
    )
    if K > 0:
        tl.debug_barrier()
        ks = tl.arange(0, KP)
        kmask = row_ok[:, None] & (ks[None, :] < K)
        at_k = rows64[:, None] * K + ks[None, :]
        e = tl.load(expert_ptr + at_k, mask=kmask, other=0)
        s = tl.load(gate_ptr + at_k, mask=kmask, other=0.0).to(tl.float32)
        g = tl.load(grad_gate_ptr + at_k, mask=kmask, other=0.0).to(tl.float32)
        chosen = g * ((1 - s) * s)
        if PROB:
            at = _row_starts(rows, T, G, sb, st, sg)
            x_e = tl.load(logits_ptr + at[:, None] + e.to(tl.int64) * se, mask=kmask, other=0.0).to(tl.float32)
            p_e = tl.exp(x_e - m[:, None]) / total[:, None]
            up_e = tl.load(grad_sum_ptr + bg[:, None].to(tl.int64) * E + e, mask=kmask, other=0.0)
            chosen += p_e * (up_e - dot[:, None])
        tl.store(out_ptr + rows64[:, None] * W + e, chosen.to(out_ptr.dtype.element_ty), mask=kmask)


def _as_bt_ge(logits: Tensor) -> Tensor:
    return logits.unsqueeze(2) if logits.dim() == 3 else logits


def _row_block(EP: int) -> int:
    return 4 if INTERPRET else max(1, min(64, 4096 // EP))  # about 4096 logits per program


def prob_sum_triton(logits: Tensor) -> Tensor:
    """softmax(logits in fp32, over the last dim).sum(1): [B, T, E] -> [B, E], [B, T, G, E] -> [B, G, E]."""
    x = _as_bt_ge(logits)
    B, T, G, E = x.shape
    EP = max(16, triton.next_power_of_2(E))
    BT = _row_block(EP)
    # Enough programs to fill the GPU, each summing a run of positions of one (sequence, head).
    chunks = max(1, min(triton.cdiv(T, BT), (4 if INTERPRET else 2048) // max(1, B * G)))
    rows_per_program = max(1, triton.cdiv(triton.cdiv(T, chunks), BT)) * BT
    chunks = max(1, triton.cdiv(T, rows_per_program))
    partial = torch.zeros(B * G, chunks, E, device=x.device, dtype=torch.float32)
    if B * G and T and E:
        _prob_sum_kernel[(B * G, chunks)](x, partial, T, G, E, *x.stride(), rows_per_program, EP=EP, BT=BT, num_warps=4)
    out = partial.sum(1)
    return out.view(B, E) if logits.dim() == 3 else out.view(B, G, E)


def prob_sum_backward_triton(grad_sum: Tensor, logits: Tensor) -> Tensor:
    """The gradient of the logits (contiguous, in their dtype) from the gradient of `prob_sum_triton`'s output."""
    return router_backward_triton(logits, logits.shape[-1], grad_sum=grad_sum)


def router_backward_triton(
    logits: Tensor,
    n_valid: int,
    grad_sum: Optional[Tensor] = None,
    gate_RK: Optional[Tensor] = None,
    expert_RK: Optional[Tensor] = None,
    grad_gate_RK: Optional[Tensor] = None,
) -> Tensor:
    """d logits (contiguous, the logits' shape and dtype) of a router that reads logits[..., :n_valid]:
    the regulariser's term from grad_sum (the gradient of `prob_sum_triton(logits[..., :n_valid])`),
    plus the selection's d gate * s * (1 - s) at the chosen experts (rows r = (b * T + t) * G + g, as
    `sigmoid_topk` numbers them), added in fp32 and rounded once; zero in the columns n_valid.. (a
    padded projection's extra columns). Either term may be absent (None)."""
    x = _as_bt_ge(logits)
    B, T, G, W = x.shape
    E = n_valid
    out = torch.empty(logits.shape, device=x.device, dtype=logits.dtype)
    R = B * T * G
    if R == 0 or W == 0:
        return out
    topk = grad_gate_RK is not None
    K = gate_RK.shape[1] if topk else 0
    if topk and (gate_RK.shape != (R, K) or expert_RK.shape != (R, K) or grad_gate_RK.shape != (R, K)):
        raise ValueError(
            f"router_backward_triton: gates, expert ids and their gradient must be [{R}, K], got "
            f"{tuple(gate_RK.shape)}, {tuple(expert_RK.shape)}, {tuple(grad_gate_RK.shape)}"
        )
    EP = max(16, triton.next_power_of_2(W))
    BR = _row_block(EP)
    sum_arg = grad_sum.float().contiguous() if grad_sum is not None else out
    topk_args = (gate_RK.contiguous(), expert_RK.contiguous(), grad_gate_RK.contiguous()) if topk else (out,) * 3
    _router_backward_kernel[(triton.cdiv(R, BR),)](
        x,
        sum_arg,
        *topk_args,
        out,
        R,
        T,
        G,
        E,
        W,
        *x.stride(),
        PROB=grad_sum is not None,
        K=K,
        KP=max(2, triton.next_power_of_2(K)),
        EP=EP,
        BR=BR,
        num_warps=4,
    )
    return out
