"""Attention for MoEUT: SwitchHead (`switchhead`), the masks, RoPE and KV caches every attention shares
(`cache`), and attention classes by name and capability (`registry`)."""

from moeut.attention.cache import (
    AttentionMask,
    KVCache,
    attend,
    begin_static_step,
    build_mask,
    check_mask,
    end_static_step,
    frozen_inference_weights,
    new_static_cache,
)
from moeut.attention.registry import (
    DEFAULT,
    adds_residual,
    attention_class,
    attention_name,
    register_attention,
    registered_attentions,
    supports_static_cache,
)
from moeut.attention.switchhead import SwitchHeadRope

__all__ = [
    "DEFAULT",
    "AttentionMask",
    "KVCache",
    "SwitchHeadRope",
    "adds_residual",
    "attend",
    "attention_class",
    "attention_name",
    "begin_static_step",
    "build_mask",
    "check_mask",
    "end_static_step",
    "frozen_inference_weights",
    "new_static_cache",
    "register_attention",
    "registered_attentions",
    "supports_static_cache",
]

register_attention(DEFAULT, SwitchHeadRope)
