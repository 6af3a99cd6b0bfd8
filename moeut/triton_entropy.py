"""Triton kernels of the entropy regulariser's router statistics (`moe._ProbabilitySum`):

    forward:  psum[b, g, :] = sum over t of softmax(logits[b, t, g, :])            (fp32)
    backward: d logits[b, t, g, :] = p * (d psum[b, g, :] - <p, d psum[b, g, :]>)  (p recomputed)

The PyTorch form (`moe._ProbabilitySum`, the reference) writes the [R, E] fp32 probabilities and
reads them back for the sum; its backward recomputes them, expands the upstream gradient to [R, E],
runs the softmax backward and casts the result: five kernels and ~2.5 ms of a 244M training step
over its 54 router applications (RESULTS J). Here each direction reads the logits once: the forward
sums each program's rows in registers and writes one partial sum per program (summed by one small
`torch.sum`, a fixed order: no atomics, so it is reproducible), the backward writes the gradient in
the logits' dtype. Logits may be any strided [B, T, G, E] view (SwitchHead's selectors are slices of a
wider projection), G = 1 for the FFN's router. Both run under `TRITON_INTERPRET=1` on CPU tensors (CI).
"""
from __future__ import annotations

import torch
from torch import Tensor

import triton
import triton.language as tl

from .triton_expert_mm import INTERPRET


@triton.jit
def _softmax_rows(logits_ptr, rows, row_ok, cols, col_ok, T, G, sb, st, sg, se):
    """fp32 softmax of rows r = (b * T + t) * G + g of a [B, T, G, E] view; zeros for rows past the end."""
    b = rows // (T * G)
    t = (rows // G) % T
    g = rows % G
    at = b.to(tl.int64) * sb + t.to(tl.int64) * st + g.to(tl.int64) * sg
    x = tl.load(logits_ptr + at[:, None] + cols[None, :].to(tl.int64) * se,
                mask=row_ok[:, None] & col_ok[None, :], other=float("-inf")).to(tl.float32)
    m = tl.where(row_ok, tl.max(x, axis=1), 0.0)
    ex = tl.exp(x - m[:, None])
    total = tl.where(row_ok, tl.sum(ex, axis=1), 1.0)
    return ex / total[:, None]


@triton.jit
def _prob_sum_kernel(logits_ptr, partial_ptr, T, G, E, sb, st, sg, se, rows_per_program,
                     EP: tl.constexpr, BT: tl.constexpr):
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
        p = _softmax_rows(logits_ptr, (b * T + ts) * G + g, t_ok, cols, col_ok, T, G, sb, st, sg, se)
        acc += tl.sum(p, axis=0)
    tl.store(partial_ptr + (bg * tl.num_programs(1) + c).to(tl.int64) * E + cols, acc, mask=col_ok)


@triton.jit
def _prob_sum_backward_kernel(logits_ptr, grad_sum_ptr, out_ptr, R, T, G, E, sb, st, sg, se,
                              EP: tl.constexpr, BR: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    row_ok = rows < R
    cols = tl.arange(0, EP)
    col_ok = cols < E
    p = _softmax_rows(logits_ptr, rows, row_ok, cols, col_ok, T, G, sb, st, sg, se)
    bg = (rows // (T * G)) * G + rows % G          # the row's (sequence, head): its upstream gradient
    mask = row_ok[:, None] & col_ok[None, :]
    up = tl.load(grad_sum_ptr + bg[:, None].to(tl.int64) * E + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dot = tl.sum(p * up, axis=1)
    grad = p * (up - dot[:, None])
    tl.store(out_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], grad.to(out_ptr.dtype.element_ty), mask=mask)


def _as_bt_ge(logits: Tensor) -> Tensor:
    return logits.unsqueeze(2) if logits.dim() == 3 else logits


def _row_block(EP: int) -> int:
    return 4 if INTERPRET else max(1, min(64, 4096 // EP))   # about 4096 logits per program


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
        _prob_sum_kernel[(B * G, chunks)](x, partial, T, G, E, *x.stride(), rows_per_program, EP=EP, BT=BT,
                                          num_warps=4)
    out = partial.sum(1)
    return out.view(B, E) if logits.dim() == 3 else out.view(B, G, E)


def prob_sum_backward_triton(grad_sum: Tensor, logits: Tensor) -> Tensor:
    """The gradient of the logits (contiguous, in their dtype) from the gradient of `prob_sum_triton`'s output."""
    x = _as_bt_ge(logits)
    B, T, G, E = x.shape
    out = torch.empty(logits.shape, device=x.device, dtype=logits.dtype)
    R = B * T * G
    if R == 0 or E == 0:
        return out
    EP = max(16, triton.next_power_of_2(E))
    BR = _row_block(EP)
    _prob_sum_backward_kernel[(triton.cdiv(R, BR),)](x, grad_sum.float().contiguous(), out, R, T, G, E, *x.stride(),
                                                     EP=EP, BR=BR, num_warps=4)
    return out
