"""Triton kernels for `route()`: the stable sort of the (row, choice) pairs by expert.

Small inputs (decoding): the sort, the expert offsets and the inverse permutation in one program
instead of ~8 kernels (int cast, radix sort, searchsorted, arange, scatter, divide).

With N = rows * K choices (N <= MAX_N): counts by histogram, offsets by cumulative sum, and each
choice's rank among earlier choices of the same expert by comparing it with all earlier ones (N^2/2
comparisons: cheap for decode's N <= a few hundred).

Large inputs (training) sort with torch, whose radix sort beats a counting sort of several launches.
Contract and reference: `expert_mm.route`. Runs under `TRITON_INTERPRET=1` on CPU tensors (CI).
"""

from __future__ import annotations

import torch
from torch import Tensor

import triton
import triton.language as tl

# Larger inputs use torch.sort. The N^2 rank loop in one program measured 122 µs at N = 256 on the H200
# (batch-32 decoding's SwitchHead routing), where the sort's ~8 kernels take ~25 µs.
MAX_N = 64
MAX_EXPERTS = 4096


@triton.jit
def _route_small_kernel(
    expert_ptr,
    offsets_ptr,
    rows_ptr,
    slot_ptr,
    choice_ptr,
    N,
    E,
    K,
    NP: tl.constexpr,
    EP: tl.constexpr,
    BJ: tl.constexpr,
):
    i = tl.arange(0, NP)
    ok = i < N
    e = tl.load(expert_ptr + i, mask=ok, other=0).to(tl.int32)
    e_hist = tl.where(ok, e, EP - 1)  # padding counts into a spare last bin
    counts = tl.histogram(e_hist, EP)
    bins = tl.arange(0, EP)
    counts = tl.where(bins < E, counts, 0)
    ends = tl.cumsum(counts, 0)
    tl.store(offsets_ptr + 1 + bins, ends.to(tl.int64), mask=bins < E)
    tl.store(offsets_ptr + bins, (ends - counts).to(tl.int64), mask=bins == 0)
    tl.debug_barrier()
    # rank of choice i among earlier choices of its expert (stable order)
    rank = tl.zeros((NP,), dtype=tl.int32)
    for j0 in range(0, N, BJ):
        j = j0 + tl.arange(0, BJ)
        ej = tl.load(expert_ptr + j, mask=j < N, other=-1).to(tl.int32)
        same = (ej[None, :] == e[:, None]) & (j[None, :] < i[:, None])
        rank += tl.sum(same.to(tl.int32), axis=1)
    start = tl.load(offsets_ptr + e, mask=ok, other=0)
    pos = start + rank.to(tl.int64)
    tl.store(choice_ptr + i, pos, mask=ok)
    tl.store(slot_ptr + pos, i.to(tl.int64), mask=ok)
    tl.store(rows_ptr + pos, (i // K).to(tl.int64), mask=ok)


def route_small_triton(expert_RK: Tensor, n_experts: int):
    """(offsets [E+1], rows [N], slot [N], choice [R, K]) as int64, for N <= MAX_N."""
    R, K = expert_RK.shape
    N = R * K
    dev = expert_RK.device
    offsets = torch.empty(n_experts + 1, dtype=torch.long, device=dev)
    rows = torch.empty(N, dtype=torch.long, device=dev)
    slot = torch.empty(N, dtype=torch.long, device=dev)
    choice = torch.empty(N, dtype=torch.long, device=dev)
    EP = max(16, triton.next_power_of_2(n_experts + 1))
    NP = max(16, triton.next_power_of_2(N))
    _route_small_kernel[(1,)](
        expert_RK.reshape(-1).contiguous(),
        offsets,
        rows,
        slot,
        choice,
        N,
        n_experts,
        K,
        NP=NP,
        EP=EP,
        BJ=min(NP, 64),
        num_warps=4,
    )
    return offsets, rows, slot, choice.view(R, K)
