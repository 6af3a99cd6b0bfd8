"""Triton kernel of `moeut::expert_gemv` (see `ops/expert_gemv.py` for the contract and the reference).

One program computes BO columns of one output row: for each of the row's choices it reads the
chosen expert's [I, BO] weight slice in [BI, BO] tiles and accumulates gate * x * w in fp32, so the
top-k sum needs no second kernel and no atomics. Decoding is bound by weight reads, so BO is picked
to give a couple of programs per SM while keeping the weight rows read in 32-byte pieces or longer.
Runs under `TRITON_INTERPRET=1` on CPU tensors (CI).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl

from moeut.kernels.expert_mm import INTERPRET


@triton.jit
def _expert_gemv_kernel(
    x_ptr,
    w_ptr,
    expert_ptr,
    gate_ptr,
    out_ptr,
    O,
    per_x,
    head_k,
    n_heads,
    head_experts,
    sxr,
    sxi,
    swe,
    swi,
    swo,
    sor,
    I: tl.constexpr,
    PER_OUT: tl.constexpr,
    HAS_GATE: tl.constexpr,
    RELU: tl.constexpr,
    BI: tl.constexpr,
    BO: tl.constexpr,
):
    # Both loops are unrolled (I and PER_OUT are compile-time), so every weight tile's load can be in
    # flight at once: a decoding step is bound by memory latency, not by arithmetic. Products are
    # summed elementwise and reduced over I once at the end, not once per tile.
    j = tl.program_id(0)
    cols = tl.program_id(1) * BO + tl.arange(0, BO)
    col_ok = cols < O
    acc = tl.zeros([BI, BO], dtype=tl.float32)
    for g in tl.static_range(PER_OUT):
        c = j * PER_OUT + g
        e = tl.load(expert_ptr + c).to(tl.int64) + ((c // head_k) % n_heads) * head_experts
        x_row = x_ptr + (c // per_x).to(tl.int64) * sxr
        w_e = w_ptr + e * swe
        scale = tl.load(gate_ptr + c).to(tl.float32) if HAS_GATE else 1.0
        for i0 in tl.static_range(0, I, BI):
            ii = i0 + tl.arange(0, BI)
            i_ok = ii < I
            xv = tl.load(x_row + ii * sxi, mask=i_ok, other=0.0).to(tl.float32) * scale
            wv = tl.load(w_e + ii[:, None] * swi + cols[None, :] * swo, mask=i_ok[:, None] & col_ok[None, :], other=0.0)
            acc += xv[:, None] * wv.to(tl.float32)
    out = tl.sum(acc, axis=0)
    if RELU:
        out = tl.maximum(out, 0.0)
    tl.store(out_ptr + j.to(tl.int64) * sor + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)


def _block_o(n_rows: int, O: int, elem_bytes: int) -> int:
    if INTERPRET:
        return 16
    smallest = max(16, 32 // elem_bytes)
    bo = min(128, triton.next_power_of_2(O))
    while bo > smallest and n_rows * triton.cdiv(O, bo) < 256:
        bo //= 2
    return bo


def expert_gemv_triton(
    x_RI: Tensor,
    w_EIO: Tensor,
    expert_S: Tensor,
    gate_S: Optional[Tensor],
    per_x: int,
    per_out: int,
    head_k: int,
    n_heads: int,
    head_experts: int,
    relu: bool,
    block_o: Optional[int] = None,
    num_warps: int = 4,
) -> Tensor:
    """`block_o` (output columns per program; None: the rule of `_block_o`) and `num_warps` are for
    benchmarks/gemv_sweep.py's comparison of launch shapes."""
    I, O = w_EIO.shape[1], w_EIO.shape[2]
    n_rows = expert_S.numel() // per_out
    out = torch.empty(n_rows, O, device=x_RI.device, dtype=x_RI.dtype)
    if n_rows == 0 or O == 0:
        return out
    if I == 0:
        return out.zero_()
    expert_S = expert_S.reshape(-1)
    has_gate = gate_S is not None
    gate_S = gate_S.reshape(-1) if has_gate else expert_S  # a placeholder pointer, never read
    BO = block_o if block_o is not None else _block_o(n_rows, O, x_RI.element_size())
    BI = 16 if INTERPRET else max(16, min(triton.next_power_of_2(I), 4096 // BO))
    _expert_gemv_kernel[(n_rows, triton.cdiv(O, BO))](
        x_RI,
        w_EIO,
        expert_S,
        gate_S,
        out,
        O,
        per_x,
        head_k,
        n_heads,
        head_experts,
        x_RI.stride(0),
        x_RI.stride(1),
        w_EIO.stride(0),
        w_EIO.stride(1),
        w_EIO.stride(2),
        out.stride(0),
        I=I,
        PER_OUT=per_out,
        HAS_GATE=has_gate,
        RELU=relu,
        BI=BI,
        BO=BO,
        num_warps=num_warps,
    )
    return out
