"""Triton kernels for `route()`: the stable sort of the (row, choice) pairs by expert.

Small inputs (decoding): the sort, the expert offsets and the inverse permutation in one program
instead of ~8 kernels (int cast, radix sort, searchsorted, arange, scatter, divide).

With N = rows * K choices (N <= MAX_N): counts by histogram, offsets by cumulative sum, and each
choice's rank among earlier choices of the same expert by comparing it with all earlier ones (N^2/2
comparisons: cheap for decode's N <= a few hundred).

Large inputs (training, `route_large_triton`): the same in blocks, as a counting sort in four
launches (see the comment above its kernels).
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
def _route_small_kernel(expert_ptr, offsets_ptr, rows_ptr, slot_ptr, choice_ptr, N, E, K,
                        NP: tl.constexpr, EP: tl.constexpr, BJ: tl.constexpr):
    i = tl.arange(0, NP)
    ok = i < N
    e = tl.load(expert_ptr + i, mask=ok, other=0).to(tl.int32)
    e_hist = tl.where(ok, e, EP - 1)                       # padding counts into a spare last bin
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
    _route_small_kernel[(1,)](expert_RK.reshape(-1).contiguous(), offsets, rows, slot, choice, N, n_experts, K,
                              NP=NP, EP=EP, BJ=min(NP, 64), num_warps=4)
    return offsets, rows, slot, choice.view(R, K)


# Larger inputs (training): a stable counting sort in four launches instead of torch's int cast, radix
# sort, searchsorted, arange and divide. Blocks of BLOCK choices: (1) each block's histogram over the
# experts; (2) per expert, an exclusive prefix sum of those counts over the blocks, and its total; (3)
# the expert offsets from the totals; (4) each choice's position: its expert's offset, plus the
# counts of earlier blocks, plus its rank among earlier choices of its expert in its own block
# (BLOCK^2/2 comparisons per block). Equal to torch.sort(stable=True) element for element.
# Not measured on a GPU yet: off unless MOEUT_ROUTE_LARGE=1 (`expert_mm.route`).
BLOCK = 256
MAX_BLOCKS = 4096      # the prefix kernel holds [blocks, BE] counts in one program
MAX_LARGE_N = BLOCK * MAX_BLOCKS


@triton.jit
def _route_block_counts_kernel(expert_ptr, counts_ptr, N, E, EP: tl.constexpr, BN: tl.constexpr):
    b = tl.program_id(0)
    i = b * BN + tl.arange(0, BN)
    ok = i < N
    e = tl.load(expert_ptr + i, mask=ok, other=0).to(tl.int32)
    counts = tl.histogram(tl.where(ok, e, EP - 1), EP)   # padding counts into a spare last bin
    bins = tl.arange(0, EP)
    tl.store(counts_ptr + b.to(tl.int64) * EP + bins, counts, mask=bins < E)


@triton.jit
def _route_block_prefix_kernel(counts_ptr, totals_ptr, NB, E, EP: tl.constexpr, NBP: tl.constexpr,
                               BE: tl.constexpr):
    """In place: counts[b, e] becomes the number of expert e's choices in blocks before b."""
    es = tl.program_id(0) * BE + tl.arange(0, BE)
    bs = tl.arange(0, NBP)
    m = (bs < NB)[:, None] & (es < E)[None, :]
    ptrs = counts_ptr + bs[:, None].to(tl.int64) * EP + es[None, :]
    c = tl.load(ptrs, mask=m, other=0)
    tl.store(ptrs, tl.cumsum(c, 0) - c, mask=m)
    tl.store(totals_ptr + es, tl.sum(c, 0), mask=es < E)


@triton.jit
def _route_offsets_kernel(totals_ptr, offsets_ptr, E, EP: tl.constexpr):
    es = tl.arange(0, EP)
    ends = tl.cumsum(tl.load(totals_ptr + es, mask=es < E, other=0), 0).to(tl.int64)
    tl.store(offsets_ptr + 1 + es, ends, mask=es < E)
    tl.store(offsets_ptr + es, tl.zeros_like(ends), mask=es == 0)


@triton.jit
def _route_place_kernel(expert_ptr, prefix_ptr, offsets_ptr, rows_ptr, slot_ptr, N, K,
                        EP: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr):
    b = tl.program_id(0)
    i = b * BN + tl.arange(0, BN)
    ok = i < N
    e = tl.load(expert_ptr + i, mask=ok, other=0).to(tl.int32)
    rank = tl.zeros((BN,), dtype=tl.int32)
    for j0 in range(0, BN, BJ):   # earlier choices of the same expert in this block
        j = b * BN + j0 + tl.arange(0, BJ)
        ej = tl.load(expert_ptr + j, mask=j < N, other=-1).to(tl.int32)
        same = (ej[None, :] == e[:, None]) & (j[None, :] < i[:, None])
        rank += tl.sum(same.to(tl.int32), axis=1)
    start = tl.load(offsets_ptr + e, mask=ok, other=0)
    earlier_blocks = tl.load(prefix_ptr + b.to(tl.int64) * EP + e, mask=ok, other=0)
    pos = start + (earlier_blocks + rank).to(tl.int64)
    tl.store(slot_ptr + pos, i.to(tl.int64), mask=ok)
    tl.store(rows_ptr + pos, (i // K).to(tl.int64), mask=ok)


def route_large_triton(expert_RK: Tensor, n_experts: int, block: int = None):
    """(offsets [E+1], rows [N], slot [N]) as int64, for N <= MAX_LARGE_N and E < MAX_EXPERTS."""
    block = block or BLOCK
    R, K = expert_RK.shape
    N = R * K
    dev = expert_RK.device
    flat = expert_RK.reshape(-1).contiguous()
    offsets = torch.empty(n_experts + 1, dtype=torch.long, device=dev)
    rows = torch.empty(N, dtype=torch.long, device=dev)
    slot = torch.empty(N, dtype=torch.long, device=dev)
    if N == 0:
        return offsets.zero_(), rows, slot
    EP = max(16, triton.next_power_of_2(n_experts + 1))
    NB = triton.cdiv(N, block)
    if NB > MAX_BLOCKS or EP > MAX_EXPERTS:
        raise ValueError(f"route_large_triton: {N} choices in blocks of {block} ({NB} blocks; at most "
                         f"{MAX_BLOCKS}) over {n_experts} experts (at most {MAX_EXPERTS - 1}): use torch's sort")
    NBP = max(16, triton.next_power_of_2(NB))
    BE = max(1, min(EP, 16384 // NBP))
    counts = torch.empty(NB, EP, dtype=torch.int32, device=dev)
    totals = torch.empty(EP, dtype=torch.int32, device=dev)
    _route_block_counts_kernel[(NB,)](flat, counts, N, n_experts, EP=EP, BN=block, num_warps=4)
    _route_block_prefix_kernel[(triton.cdiv(n_experts, BE),)](counts, totals, NB, n_experts, EP=EP, NBP=NBP,
                                                              BE=BE, num_warps=8)
    _route_offsets_kernel[(1,)](totals, offsets, n_experts, EP=EP, num_warps=4)
    _route_place_kernel[(NB,)](flat, counts, offsets, rows, slot, N, K, EP=EP, BN=block, BJ=min(block, 32),
                               num_warps=4)
    return offsets, rows, slot
