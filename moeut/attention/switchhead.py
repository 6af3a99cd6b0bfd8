"""SwitchHead (Csordás et al. 2023) with RoPE: the attention of MoEUT.

Q and K are dense. Each head has `n_experts` value and output projections; a router per head picks
the top `moe_k` for V (the router reads the normalised input) and for O (it reads the normalised query
input), with the routing of `moeut.router`. With n_experts == 1 it is plain multi-head attention whose
per-head output is multiplied by a sigmoid gate of the input.

Capabilities (`registry`): it fills the preallocated static KV cache (`supports_static_cache`) and
adds the residual inside its output projection's top-k sum (`adds_residual`).

Shape suffixes follow the package legend (`moeut/__init__.py`); here E counts the experts of one head.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from moeut.attention.cache import AttentionMask, KVCache, attend
from moeut.moe import aligned_width_padding
from moeut.ops.expert_gemv import gemv_applies, project
from moeut.ops.expert_mm import ResidualGradRelay, expert_mm_combine, route
from moeut.router import RouterLogits, check_activation, select_experts


class SwitchHeadRope(torch.nn.Module):
    supports_static_cache = True  # capabilities: see `registry`
    adds_residual = True
    scaled_init = True

    def __init__(
        self,
        state_size: int,
        n_heads: int,
        n_experts: int,
        dropout: float = 0.0,
        projection_size: Optional[int] = None,
        expert_dropout: float = 0.0,
        moe_k: int = 2,
        rotate_fraction: float = 0.5,
        rope_base: float = 10000,
        router_activation: str = "sigmoid",
    ):
        super().__init__()
        self.input_size = self.output_size = state_size
        self.n_heads = n_heads
        self.n_experts = n_experts
        self.moe_k = moe_k
        self.expert_dropout = expert_dropout
        self.router_activation = check_activation(router_activation)
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        self.projection_size = projection_size or state_size // n_heads
        # RoPE needs pairs of channels: an odd rotary width (e.g. 41 of the 44M model's 82) is rounded
        # down, as the paper's training code does (the official release crashed on it).
        n_rotate = int(rotate_fraction * self.projection_size)
        self.n_rotate = n_rotate - n_rotate % 2
        self.rope_base = rope_base

        H, Dh, D, E = n_heads, self.projection_size, state_size, n_experts
        self.q = torch.nn.Linear(D, H * Dh, bias=False)
        self.k = torch.nn.Linear(D, H * Dh, bias=False)
        if E > 1:
            self.v = torch.nn.Parameter(torch.empty(H * E, D, Dh))
            self.o = torch.nn.Parameter(torch.empty(H * E, Dh, D))
            self.sel_v = torch.nn.Parameter(torch.empty(H * E, D))
        else:
            self.v = torch.nn.Parameter(torch.empty(H * Dh, D))
            self.o = torch.nn.Parameter(torch.empty(D, H * Dh))
        self.sel_o = torch.nn.Parameter(torch.empty(H * E, D))
        # Head h's experts are numbered h*E .. h*E+E-1 in the routing (not saved in state dicts).
        self.register_buffer("head_base", torch.arange(H).unsqueeze(-1) * E, persistent=False)
        self._inference_weight: Optional[Tensor] = None  # see `frozen_inference_weights`
        self._inference_weight_frozen = False

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute `head_base` (derived, never saved): for a model built on the meta device and then
        given its weights, as transformers' `from_pretrained` does."""
        H, E = self.head_base.shape[0], self.n_experts
        self.head_base.copy_(torch.arange(H, device=self.head_base.device).unsqueeze(-1) * E)

    @torch.no_grad()
    def reset_parameters(self, std_scale: float) -> None:
        if self.n_experts > 1:
            torch.nn.init.normal_(self.sel_v, 0, std_scale / math.sqrt(self.input_size))
            self._renorm_rows(self.sel_v)
        torch.nn.init.normal_(self.sel_o, 0, std_scale / math.sqrt(self.input_size))
        self._renorm_rows(self.sel_o)
        torch.nn.init.normal_(self.k.weight, 0, std_scale / math.sqrt(self.input_size))
        torch.nn.init.normal_(self.q.weight, 0, std_scale / math.sqrt(self.input_size))
        torch.nn.init.normal_(self.v, 0, std_scale / math.sqrt(self.input_size))
        torch.nn.init.normal_(self.o, 0, std_scale / math.sqrt(self.n_heads * self.projection_size))

    @staticmethod
    def _renorm_rows(x: Tensor) -> None:
        std_rows = x.std(dim=-1, keepdim=True)
        x.div_(x.norm(dim=-1, keepdim=True))
        x.mul_(std_rows / x.std())

    def _inference_parts(self):
        return [self.q.weight, self.k.weight] + ([self.sel_v] if self.n_experts > 1 else []) + [self.sel_o]

    def _project_joint(self, x: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
        """(q, k [B, T, H*Dh], V- and O-selector logits [B, T, H*E]) of one input in one matmul.

        Q, K and both selectors read the same normalised input, so one product with their
        concatenated weights replaces four: in training one GEMM each for the output, the input
        gradient (accumulated in fp32 and rounded once, where four bf16 gradients were summed) and
        the weight gradient, instead of four; in decoding and scoring one launch instead of four. Saved activations are unchanged:
        autocast's bf16 copy of the input was saved once before too (counted per tensor; benchmarks/LOG.md).
        The weights are concatenated at every call, except inside `frozen_inference_weights` (no
        gradients): a copy kept otherwise would miss in-place updates made through `.data`, which
        no version counter records."""
        parts = self._inference_parts()
        sizes = [p.shape[0] for p in parts]
        if self._inference_weight_frozen and not torch.is_grad_enabled():
            w = self._inference_weight
        else:
            w = torch.cat(parts)
            # e.g. 2 * 512 + 4 outputs with one expert per head: zero rows up to a multiple of 8, as
            # the FFN router does (misaligned output rows put cuBLAS on slow kernels)
            pad = aligned_width_padding(w.shape[0], x)
            if pad:
                w = F.pad(w, (0, 0, 0, pad))
        out = F.linear(x, w)[..., : sum(sizes)]
        if torch.is_grad_enabled():
            # The selector logits are kept until the backward (entropy regulariser): a small copy of
            # their own, so that they do not keep the whole [B, T, 2*H*Dh + ...] output alive.
            q, k, sel = out.split([sizes[0], sizes[1], sum(sizes[2:])], dim=-1)
            sels = sel.contiguous().split(sizes[2:], dim=-1)
        else:
            q, k, *sels = out.split(sizes, dim=-1)
        return q, k, (sels[0] if self.n_experts > 1 else None), sels[-1]

    @torch.no_grad()
    def _freeze_inference_weight(self) -> None:
        """Refresh the concatenated weight in place (its address survives, for kept CUDA graphs)."""
        parts = self._inference_parts()
        shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])
        w = self._inference_weight
        if w is None or w.shape != shape or w.dtype != parts[0].dtype or w.device != parts[0].device:
            w = self._inference_weight = parts[0].new_empty(shape)
        torch.cat(parts, out=w)
        self._inference_weight_frozen = True

    def _select(self, logits: Tensor, prob_sum: bool = False) -> Tuple[RouterLogits, Tensor, Tensor]:
        """Per-head router on selector logits [B, T, H*E]: (logits [B, T, H, E] with, when asked for and
        computed with them, the regulariser's softmax sum; gates [B, T, H, K], expert ids 0..E-1 within
        the head)."""
        logits = logits.view(*logits.shape[:-1], self.n_heads, self.n_experts)
        dropout = self.expert_dropout if self.training else 0.0
        # ranked and gated in fp32; the kernel does so without an fp32 copy of the logits
        return select_experts(
            logits,
            self.moe_k,
            self.router_activation,
            fp32=True,
            expert_dropout=dropout,
            prob_sum=prob_sum and logits.dim() == 4,
        )

    def forward_with_logits(
        self,
        q_src: Tensor,
        k_src: Tensor,
        v_src: Tensor,
        mask: Optional[AttentionMask],
        kv_cache: KVCache = None,
        residual: Optional[Tensor] = None,
        prob_sum: bool = False,
    ):
        """(output [B, T, D], new cache, router logits (o, v) as `RouterLogits`, or None). With `residual`
        [B, T, D] the output is residual + attention in the residual's dtype; the routed output
        projection adds it inside its top-k sum, with no add kernel and no rounding of the attention
        output first. With `prob_sum` the routers may compute the regulariser's softmax sums with their
        selections."""
        B, T, D = q_src.shape
        H, Dh, E, K = self.n_heads, self.projection_size, self.n_experts, self.moe_k
        scale = math.sqrt(1.0 / math.sqrt(Dh))  # d_head^-0.25 on each of q and k
        if q_src is k_src and (torch.is_grad_enabled() or not torch.compiler.is_compiling()):
            q, k, sel_v_logits, sel_o_logits = self._project_joint(q_src)
        else:
            q, k = self.q(q_src), self.k(k_src)
            sel_v_logits = F.linear(k_src, self.sel_v) if E > 1 else None
            sel_o_logits = F.linear(q_src, self.sel_o)
        q = q.view(B, T, H, Dh).transpose(1, 2)  # scaled inside `attend`, with RoPE
        k = k.view(B, T, H, Dh).transpose(1, 2)

        logits = None
        folded = False  # whether `out` already holds residual + attention
        relay = None
        if E > 1:
            v_logits, v_gate, v_expert = self._select(sel_v_logits, prob_sum)
            o_logits, o_gate, o_expert = self._select(sel_o_logits, prob_sum)
            logits = (o_logits, v_logits)
            heads = dict(head_k=K, n_heads=H, head_experts=E)  # head h's experts are h*E .. h*E+E-1
            if gemv_applies(v_src, B * T * H * K, self.v):  # decoding: a few tokens, no sort
                v = project(v_src.reshape(B * T, D), self.v, v_expert, v_gate, per_x=H * K, per_out=K, **heads)
            else:
                v_routing = route((v_expert + self.head_base).reshape(B * T, H * K), H * E)
                if (
                    residual is v_src
                    and residual.requires_grad
                    and torch.is_grad_enabled()
                    and not torch.compiler.is_compiling()
                ):
                    # x's gradient through the residual, summed inside V's backward: no [R, D] fp32 add
                    relay = ResidualGradRelay()
                v = expert_mm_combine(
                    v_src.reshape(B * T, D), self.v, v_routing, v_gate.reshape(B * T * H, K), receive_grad=relay
                )
            v = v.view(B, T, H, Dh).transpose(1, 2)
        else:
            o_gate = torch.sigmoid(sel_o_logits)
            v = F.linear(v_src, self.v).view(B, T, H, Dh).transpose(1, 2)

        res, kv_cache = attend(self.dropout(q), k, v, mask, kv_cache, self.n_rotate, self.rope_base, scale, scale)
        res = res.transpose(1, 2)  # [B, T, H, Dh]

        if E > 1:
            if gemv_applies(res, B * T * H * K, self.o):
                out = project(res.reshape(B * T * H, Dh), self.o, o_expert, o_gate, per_x=K, per_out=H * K, **heads)
            else:
                o_routing = route((o_expert + self.head_base).reshape(B * T * H, K), H * E)
                folded = residual is not None
                out = expert_mm_combine(
                    res.reshape(B * T * H, Dh),
                    self.o,
                    o_routing,
                    o_gate.reshape(B * T, H * K),
                    residual_XO=residual.reshape(B * T, D) if folded else None,
                    send_residual_grad=relay if folded else None,
                )
            out = out.view(B, T, D)
        else:
            out = F.linear((res * o_gate[..., None].to(res.dtype)).reshape(B, T, H * Dh), self.o)
        if residual is not None and not folded:
            out = residual + out
        return out, kv_cache, logits

    def forward(
        self, q_src: Tensor, k_src: Tensor, v_src: Tensor, mask: Optional[AttentionMask], kv_cache: KVCache = None
    ) -> Tuple[Tensor, KVCache]:
        out, kv_cache, _ = self.forward_with_logits(q_src, k_src, v_src, mask, kv_cache)
        return out, kv_cache
