"""The paper's dense baseline: a pre-LayerNorm Transformer LM with RoPE attention and a ReLU FFN, as the
training code builds it (its `preln_rope` variant: FastRopeTransformerEncoderLayer blocks inside
TransformerLanguageModel, with the output LayerNorm that pre-LN variants get).

Same interface as `MoEUTLM` (forward(tokens, mask, kv_cache) -> MoEUTOutput, reg_loss always 0), so
the trainer, generator and evaluator treat both alike. Parameter-matched sizes: `profiles.Dense_*`.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from moeut.attention import AttentionMask, KVCache, attend, begin_static_step, check_mask, end_static_step
from moeut.model import MoEUTOutput, MultilayerKVCache, kv_cache_key_length, require, check_tokens
from moeut.moe import aligned_width_padding
from moeut.ops.norm import LayerNorm


class DenseLayer(torch.nn.Module):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_head: int,
        d_ff: int,
        dropout: float,
        rotate_fraction: float = 0.5,
        rope_base: float = 10000,
    ):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_head
        n_rotate = int(rotate_fraction * d_head)
        self.n_rotate = n_rotate - n_rotate % 2
        self.rope_base = rope_base
        self.ln1 = LayerNorm(d_model)
        self.qkv = torch.nn.Linear(d_model, 3 * n_heads * d_head, bias=False)
        self.o = torch.nn.Linear(n_heads * d_head, d_model, bias=False)
        self.ln2 = LayerNorm(d_model)
        self.ff1 = torch.nn.Linear(d_model, d_ff)
        self.ff2 = torch.nn.Linear(d_ff, d_model)
        self.drop = torch.nn.Dropout(dropout)
        self._inference_weight: Optional[Tuple[Tensor, Tensor, Tensor]] = None  # see `_freeze_inference_weight`
        self._inference_weight_frozen = False

    def forward(self, x: Tensor, mask: Optional[AttentionMask], kv_cache: KVCache):
        B, T, _ = x.shape
        h, x = self.ln1.normalize_and_pass(x)  # the residual's gradient is added in the LayerNorm's backward
        q, k, v = self.qkv(h).view(B, T, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
        # d_head^-0.5 split over q and k, as MoEUT does: without gradients both rotate in one launch
        scale = self.d_head**-0.25
        att, kv_cache = attend(q, k, v, mask, kv_cache, self.n_rotate, self.rope_base, q_scale=scale, k_scale=scale)
        x = x + self.drop(self.o(att.transpose(1, 2).reshape(B, T, -1)))
        h, x = self.ln2.normalize_and_pass(x)
        x = x + self.drop(self.ffn(h))
        return x, kv_cache

    def ffn(self, x: Tensor) -> Tensor:
        """ReLU MLP. A hidden width that is not a multiple of 8 (4110 at 244M) is zero-padded for the
        product (the extra units are relu(0) = 0 and get no gradient): the same alignment care as
        MoEUT's router gets (`SigmaMoE.selector_logits`)."""
        if self._inference_weight_frozen and not torch.is_grad_enabled():  # decoding: padded once per call
            w1, b1, w2 = self._inference_weight
            return F.linear(F.relu(F.linear(x, w1, b1)), w2, self.ff2.bias)
        pad = aligned_width_padding(self.ff1.out_features, x)
        if not pad:
            return self.ff2(F.relu(self.ff1(x)))
        h = F.relu(F.linear(x, F.pad(self.ff1.weight, (0, 0, 0, pad)), F.pad(self.ff1.bias, (0, pad))))
        return F.linear(h, F.pad(self.ff2.weight, (0, pad)), self.ff2.bias)

    @torch.no_grad()
    def _freeze_inference_weight(self) -> None:
        """For `attention.frozen_inference_weights` (one `generate` call): the FFN weights padded to an
        aligned hidden width once, refreshed in place (kept CUDA graphs read them), for any number of
        rows, where the per-forward padding only pays for many rows."""
        pad = -self.ff1.out_features % 8
        w1, b1, w2 = self.ff1.weight, self.ff1.bias, self.ff2.weight
        shapes = ((w1.shape[0] + pad, w1.shape[1]), (b1.shape[0] + pad,), (w2.shape[0], w2.shape[1] + pad))
        kept = self._inference_weight
        if (
            kept is None
            or [t.shape for t in kept] != [torch.Size(s) for s in shapes]
            or kept[0].dtype != w1.dtype
            or kept[0].device != w1.device
        ):
            kept = self._inference_weight = tuple(w1.new_zeros(s) for s in shapes)
        kept[0][: w1.shape[0]].copy_(w1)
        kept[1][: b1.shape[0]].copy_(b1)
        kept[2][:, : w2.shape[1]].copy_(w2)
        self._inference_weight_frozen = True


class DenseLM(torch.nn.Module):
    def __init__(
        self,
        n_tokens: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_ff: int,
        d_head: Optional[int] = None,
        dropout: float = 0.0,
        scale_embedding: bool = False,
    ):
        super().__init__()
        for name, v in dict(n_tokens=n_tokens, d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_ff=d_ff).items():
            require(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}")
        require(
            d_head is not None or d_model % n_heads == 0,
            f"n_heads ({n_heads}) must divide d_model ({d_model}) when d_head is None",
        )
        d_head = d_head or d_model // n_heads
        self.n_tokens = n_tokens
        self.n_layers = n_layers
        # The training code's TransformerLanguageModel multiplies the embedding by `embedding_scale`, which
        # it initialises to sqrt(d_model), but its task sets `model.embedding_scale = 1.0` for every pre-LN
        # variant, this one included (`create_model` in tasks/transformer_lm_mixin.py, the `is_preln()`
        # branch): the paper's baseline has no scale. `scale_embedding=True` gives the sqrt(d_model) that
        # runs made between 2026-12-04 and 2026-12-07 used (they record it; `models.model_kwargs_of_run`).
        self.embedding_scale = math.sqrt(d_model) if scale_embedding else 1.0
        self.embedding = torch.nn.Embedding(n_tokens, d_model)
        self.layers = torch.nn.ModuleList(DenseLayer(d_model, n_heads, d_head, d_ff, dropout) for _ in range(n_layers))
        self.out_norm = LayerNorm(d_model)
        self.lm_head = torch.nn.Linear(d_model, n_tokens)
        self.activation_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The training code's pre-LN initialisation (`reset_prenorm_params` in its
        layers/transformer/transformer.py, applied to every FastRopeTransformerEncoderLayer): each linear
        layer of a block is drawn from a truncated normal (±2) and rescaled to a standard deviation of
        exactly sqrt(2 / (n_layers * fan_in)), biases zero, LayerNorms 1 / 0. Its attention keeps Q and
        the joint KV as two linear layers, each rescaled by its own empirical deviation; `qkv` holds
        them as row blocks, so the two blocks are rescaled separately. The embedding is kaiming-normal
        (fan_in, linear) and the output layer keeps PyTorch's default, as in its
        TransformerLanguageModel."""
        torch.nn.init.kaiming_normal_(self.embedding.weight, mode="fan_in", nonlinearity="linear")
        n_layers = len(self.layers)
        for layer in self.layers:
            q_rows = layer.qkv.weight.shape[0] // 3
            blocks = [
                layer.qkv.weight[:q_rows],
                layer.qkv.weight[q_rows:],
                layer.o.weight,
                layer.ff1.weight,
                layer.ff2.weight,
            ]
            for w in blocks:
                torch.nn.init.trunc_normal_(w)
                w.mul_(math.sqrt(2 / (n_layers * w.shape[1])) / w.std())
            torch.nn.init.zeros_(layer.ff1.bias)
            torch.nn.init.zeros_(layer.ff2.bias)
            for norm in (layer.ln1, layer.ln2):
                torch.nn.init.ones_(norm.weight)
                torch.nn.init.zeros_(norm.bias)

    def forward(
        self, x: Tensor, mask: Optional[AttentionMask] = None, kv_cache: MultilayerKVCache = None
    ) -> MoEUTOutput:
        check_tokens(x, self.n_tokens)
        B, T = x.shape
        S = kv_cache_key_length(kv_cache, B, self.n_layers, T)
        if mask is None:
            mask = AttentionMask(None, None, is_causal=True)
        check_mask(mask, B, T, S)
        h = self.embedding(x.long())
        if self.embedding_scale != 1.0:
            h = h * self.embedding_scale
        new_cache = {}
        shared_step = begin_static_step(kv_cache, mask, T, x.device)
        for i, layer in enumerate(self.layers):
            cache = kv_cache.get(i, {}) if kv_cache is not None else None
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                h, new_cache[i] = torch.utils.checkpoint.checkpoint(layer, h, mask, cache, use_reentrant=False)
            else:
                h, new_cache[i] = layer(h, mask, cache)
        if shared_step:
            end_static_step(kv_cache, T)
        logits = self.lm_head(self.out_norm(h))
        return MoEUTOutput(logits, h.new_zeros((), dtype=torch.float32), new_cache if kv_cache is not None else None)
