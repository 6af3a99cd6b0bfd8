"""Low-precision copies written by a kernel that touches the tensor anyway, for the next op that would cast it.

MoEUT's experts read the raw fp32 residual (peri-LayerNorm). Under bf16 autocast every application of
SwitchHead's value projection and of the σ-MoE FFN casts that residual to bf16 in its forward, and the
FFN and SwitchHead's output projection cast the residual's fp32 gradient to bf16 in their backward:
72 casts of [tokens, d_model] per 244M step, ~25 µs each on the H200 (read 4 bytes, write 2 per
element). The LayerNorm beside each of them reads that residual in its forward and writes that
gradient in its backward, so its kernels can write the bf16 copy too (2 bytes per element more) and
`offer` it here. The casting op calls `cast` instead of `.to`, and gets the copy.

Which tensor a copy belongs to is checked, never assumed. `cast(t, dtype)` hands the copy out only
when t is the offered tensor's data, unmodified: the same storage, offset and element count, both
contiguous, and the same version counter (an in-place write bumps it). This holds a reference to the
offered tensor, so its memory cannot be handed to another tensor meanwhile. In every other case,
`cast` is an ordinary `t.to(dtype)`. The worst a missed hand-over costs is one cast; it never
changes a value, because the kernels round exactly as `.to` does (round to nearest even).

Each copy is taken at most once. Up to MAX_OFFERS copies wait per device, the oldest dropped first: a
recomputing forward (activation checkpointing) offers its inputs' copies while a gradient's copy
still waits for the backward that triggered the recompute.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

MAX_OFFERS = 4
# device -> offers, oldest first: (the offered tensor, its version when offered, its low-precision copy)
_offers: Dict[torch.device, List[Tuple[Tensor, int, Tensor]]] = {}
# copies handed out since import (tests check that a step takes the ones it should)
taken = 0


def offer(source: Tensor, copy: Tensor) -> None:
    """`copy` holds `source`'s values rounded to copy.dtype; both contiguous, of the same shape."""
    if copy.shape != source.shape or not (copy.is_contiguous() and source.is_contiguous()):
        raise ValueError("cast_relay.offer: the copy must be contiguous and shaped like its contiguous source")
    waiting = _offers.setdefault(source.device, [])
    waiting.append((source, source._version, copy))
    del waiting[:-MAX_OFFERS]


def _same_data(a: Tensor, b: Tensor) -> bool:
    return (
        a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
        and a.numel() == b.numel()
        and a.is_contiguous()
        and b.is_contiguous()
    )


def take(t: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
    """The offered copy of t in `dtype`, shaped like t, or None."""
    global taken
    waiting = _offers.get(t.device)
    if not waiting or torch.compiler.is_compiling():
        return None
    for i, (source, version, copy) in enumerate(waiting):
        if copy.dtype == dtype and t._version == version and _same_data(source, t):
            del waiting[i]
            taken += 1
            return copy.view(t.shape)
    return None


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t.to(dtype), from the offered copy when there is one for t."""
    if t.dtype == dtype:
        return t
    copy = take(t, dtype)
    return t.to(dtype) if copy is None else copy


def clear() -> None:
    """Drop every offered copy (and the reference to its source)."""
    _offers.clear()
