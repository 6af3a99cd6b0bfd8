"""Text generation with the KV cache: batched prompts of different lengths (left-padded, padding
masked; RoPE is relative, so padding does not shift anything), greedy or temperature / top-k /
top-p sampling, stop at end of text, reproducible with a seed.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from .attention import AttentionMask


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
              generator: Optional[torch.Generator]) -> torch.Tensor:
    """Next token per row from [B, V] logits: argmax when temperature == 0, else a seeded sample."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = _filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None, eos_id: Optional[int] = None,
             on_token: Optional[Callable[[int, int], None]] = None, use_cache: bool = True) -> List[List[int]]:
    """New tokens for each prompt (without the prompt; stops after eos_id, which is not returned).

    `on_token(row, token)` is called for every produced token (streaming). `use_cache=False`
    recomputes the whole sequence every step: slow, the reference the cached path is tested against.
    """
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if not prompts:
        return []
    device = next(model.parameters()).device
    prompts = [list(p) if len(p) else [eos_id if eos_id is not None else 0] for p in prompts]
    B, L = len(prompts), max(len(p) for p in prompts)
    x = torch.zeros(B, L, dtype=torch.long, device=device)
    pad = torch.ones(B, L, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        x[i, L - len(p):] = torch.tensor(p, device=device)
        pad[i, L - len(p):] = False
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out_tokens: List[List[int]] = [[] for _ in range(B)]
    done = [False] * B
    cache = {} if use_cache else None
    seq, seq_pad = x, pad
    step_in = x
    try:
        for _ in range(max_new_tokens):
            if use_cache:
                out = model(step_in, AttentionMask(seq_pad, None, is_causal=True), kv_cache=cache)
                cache = out.cache
            else:
                out = model(seq, AttentionMask(seq_pad, None, is_causal=True))
            nxt = pick_next(out.outputs[:, -1].float(), temperature, top_k, top_p, gen)
            for i, t in enumerate(nxt.tolist()):  # one device sync per step
                if done[i]:
                    continue
                if eos_id is not None and t == eos_id:
                    done[i] = True
                    continue
                out_tokens[i].append(t)
                if on_token is not None:
                    on_token(i, t)
            if all(done):
                break
            step_in = nxt[:, None]
            seq = torch.cat([seq, step_in], 1)
            seq_pad = torch.cat([seq_pad, torch.zeros(B, 1, dtype=torch.bool, device=device)], 1)
    finally:
        model.train(was_training)
    return out_tokens
