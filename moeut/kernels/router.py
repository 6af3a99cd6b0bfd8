"""Triton kernel of `moeut::sigmoid_topk` (see `router.py` for the contract and the reference).

Forward: one program takes BR rows: it loads their logits once, rounds sigmoid to the logits' dtype
(the values `torch.topk` would rank), then picks the maximum K times, taking the lowest expert id
among equal scores and masking it out: one integer max-reduction per pick, over (score bits, expert
id) packed into one key. (The backward's kernel, in training, is `triton_entropy.router_backward_triton`,
shared with the entropy regulariser.) Runs under `TRITON_INTERPRET=1` on CPU tensors (CI).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

import triton
import triton.language as tl

from moeut.kernels.expert_mm import INTERPRET


@triton.jit
def _sigmoid_topk_kernel(
    logits_ptr,
    gate_ptr,
    expert_ptr,
    R,
    G,
    E,
    s_outer,
    s_inner,
    sle,
    K: tl.constexpr,
    EP: tl.constexpr,
    BR: tl.constexpr,
    ROUND: tl.constexpr,
    PACK32: tl.constexpr,
):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, EP)
    row_ok = rows < R
    valid = row_ok[:, None] & (cols[None, :] < E)
    row_at = (rows // G).to(tl.int64) * s_outer + (rows % G).to(tl.int64) * s_inner
    x = tl.load(logits_ptr + row_at[:, None] + cols[None, :] * sle, mask=valid, other=0.0)
    score = tl.sigmoid(x.to(tl.float32))
    if ROUND == 1:  # to bf16, to nearest even, by hand: the interpreter's cast truncates
        bits = score.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        score = bits.to(tl.float32, bitcast=True)
    elif ROUND == 2:  # to the logits' dtype (ROUND == 0: ranked in fp32)
        score = score.to(x.dtype).to(tl.float32)
    # One max-reduction per choice finds both the best score and, among equal scores, the lowest
    # expert id: sigmoid scores are >= 0, so their float bits order like the scores as integers, and
    # (bits, EP - 1 - col) packed into one integer orders like (score, -col). Rounded to bf16 the low
    # 16 bits are zero and the pair fits an int32; otherwise it takes an int64.
    if PACK32:
        key = score.to(tl.int32, bitcast=True) | (EP - 1 - cols[None, :])
    else:
        key = (score.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (EP - 1 - cols[None, :]).to(tl.int64)
    key = tl.where(valid, key, -1)  # below every score's key
    for k in tl.static_range(K):
        best = tl.max(key, axis=1)
        pick = EP - 1 - (best & (EP - 1)).to(tl.int32)
        if PACK32:
            best_score = (best & -65536).to(tl.float32, bitcast=True)
        else:
            best_score = (best >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        tl.store(gate_ptr + rows * K + k, best_score.to(gate_ptr.dtype.element_ty), mask=row_ok)
        tl.store(expert_ptr + rows * K + k, pick.to(tl.int64), mask=row_ok)
        key = tl.where(key == best[:, None], -1, key)


def sigmoid_topk_triton(
    logits_RE: Tensor, k: int, fp32: bool = False, launch: Optional[Tuple[int, int]] = None
) -> Tuple[Tensor, Tensor]:
    """logits [R, E] or [R0, G, E] (any strides; row r0 * G + g). fp32: rank and return gates in float32
    (as for logits.float()), else in the logits' dtype. `launch`: (rows per program, warps) in place of
    the rule below (benchmarks compare launch shapes)."""
    if logits_RE.dim() == 2:
        logits_RE = logits_RE.unsqueeze(1)
    R0, G, E = logits_RE.shape
    R = R0 * G
    gate = torch.empty(R, k, device=logits_RE.device, dtype=torch.float32 if fp32 else logits_RE.dtype)
    expert = torch.empty(R, k, device=logits_RE.device, dtype=torch.long)
    if R == 0:
        return gate, expert
    EP = max(16, triton.next_power_of_2(E))
    BR = 4 if INTERPRET else max(1, min(32, 4096 // EP))  # about 4096 scores per program
    warps = 4
    if (R <= 256 or EP >= 128) and EP <= 1024 and not INTERPRET:
        # One warp per row, so each of the K max-reductions is warp shuffles only, never a round trip
        # through shared memory. H200, 16384 rows: 387 experts top-16 38 µs (45 with 8 rows and 4
        # warps), 565 experts top-24 96 µs (121 with 4 rows and 4 warps); a decoding step's few rows
        # took 6 µs with 4 warps. Short rows (SwitchHead's 10 experts) keep many rows per program.
        BR, warps = 1, 1
    if launch is not None:  # (rows per program, warps) in place of the rule: benchmarks compare launch shapes
        BR, warps = launch
    _sigmoid_topk_kernel[(triton.cdiv(R, BR),)](
        logits_RE,
        gate,
        expert,
        R,
        G,
        E,
        *logits_RE.stride(),
        K=k,
        EP=EP,
        BR=BR,
        ROUND=0 if fp32 or logits_RE.dtype == torch.float32 else 1 if logits_RE.dtype == torch.bfloat16 else 2,
        PACK32=not fp32 and logits_RE.dtype == torch.bfloat16 and EP <= 65536,
        num_warps=warps,
    )
    return gate, expert
