"""Attention classes by name, and what each can do.

A MoEUT layer builds its attention as `cls(d_model, n_heads, att_n_experts, projection_size=d_head,
moe_k=att_k, expert_dropout=...)` (the official interface). The registry names classes so that a
run can choose one (`--set attention=NAME`), record it in run.json and carry it into the export; a
class passed directly to `MoEUTLM(attention=cls)` needs no name but cannot be recorded.

What the model and the decoder use is asked of the module through class attributes, never its type:

    supports_static_cache   fills the preallocated KV cache of `cache.new_static_cache` (through
                            `cache.attend`): `generate`'s default cache, CUDA-graph decoding, compile
    adds_residual           `forward_with_logits(..., residual=x)` returns x + attention itself
    scaled_init             has `reset_parameters(std_scale)`, which `MoEUT.reset_parameters` calls
                            with the depth-scaled std (else the class initialises itself)

A class with none of them (the official interface only: `forward(q_src, k_src, v_src, mask,
kv_cache) -> (out, cache)`) works with the growing dict cache.
"""

from __future__ import annotations

from typing import Dict, Type

import torch

DEFAULT = "switchhead"
_CLASSES: Dict[str, Type[torch.nn.Module]] = {}


def register_attention(name: str, cls: Type[torch.nn.Module]) -> Type[torch.nn.Module]:
    """Make `cls` available as `attention=name`. A name already taken by another class is refused."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"attention name {name!r}: use a short identifier")
    if _CLASSES.get(name, cls) is not cls:
        raise ValueError(f"attention name {name!r} is already registered for {_CLASSES[name].__qualname__}")
    _CLASSES[name] = cls
    return cls


def attention_class(name: str) -> Type[torch.nn.Module]:
    if name not in _CLASSES:
        raise ValueError(
            f"unknown attention {name!r}; registered: {', '.join(sorted(_CLASSES))} "
            "(a class of your own: moeut.attention.register_attention, in the process that loads it)"
        )
    return _CLASSES[name]


def attention_name(cls) -> str | None:
    """The registered name of `cls`, or None."""
    return next((n for n, c in _CLASSES.items() if c is cls), None)


def registered_attentions() -> Dict[str, Type[torch.nn.Module]]:
    return dict(_CLASSES)


def supports_static_cache(module) -> bool:
    return bool(getattr(module, "supports_static_cache", False))


def adds_residual(module) -> bool:
    return bool(getattr(module, "adds_residual", False))
