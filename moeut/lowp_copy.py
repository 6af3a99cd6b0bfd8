"""The residual stream's low-precision copy, written by the top-k sum that produced it.

Under bf16 autocast, MoEUT's expert projections read the raw fp32 residual (peri-layernorm: the FFN's
experts and SwitchHead's value projection), so each rounded it to bf16 in a cast kernel of its own:
read 4 bytes, write 2 per element, ~27 µs per [16384, 1024] residual at 244M, two per layer
application. But the residual was just written by a top-k sum (the output projection's sum adds
x + attention, the FFN's adds x + FFN(x)), which can store its result a second time, rounded, for
~1/3 of the traffic. This module hands that copy from the sum to the next projection that rounds the
same tensor: one slot, holding the fp32 tensor (so its memory cannot be reused while the slot refers to
it), its version counter at the time of the copy (an in-place change since voids it) and the copy.
Anything else that rounds a tensor simply misses; the slot is overwritten by the next sum and
cleared at the end of each forward, so at most one copy (32 MB at 244M) is alive.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

# MOEUT_LOWP_COPY=0: the expert projections cast the residual themselves (benchmarks compare).
ENABLED = os.environ.get("MOEUT_LOWP_COPY", "1") != "0"

_slot: Optional[Tuple[Tensor, int, Tensor]] = None


def wanted(out_dtype: torch.dtype, dtype: torch.dtype) -> Optional[torch.dtype]:
    """The dtype a sum writing `out_dtype` should also write its result in (None: no copy)."""
    if not ENABLED or dtype == out_dtype or torch.compiler.is_compiling():
        return None
    return dtype


def remember(full: Tensor, lowp: Tensor) -> None:
    global _slot
    _slot = (full, full._version, lowp)


def recall(t: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
    """The remembered copy of t in `dtype` (as a view of t's shape), if t is the remembered tensor (or a
    contiguous view of all of it) and has not changed since."""
    if _slot is None:
        return None
    full, version, lowp = _slot
    if (lowp.dtype != dtype or t.data_ptr() != full.data_ptr() or t.numel() != full.numel()
            or not t.is_contiguous() or t._version != version or t.device != full.device):
        return None
    return lowp.view(t.shape)


def forget() -> None:
    global _slot
    _slot = None
