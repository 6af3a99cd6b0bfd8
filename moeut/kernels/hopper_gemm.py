"""The gathered expert GEMM on quack's Hopper kernels (optional: `pip install moeut[hopper]`).

    out[n] = x[rows[n]] @ w[expert of n]          rows sorted by expert, expert e owns offsets[e]:offsets[e+1]

This is `moeut::grouped_mm` with a row gather and nothing else (no scale, no scatter, no ReLU): the
FFN down projection's input gradient, dh = d out[token] @ W2[e]^T. quack (`quack-kernels`, on NVIDIA's
CuTe DSL) runs it as one persistent, warp-specialised TMA + wgmma kernel over variable-length row
groups (`cu_seqlens_m` = offsets) with the A rows gathered by index (`A_idx` = rows). Measured against
our Triton kernel at the FFN shapes on an H100 (16384 tokens): 1.22× at MoEUT_1B, 1.10× at
MoEUT_244M, with the 192 × 128 pingpong tile below. The other expert passes stay on Triton: quack has
no gate or scatter epilogue, its fused-activation GEMM does not build with CuTe DSL 4.8, and its
weight gradient only wins over ours when all nine applications' operands are first copied into one
regrouped buffer.

Constraints: sm90 (the kernels are Hopper-only), 16-bit operands with 16-byte aligned rows, int32
offsets and indices (converted here). The first call of each shape class compiles (seconds); the
trainer's eager warm-up steps do that before a CUDA graph is captured. Deterministic: no split-K, so
every output element is one accumulation in a fixed order.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from moeut.settings import settings

# The tile that won the down-dx sweep at both FFN shapes (benchmarks/quack_experts.py); a gathered A
# needs cluster_n = 1, a 2-CTA cluster along M shares each weight tile between two row tiles.
TILE_M, TILE_N, PINGPONG, CLUSTER_M = 192, 128, True, 2


@functools.lru_cache(maxsize=None)
def _quack_interface():
    """quack's GEMM interface and our config, or None when quack is not installed or does not import."""
    try:
        from quack import gemm_interface
        from quack.gemm_config import GemmConfig
    except Exception:   # not installed, or a CuTe DSL / CUDA mismatch: the Triton path serves
        return None
    config = GemmConfig(tile_m=TILE_M, tile_n=TILE_N, pingpong=PINGPONG, cluster_m=CLUSTER_M, cluster_n=1,
                        is_dynamic_persistent=False, device_capacity=9)
    return gemm_interface, config


@functools.lru_cache(maxsize=None)
def _is_sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == (9, 0)


def is_plain_gather(x: Tensor, weight: Tensor, rows: Optional[Tensor], scale: Optional[Tensor],
                    dst: Optional[Tensor], relu: bool) -> bool:
    """The call's form and operands are what the kernel takes: a row gather and nothing else, 16-bit
    operands of one dtype, rows of x and w 16-byte aligned (TMA)."""
    return (rows is not None and scale is None and dst is None and not relu
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and x.shape[1] % 8 == 0 and weight.shape[2] % 8 == 0 and x.stride(1) == 1)


def handles(x: Tensor, weight: Tensor, rows: Optional[Tensor], scale: Optional[Tensor], dst: Optional[Tensor],
            relu: bool) -> bool:
    """Whether this call of `moeut::grouped_mm` runs here: `settings.hopper_gemm` on, a plain gathered
    product (`is_plain_gather`) of CUDA tensors on an sm90 GPU, and quack importable."""
    if not settings.hopper_gemm or x.device.type != "cuda" or not is_plain_gather(x, weight, rows, scale, dst, relu):
        return False
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return _is_sm90(index) and _quack_interface() is not None


def gather_mm_hopper(x_RI: Tensor, w_EIO: Tensor, offsets_E1: Tensor, rows_N: Tensor) -> Tensor:
    """[N, O]: row n is x[rows[n]] @ w[expert of n] (call only where `handles` is true)."""
    gemm_interface, config = _quack_interface()
    out_NO = torch.empty(rows_N.shape[0], w_EIO.shape[2], device=x_RI.device, dtype=x_RI.dtype)
    if out_NO.numel() == 0:
        return out_NO
    gemm_interface.gemm_tuned.fn(x_RI, w_EIO, out_NO, cu_seqlens_m=offsets_E1.to(torch.int32),
                                 A_idx=rows_N.to(torch.int32), config=config)
    return out_NO
