"""The attention machinery shared by SwitchHead, the dense baseline and any registered attention class:
masks (`AttentionMask`), RoPE, the KV caches (the official growing dict and the preallocated static
cache that CUDA-graph decoding needs) and `attend`, which applies all of them around SDPA; and
`frozen_inference_weights`, the stretch of inference in which modules may prepare their weights once.

Shape suffixes follow the package legend (`moeut/__init__.py`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from moeut.ops.rope import rope_tables, rotate

KVCache = Optional[Dict[str, Tensor]]
_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class AttentionMask:
    """Boolean masks, True where attention is removed (the official release's convention).

    src_length_mask: [B, S] padding mask over keys. position_mask: [T, S'] (S' <= S; left-padded
    with "keep" when a cache makes S longer). `is_causal` is ours: a causal mask aligned to the end of
    the keys, without materialising it (lets attention use its fused causal kernels).
    """

    src_length_mask: Optional[Tensor]
    position_mask: Optional[Tensor]
    is_causal: bool = False


def _rope_qk(
    q: Tensor,
    k: Tensor,
    n_rotate: int,
    offset,
    base: float,
    q_scale: float = 1.0,
    k_scale: float = 1.0,
    step: Optional[dict] = None,
) -> Tuple[Tensor, Tensor]:
    """q_scale * RoPE(q), k_scale * RoPE(k) (the scales fused into the RoPE kernel on CUDA). With a
    shared decoding step (`begin_static_step`), the first layer's tables serve all layers."""
    if n_rotate == 0:
        return (q if q_scale == 1.0 else q * q_scale), (k if k_scale == 1.0 else k * k_scale)
    key = ("rope", n_rotate, base)
    tables = step.get(key) if step is not None else None
    if tables is None:
        tables = rope_tables(n_rotate, offset, q.shape[-2], base, q.device)
        if step is not None:
            step[key] = tables
    cos, sin = tables
    if q_scale == k_scale and _heads_adjacent(q, k):  # one launch for both
        H = q.shape[1]
        qk = rotate(q.as_strided((q.shape[0], 2 * H, *q.shape[2:]), q.stride(), q.storage_offset()), cos, sin, q_scale)
        return qk[:, :H], qk[:, H:]
    return rotate(q, cos, sin, q_scale), rotate(k, cos, sin, k_scale)


def _heads_adjacent(q: Tensor, k: Tensor) -> bool:
    """Whether k's heads follow q's in memory with the same strides, as when both are slices of one
    projection (dense's QKV, `SwitchHeadRope._project_joint`): then [q; k] is one strided tensor.
    Without gradients only (autograd of `as_strided` is slow)."""
    H = q.shape[1]
    if torch.is_grad_enabled() or torch.compiler.is_compiling():  # (no storage to compare while tracing)
        return False
    return (
        q.shape == k.shape
        and q.stride() == k.stride()
        and q.dtype == k.dtype
        and q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
        and k.storage_offset() == q.storage_offset() + H * q.stride(1)
    )


def _additive_mask(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean keep mask as 0 / -inf in `dtype`, stored with its rows padded to 16 elements: what the
    memory-efficient SDPA kernel wants, so it neither converts nor pads it on every call."""
    S = keep.shape[-1]
    padded = keep.new_zeros(*keep.shape[:-1], -(-S // 16) * 16, dtype=dtype)[..., :S]
    return padded.masked_fill_(~keep, float("-inf"))


def build_mask(mask: Optional[AttentionMask], B: int, T: int, S: int, device) -> Tuple[Optional[Tensor], bool]:
    """(boolean keep-mask broadcastable to [B, H, T, S] or None, use SDPA's is_causal)."""
    if mask is None:
        return None, False
    if mask.src_length_mask is None and mask.position_mask is None:
        if not mask.is_causal or T == 1:
            return None, False
        if T == S:
            return None, True
    drop = None
    if mask.is_causal and T > 1:
        q = torch.arange(S - T, S, device=device)
        drop = torch.arange(S, device=device)[None, :] > q[:, None]
    if mask.position_mask is not None:
        pm = mask.position_mask
        if pm.shape[-1] < S:
            pm = F.pad(pm, (S - pm.shape[-1], 0), value=False)
        drop = pm if drop is None else drop | pm
    if mask.src_length_mask is not None:
        sm = mask.src_length_mask[:, None, None, :]
        drop = sm if drop is None else drop | sm
    # A query that may see no key at all would give NaN (and NaN * 0 spreads through later layers);
    # let such rows (e.g. padding) see every key instead: their outputs are then finite and unused.
    drop = drop & ~drop.all(-1, keepdim=True)
    return ~drop, False


def check_mask(mask: Optional[AttentionMask], B: int, T: int, S: int) -> None:
    if mask is None:
        return
    if not isinstance(mask, AttentionMask):
        raise TypeError(f"mask must be an AttentionMask, got {type(mask).__name__}")
    if mask.src_length_mask is not None:
        m = mask.src_length_mask
        if m.dtype != torch.bool or tuple(m.shape) != (B, S):
            raise ValueError(
                f"mask.src_length_mask must be a bool tensor of shape [batch, keys] = {[B, S]}, "
                f"got {m.dtype} {list(m.shape)}"
            )
    if mask.position_mask is not None:
        m = mask.position_mask
        if m.dtype != torch.bool or m.dim() != 2 or m.shape[0] != T or m.shape[1] > S:
            raise ValueError(
                f"mask.position_mask must be a bool tensor of shape [queries, keys] with "
                f"{T} rows and at most {S} columns, got {m.dtype} {list(m.shape)}"
            )


def _sdpa(q: Tensor, k: Tensor, v: Tensor, keep: Optional[Tensor], causal: bool, allow_cudnn: bool) -> Tensor:
    if q.dtype != v.dtype:
        q, k = q.to(v.dtype), k.to(v.dtype)
    if q.is_cuda and not allow_cudnn:
        # cuDNN attention builds a new execution plan for every new shape (tens of ms): fine for
        # training's fixed shapes, ruinous for decoding or length-sorted scoring where shapes change.
        with sdpa_kernel(_NO_CUDNN):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=causal, scale=1.0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=causal, scale=1.0)


def new_static_cache(capacity: int) -> dict:
    """A per-layer entry for a preallocated KV cache of `capacity` positions (generation's fast path).

    The key and value buffers [B, H, capacity, Dh] are allocated by the first forward pass that uses
    the entry; `pos` (a device tensor) counts the filled positions, so a decoding step has fixed
    shapes and can be captured in a CUDA graph. With such a cache, attention is causal by absolute
    position and `src_length_mask` covers all `capacity` key slots. Writing past `capacity` is the
    caller's error (`generate` sizes the cache exactly).
    """
    return {"capacity": capacity}  # a Python int: a constant for torch.compile, not a tensor to read


def _check_static_mask(mask: Optional[AttentionMask]) -> None:
    if mask is not None and mask.position_mask is not None:  # checked before the cache is touched
        raise ValueError("a preallocated KV cache supports src_length_mask only (attention is causal by position)")


def _static_step(pos: Tensor, capacity: int, mask: Optional[AttentionMask], T: int) -> Dict[str, Tensor]:
    """Positions [T] of the new tokens and the keep mask over the cache's key slots."""
    # One decoding step reads its position as a view of the counter (no kernel).
    positions = pos.reshape(1) if T == 1 else pos + torch.arange(T, device=pos.device)
    drop = torch.arange(capacity, device=pos.device)[None, :] > positions[:, None]  # [T, S]: future and empty slots
    if mask is not None and mask.src_length_mask is not None:
        drop = drop | mask.src_length_mask[:, None, None, :]
    # A new token always sees itself; only prompt rows (e.g. left padding) can lose every key.
    keep = ~drop if T == 1 else ~(drop & ~drop.all(-1, keepdim=True))
    return {"positions": positions, "keep": keep}


def begin_static_step(kv_cache: Optional[Dict[int, dict]], mask: Optional[AttentionMask], T: int, device) -> bool:
    """Before the layers of one forward pass with a preallocated cache: compute the new tokens'
    positions and the key mask once for all layers (every layer's counter holds the same position,
    as they advance together). Returns whether it did (then call `end_static_step` after the last
    layer); caches of other kinds are left alone."""
    entries = list(kv_cache.values()) if kv_cache else []
    if not entries or not all("capacity" in e for e in entries):
        return False
    _check_static_mask(mask)
    for e in entries:
        if "pos" not in e:  # one counter per layer: torch.compile guards would tie a shared one to one call
            e["pos"] = torch.zeros((), dtype=torch.long, device=device)
    step = _static_step(entries[0]["pos"], entries[0]["capacity"], mask, T)
    for e in entries:
        e["step"] = step
    return True


def end_static_step(kv_cache: Dict[int, dict], T: int) -> None:
    """Advance every layer's position counter by T (one kernel on CUDA)."""
    for e in kv_cache.values():
        del e["step"]
    torch._foreach_add_([e["pos"] for e in kv_cache.values()], T)


def _attend_static(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[AttentionMask],
    kv_cache: Dict[str, Tensor],
    n_rotate: int,
    rope_base: float,
    q_scale: float,
    k_scale: float,
) -> Tuple[Tensor, KVCache]:
    _check_static_mask(mask)
    B, H, T, _ = q.shape
    C = kv_cache["capacity"]
    if "k" not in kv_cache:
        kv_cache["k"] = k.new_zeros(B, H, C, k.shape[-1])
        kv_cache["v"] = v.new_zeros(B, H, C, v.shape[-1])
    step = kv_cache.get("step")  # shared by all layers (`begin_static_step`), else computed here
    own_step = step is None
    if own_step:
        if "pos" not in kv_cache:
            kv_cache["pos"] = torch.zeros((), dtype=torch.long, device=q.device)
        step = _static_step(kv_cache["pos"], C, mask, T)
    positions = step["positions"]
    q, k = _rope_qk(q, k, n_rotate, positions, rope_base, q_scale, k_scale, step)
    kv_cache["k"].index_copy_(2, positions, k.to(kv_cache["k"].dtype))
    kv_cache["v"].index_copy_(2, positions, v.to(kv_cache["v"].dtype))
    if own_step:
        kv_cache["pos"].add_(T)
    key = ("additive_mask", kv_cache["v"].dtype)  # converted once per step, not by SDPA in every layer
    if key not in step:
        step[key] = _additive_mask(step["keep"], kv_cache["v"].dtype)
    out = _sdpa(q, kv_cache["k"], kv_cache["v"], step[key], False, allow_cudnn=False)
    return out, kv_cache


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[AttentionMask],
    kv_cache: KVCache,
    n_rotate: int,
    rope_base: float,
    q_scale: float = 1.0,
    k_scale: float = 1.0,
) -> Tuple[Tensor, KVCache]:
    """RoPE + KV cache + masked SDPA on q, k, v [B, H, T, Dh]; attention logits are
    (q_scale q) . (k_scale k) with no further scaling. Returns [B, H, T, Dh].

    The cache stores keys after rotation, so new queries are rotated at their true positions
    (the official release rotated them from 0, which broke cached decoding). A cache entry made by
    `new_static_cache` is preallocated and filled in place.
    """
    if kv_cache is not None and "capacity" in kv_cache:
        return _attend_static(q, k, v, mask, kv_cache, n_rotate, rope_base, q_scale, k_scale)
    offset = 0
    if kv_cache is not None and "k" in kv_cache:
        offset = kv_cache["k"].shape[-2]
    q, k = _rope_qk(q, k, n_rotate, offset, rope_base, q_scale, k_scale)
    if kv_cache is not None:
        if "k" in kv_cache:
            k = torch.cat([kv_cache["k"].to(k.dtype), k], dim=-2)
            v = torch.cat([kv_cache["v"].to(v.dtype), v], dim=-2)
        kv_cache = {"k": k, "v": v}
    B, _, T, _ = q.shape
    keep, causal = build_mask(mask, B, T, k.shape[-2], q.device)
    # Training (gradients on, no mask, no cache) has fixed shapes; inference generally does not.
    out = _sdpa(q, k, v, keep, causal, allow_cudnn=torch.is_grad_enabled() and kv_cache is None and keep is None)
    return out, kv_cache


@contextmanager
def frozen_inference_weights(model: torch.nn.Module):
    """For a stretch of inference in which the weights do not change (one `generate` call): every
    module with a `_freeze_inference_weight` method prepares its inference weights once on entry
    instead of at every forward (SwitchHead concatenates its Q/K/selector weights; the dense
    baseline pads its FFN to an aligned width). The prepared tensors keep their addresses from one
    stretch to the next, so a CUDA graph captured in an earlier stretch reads the refreshed values."""
    modules = [m for m in model.modules() if hasattr(m, "_freeze_inference_weight")]
    before = [m._inference_weight_frozen for m in modules]
    for m in modules:
        m._freeze_inference_weight()
    try:
        yield
    finally:
        for m, was in zip(modules, before):
            m._inference_weight_frozen = was
