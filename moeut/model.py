"""MoEUT: the shared-layer Universal Transformer with σ-MoE feed-forward and SwitchHead attention.

`group_size` G distinct layers are applied in the order A B A B ... for n_layers / G repeats.
Peri-layernorm: the residual path has no LayerNorm; attention's LayerNorm feeds Q, K and the routers
(V reads the raw residual); the FFN's LayerNorm feeds only the expert router.
LM: embedding -> MoEUT -> LayerNorm -> linear head (with bias).

The public API (names, constructor and forward signatures, `MoEUTOutput`, the KV-cache dict) is the
official release's; see README.md for the differences (its defects, fixed here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from moeut.ops import cast_relay
from moeut.attention import (
    AttentionMask,
    KVCache,
    SwitchHeadRope,
    adds_residual,
    attention_class,
    begin_static_step,
    check_mask,
    end_static_step,
)
from moeut.moe import SigmaMoE
from moeut.router import ACTIVATIONS, RouterLogits, negative_entropy, router_prob_sum
from moeut.ops.norm import LayerNorm
from moeut.ops.shared_weights import begin_share, end_share

MultilayerKVCache = Optional[Dict[int, KVCache]]


@dataclass
class MoEUTOutput:
    outputs: Tensor  # logits [B, T, V] (MoEUTLM) or hidden states [B, T, D] (MoEUT)
    reg_loss: Tensor  # 0-dim; entropy regularisation, 0 in eval mode
    cache: MultilayerKVCache  # updated KV cache when one was passed in, else None
    # Ours: detached FFN router logits per layer application ([B, T, E] each), only when the backbone's
    # `collect_router_logits` is set (the trainer's router statistics).
    router_logits: Optional[List[Tensor]] = None


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def validate_config(
    d_model: int,
    n_layers: int,
    n_heads: int,
    ff_expert_size: int,
    ff_n_experts: int,
    att_n_experts: int,
    d_head: Optional[int],
    att_k: int,
    ff_k: int,
    ff_expert_dropout: float,
    att_expert_dropout: float,
    dropout: float,
    group_size: int,
) -> None:
    """Reject inconsistent configurations at construction, naming the argument."""
    for name, v in dict(
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        ff_expert_size=ff_expert_size,
        ff_n_experts=ff_n_experts,
        att_n_experts=att_n_experts,
        att_k=att_k,
        ff_k=ff_k,
        group_size=group_size,
    ).items():
        require(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}")
    require(
        d_head is None or (isinstance(d_head, int) and d_head > 0),
        f"d_head must be a positive integer or None, got {d_head!r}",
    )
    require(
        n_layers % group_size == 0,
        f"n_layers ({n_layers}) must be a multiple of group_size ({group_size}); the official release "
        f"silently dropped the remainder",
    )
    require(
        d_head is not None or d_model % n_heads == 0,
        f"n_heads ({n_heads}) must divide d_model ({d_model}) when d_head is None",
    )
    require(ff_k <= ff_n_experts, f"ff_k ({ff_k}) must not exceed ff_n_experts ({ff_n_experts})")
    require(
        att_n_experts == 1 or att_k <= att_n_experts, f"att_k ({att_k}) must not exceed att_n_experts ({att_n_experts})"
    )
    for name, p in dict(
        ff_expert_dropout=ff_expert_dropout, att_expert_dropout=att_expert_dropout, dropout=dropout
    ).items():
        require(0.0 <= p < 1.0, f"{name} must be in [0, 1), got {p!r}")


class MoEUTLayer(torch.nn.Module):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        ff_expert_size: int,
        ff_n_experts: int,
        att_n_experts: int,
        d_head: Optional[int] = None,
        att_k: int = 2,
        ff_k: int = 8,
        ff_expert_dropout: float = 0.0,
        att_expert_dropout: float = 0.0,
        dropout: float = 0.0,
        attention=SwitchHeadRope,
        layer_norm: str = "peri",
        router_activation: str = "sigmoid",
    ):
        super().__init__()
        self.layer_norm = layer_norm
        if isinstance(attention, str):  # a registered name (`moeut.attention.registry`)
            attention = attention_class(attention)
        # (an attention class of the caller's sees the argument only when it is not the default)
        routing = {} if router_activation == "sigmoid" else {"router_activation": router_activation}
        self.attention = attention(
            d_model,
            n_heads,
            att_n_experts,
            projection_size=d_head,
            moe_k=att_k,
            expert_dropout=att_expert_dropout,
            **routing,
        )
        self.ffn = SigmaMoE(
            d_model,
            ff_n_experts,
            ff_expert_size,
            k=ff_k,
            expert_dropout=ff_expert_dropout,
            router_activation=router_activation,
        )
        # The experts read the raw residual: its LayerNorms also write the bf16 copies of it (forward) and of
        # its gradient (backward) that the expert projections would cast (`ops/cast_relay.py`).
        self.ln1 = LayerNorm(d_model, input_copy=att_n_experts > 1, grad_copy=True)
        self.ln2 = LayerNorm(d_model, input_copy=True, grad_copy=att_n_experts > 1)
        self.drop = torch.nn.Dropout(dropout)

    def forward_with_logits(
        self, x: Tensor, mask: Optional[AttentionMask] = None, kv_cache: KVCache = None, prob_sum: bool = False
    ):
        """(x, cache, ffn router logits, attention router logits (o, v) or None), as `RouterLogits`; with
        `prob_sum` the routers may compute the regulariser's softmax sums with their selections."""
        if self.layer_norm != "peri":
            return self._forward_pre_or_post(x, mask, kv_cache, prob_sum)
        # x's other uses take the pass-through copy: their gradient is added in the LayerNorm's backward
        xnorm, x = self.ln1.normalize_and_pass(x)
        if torch.is_autocast_enabled(x.device.type):
            # One low-precision copy for Q, K and both routers (autocast would make, and autograd
            # save, one per consumer). The fused LayerNorm (CUDA) already wrote it: then a no-op.
            xnorm = xnorm.to(torch.get_autocast_dtype(x.device.type))
        if adds_residual(self.attention) and not (
            self.training and self.drop.p > 0
        ):  # x + attention, added inside its output's top-k sum
            x, kv_cache, att_logits = self.attention.forward_with_logits(
                xnorm, xnorm, x, mask, kv_cache, residual=x, prob_sum=prob_sum
            )
        else:
            if hasattr(self.attention, "forward_with_logits"):
                att, kv_cache, att_logits = self.attention.forward_with_logits(
                    xnorm, xnorm, x, mask, kv_cache, prob_sum=prob_sum
                )
            else:  # a user-supplied attention class with the official interface
                (att, kv_cache), att_logits = self.attention(xnorm, xnorm, x, mask, kv_cache=kv_cache), None
            x = x + self.drop(att)
        xnorm, x = self.ln2.normalize_and_pass(x)
        x, ffn_logits = self.ffn.forward_with_logits(x, xnorm, add_input=True, prob_sum=prob_sum)  # x + FFN(x)
        return x, kv_cache, ffn_logits, att_logits

    def _forward_pre_or_post(self, x: Tensor, mask: Optional[AttentionMask], kv_cache: KVCache, prob_sum: bool):
        """The paper's two other layernorm placements, as the training code's RelativeMoeTransformerEncoderLayer
        computes them without `moe.nonorm`. pre: every input of the attention (queries, keys, values,
        routers) is ln1(x) and every input of the FFN (experts and router) ln2(x); post: the sublayers read
        x itself, and ln1 / ln2 normalise the residual stream after each addition."""
        h = self.ln1(x) if self.layer_norm == "pre" else x
        if hasattr(self.attention, "forward_with_logits"):
            att, kv_cache, att_logits = self.attention.forward_with_logits(h, h, h, mask, kv_cache, prob_sum=prob_sum)
        else:
            (att, kv_cache), att_logits = self.attention(h, h, h, mask, kv_cache=kv_cache), None
        x = x + self.drop(att)
        if self.layer_norm == "post":
            x = self.ln1(x)
        h = self.ln2(x) if self.layer_norm == "pre" else x
        ffn, ffn_logits = self.ffn.forward_with_logits(h, h, prob_sum=prob_sum)
        x = x + self.drop(ffn)
        if self.layer_norm == "post":
            x = self.ln2(x)
        return x, kv_cache, ffn_logits, att_logits

    def forward(
        self, x: Tensor, mask: Optional[AttentionMask] = None, kv_cache: KVCache = None
    ) -> Tuple[Tensor, KVCache]:
        x, kv_cache, _, _ = self.forward_with_logits(x, mask, kv_cache)
        return x, kv_cache


GROWING_CACHE_KEYS = {"k", "v"}
STATIC_CACHE_KEYS = {"capacity", "k", "v", "pos"}


def kv_cache_key_length(kv_cache: MultilayerKVCache, batch: int, n_layers: int, T: int) -> int:
    """Validate a multi-layer KV cache against the input; return the number of keys attention sees
    (cache length + T, or the capacity of a preallocated cache). A cache is empty (every entry
    absent or {}: the first call), or holds every layer with `k` and `v` of one shape
    [batch, heads, length, width]; anything else would attend to a wrong history, so it is refused."""
    if kv_cache is None:
        return T
    if not isinstance(kv_cache, dict):
        raise TypeError(f"kv_cache must be a dict (pass {{}} to start caching), got {type(kv_cache).__name__}")
    lengths, capacities, filled = set(), set(), 0
    for li, entry in kv_cache.items():
        if isinstance(li, bool) or not isinstance(li, int) or not 0 <= li < n_layers:
            raise ValueError(f"kv_cache has an entry for layer {li!r}; this model has layers 0..{n_layers - 1}")
        if not isinstance(entry, dict):
            raise ValueError(f"kv_cache entry for layer {li} must be a dict, got {type(entry).__name__}")
        if not entry:
            continue
        allowed = STATIC_CACHE_KEYS if "capacity" in entry else GROWING_CACHE_KEYS
        junk = sorted(map(str, set(entry) - allowed))
        if junk:
            raise ValueError(f"kv_cache entry for layer {li} has unknown keys {junk}; allowed: {sorted(allowed)}")
        if "capacity" in entry:  # preallocated (attention.new_static_cache)
            cap = entry["capacity"]
            if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
                raise ValueError(f"kv_cache entry for layer {li}: capacity must be a positive int, got {cap!r}")
            capacities.add(cap)
            if "k" in entry and entry["k"].shape[0] != batch:
                raise ValueError(
                    f"kv_cache was built for batch size {entry['k'].shape[0]}, but the input has batch size {batch}"
                )
            continue
        k, v = entry.get("k"), entry.get("v")
        if not isinstance(k, Tensor) or not isinstance(v, Tensor):
            raise ValueError(f"kv_cache entry for layer {li} must hold 'k' and 'v' tensors")
        if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
            raise ValueError(
                f"kv_cache entry for layer {li}: 'k' {tuple(k.shape)} and 'v' {tuple(v.shape)} must "
                "both be [batch, heads, length, width] of the same batch, heads and length"
            )
        if k.shape[0] != batch:
            raise ValueError(f"kv_cache was built for batch size {k.shape[0]}, but the input has batch size {batch}")
        lengths.add(k.shape[-2])
        filled += 1
    if capacities:
        if lengths or len(capacities) > 1 or len(kv_cache) != n_layers:
            raise ValueError("a preallocated kv_cache needs one entry of the same capacity for every layer")
        return capacities.pop()
    if filled and filled != n_layers:
        missing = [i for i in range(n_layers) if not kv_cache.get(i)]
        raise ValueError(
            f"kv_cache holds {filled} of this model's {n_layers} layers (missing layers {missing[:5]}): "
            "a cache must hold every layer, or none (pass {} to start)"
        )
    if len(lengths) > 1:
        raise ValueError(f"kv_cache layers have different lengths {sorted(lengths)}: the cache is inconsistent")
    return (lengths.pop() if lengths else 0) + T


class MoEUT(torch.nn.Module):
    def __init__(
        self,
        d_model: int,
        n_layers: int,
        n_heads: int,
        ff_expert_size: int,
        ff_n_experts: int,
        att_n_experts: int,
        d_head: Optional[int] = None,
        att_k: int = 2,
        ff_k: int = 8,
        ff_expert_dropout: float = 0.0,
        att_expert_dropout: float = 0.0,
        dropout: float = 0.0,
        entropy_reg: float = 0.01,
        att_entropy_reg: float = 0.001,
        attention=SwitchHeadRope,
        group_size: int = 2,
        *,
        group_type: str = "abab",
        layer_norm: str = "peri",
        router_activation: str = "sigmoid",
    ):
        super().__init__()
        require(group_type in ("abab", "aabb"), f"group_type must be 'abab' or 'aabb', got {group_type!r}")
        require(
            router_activation in ACTIVATIONS,
            f"router_activation must be one of {', '.join(ACTIVATIONS)}, got {router_activation!r}",
        )
        require(
            layer_norm in ("peri", "pre", "post"), f"layer_norm must be 'peri', 'pre' or 'post', got {layer_norm!r}"
        )
        self.group_type, self.layer_norm = group_type, layer_norm
        validate_config(
            d_model,
            n_layers,
            n_heads,
            ff_expert_size,
            ff_n_experts,
            att_n_experts,
            d_head,
            att_k,
            ff_k,
            ff_expert_dropout,
            att_expert_dropout,
            dropout,
            group_size,
        )
        self.d_model = d_model
        self.entropy_reg = entropy_reg
        self.att_entropy_reg = att_entropy_reg
        self.n_repeats = n_layers // group_size
        self.n_layers = n_layers
        # Recompute each layer application in the backward pass instead of storing its activations.
        self.activation_checkpointing = False
        self.collect_router_logits = False
        self.layers = torch.nn.ModuleList(
            [
                MoEUTLayer(
                    d_model,
                    n_heads,
                    ff_expert_size,
                    ff_n_experts,
                    att_n_experts,
                    d_head,
                    att_k,
                    ff_k,
                    ff_expert_dropout,
                    att_expert_dropout,
                    dropout,
                    attention,
                    layer_norm,
                    router_activation,
                )
                for _ in range(group_size)
            ]
        )
        self.reset_parameters()

    def application_order(self) -> List[Tuple[int, int]]:
        """(repeat, distinct layer) of each layer application in order: A B A B ... ("abab", the paper's
        default) or A A ... B B ... ("aabb", the training code's `transformer.universal.group_type`)."""
        if self.group_type == "aabb":
            return [(r, li) for li in range(len(self.layers)) for r in range(self.n_repeats)]
        return [(r, li) for r in range(self.n_repeats) for li in range(len(self.layers))]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # The training code scales the initialisation by sqrt(2 / n_layers) for the pre-LN family (peri
        # and pre) and not for post-LN (`std_scale` of RelativeMoeTransformerEncoderLayer).
        scale = math.sqrt(2 / (self.n_repeats * len(self.layers))) if self.layer_norm != "post" else 1.0
        for m in self.modules():
            if isinstance(m, SigmaMoE) or getattr(m, "scaled_init", False):  # (attention: `registry`)
                m.reset_parameters(scale)
            elif isinstance(m, torch.nn.LayerNorm):
                torch.nn.init.ones_(m.weight)
                torch.nn.init.zeros_(m.bias)

    def forward(
        self, x: Tensor, mask: Optional[AttentionMask] = None, kv_cache: MultilayerKVCache = None
    ) -> MoEUTOutput:
        if not torch.is_tensor(x) or x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"MoEUT input must be a [batch, time, d_model={self.d_model}] tensor, "
                f"got {tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}"
            )
        if not x.is_floating_point():
            raise TypeError(f"MoEUT input must be floating point, got {x.dtype}")
        B, T, _ = x.shape
        S = kv_cache_key_length(kv_cache, B, self.n_layers, T)
        if mask is None:
            mask = AttentionMask(None, None, is_causal=True)
        check_mask(mask, B, T, S)

        cast_relay.clear()  # a copy the last backward offered and nothing took (the embedding's gradient)
        shared_step = begin_static_step(kv_cache, mask, T, x.device)  # decoding: per-step tables for all layers
        # Entropy regularisation, streamed: per distinct layer, the router's softmax summed over the
        # positions of all its applications ([ffn, att-output, att-value] sums and the position count).
        prob_sums: List[List[Optional[Tensor]]] = [[None, None, None] for _ in self.layers]
        n_positions = [0 for _ in self.layers]
        new_cache = {}
        router_logits = [] if self.collect_router_logits else None
        checkpointing = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        # Under autocast, one low-precision copy of each expert weight serves all of this forward's
        # layer applications, and their weight gradients are summed in place (`ops/shared_weights.py`).
        autocast = torch.is_autocast_enabled(x.device.type)
        share = begin_share(torch.get_autocast_dtype(x.device.type) if autocast and not checkpointing else None)
        try:
            for li_abs, (_, li) in enumerate(self.application_order()):
                layer = self.layers[li]
                cache = kv_cache.get(li_abs, {}) if kv_cache is not None else None
                if checkpointing:
                    x, new_cache[li_abs], f_log, a_log = checkpoint(
                        layer.forward_with_logits, x, mask, cache, self.training, use_reentrant=False
                    )
                else:
                    x, new_cache[li_abs], f_log, a_log = layer.forward_with_logits(x, mask, cache, self.training)
                if router_logits is not None:
                    router_logits.append(f_log.logits.detach())
                if self.training:
                    n_positions[li] += f_log.logits.shape[1]
                    for which, router in enumerate([f_log] + list(a_log or ())):
                        s = router_prob_sum(router if isinstance(router, RouterLogits) else RouterLogits(router))
                        prev = prob_sums[li][which]
                        prob_sums[li][which] = s if prev is None else prev + s
        finally:
            end_share(share)

        if shared_step:
            end_static_step(kv_cache, T)
        reg_loss = x.new_zeros((), dtype=torch.float32)
        if self.training:
            for li in range(len(self.layers)):
                for which, p_sum in enumerate(prob_sums[li]):
                    if p_sum is not None:
                        weight = self.entropy_reg if which == 0 else self.att_entropy_reg
                        reg_loss = reg_loss + weight * negative_entropy(p_sum / n_positions[li])
        return MoEUTOutput(x, reg_loss, new_cache if kv_cache is not None else None, router_logits)


class MoEUTLM(torch.nn.Module):
    """The MoEUT language model: token embedding, the shared-layer `MoEUT` stack, a LayerNorm and a linear
    head (with bias). The paper's sizes are in `moeut.profiles` (`MoEUTLM(8000, **profiles.MoEUT_244M)`).

    Arguments: `n_tokens` vocabulary; `d_model`; `n_layers` layer applications, made of `group_size`
    distinct layers repeated (A B A B ...); `n_heads` SwitchHead heads of width `d_head` (default
    d_model / n_heads), each choosing `att_k` of `att_n_experts` value and output experts; a σ-MoE FFN of
    `ff_n_experts` experts of `ff_expert_size` ReLU units, `ff_k` chosen per token; `entropy_reg` and
    `att_entropy_reg` weight the routers' entropy regularisers (`out.reg_loss`, add it to the loss);
    dropouts; `group_type` ("abab" or "aabb") and `layer_norm` ("peri", "pre", "post") the paper's ablations;
    `router_activation` "sigmoid" (the paper's, with the fast kernels) or "softmax" (the reference path).
    docs/api.md has every argument, the mask and KV-cache formats."""

    def __init__(
        self,
        n_tokens: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        ff_n_experts: int,
        att_n_experts: int,
        d_head: Optional[int] = None,
        group_size: int = 2,
        ff_k: int = 8,
        att_k: int = 2,
        ff_expert_dropout: float = 0.0,
        att_expert_dropout: float = 0.0,
        ff_expert_size: int = 128,
        dropout: float = 0.0,
        entropy_reg: float = 0.01,
        att_entropy_reg: float = 0.001,
        attention=SwitchHeadRope,
        *,
        group_type: str = "abab",
        layer_norm: str = "peri",
        router_activation: str = "sigmoid",
    ):
        super().__init__()
        require(isinstance(n_tokens, int) and n_tokens > 0, f"n_tokens must be a positive integer, got {n_tokens!r}")
        self.transformer = MoEUT(
            d_model,
            n_layers,
            n_heads,
            ff_expert_size,
            ff_n_experts,
            att_n_experts,
            d_head,
            att_k,
            ff_k,
            ff_expert_dropout,
            att_expert_dropout,
            dropout,
            entropy_reg,
            att_entropy_reg,
            attention,
            group_size,
            group_type=group_type,
            layer_norm=layer_norm,
            router_activation=router_activation,
        )
        self.n_tokens = n_tokens
        self.n_layers = n_layers
        self.embedding = torch.nn.Embedding(n_tokens, d_model)
        self.lm_head = torch.nn.Linear(d_model, n_tokens)
        self.out_norm = LayerNorm(d_model, grad_copy=True)  # (the last FFN's output gradient, `cast_relay`)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        torch.nn.init.kaiming_normal_(self.embedding.weight, mode="fan_in", nonlinearity="linear")
        self.transformer.reset_parameters()

    def forward(
        self, x: Tensor, mask: Optional[AttentionMask] = None, kv_cache: MultilayerKVCache = None
    ) -> MoEUTOutput:
        """Logits for token ids `x` [B, T]: `MoEUTOutput(outputs [B, T, n_tokens], reg_loss, cache)`.
        `mask=None` is causal. `kv_cache={}` starts a cache and returns it in `out.cache`; pass that back
        with the next tokens to continue (the same logits as a forward over the whole sequence)."""
        check_tokens(x, self.n_tokens)
        if x.dtype != torch.int64 and x.dtype != torch.int32:
            x = x.long()
        out = self.transformer(self.embedding(x), mask, kv_cache)
        # post-LN ends in a LayerNorm already: the training code adds no output norm then (out_norm stays
        # in the state dict, unused)
        h = out.outputs if self.transformer.layer_norm == "post" else self.out_norm(out.outputs)
        out.outputs = self.lm_head(h)
        return out

    def generate_causal_attention_mask(self, sz: int) -> Tensor:
        return torch.triu(torch.ones(sz, sz, dtype=torch.bool, device=self.lm_head.weight.device), diagonal=1)


def check_tokens(x: Tensor, n_tokens: int) -> None:
    """Reject bad token input before it reaches an embedding (where CUDA would device-assert)."""
    if not torch.is_tensor(x):
        raise TypeError(f"tokens must be a tensor, got {type(x).__name__}")
    if x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"tokens must be an integer tensor (token ids), got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"tokens must have shape [batch, time], got {tuple(x.shape)}")
    if not x.numel() or torch.compiler.is_compiling():
        return
    if x.is_cuda and torch.cuda.is_current_stream_capturing():  # a CUDA graph allows no host sync
        return
    lo, hi = torch.aminmax(x)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= n_tokens:
        raise ValueError(f"token id out of range: ids must be in [0, {n_tokens}), got min {lo} max {hi}")
