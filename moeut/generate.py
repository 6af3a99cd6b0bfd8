"""Text generation with the KV cache: batched prompts of different lengths (left-padded, padding
masked; RoPE is relative, so padding does not shift anything), greedy or temperature / top-k /
top-p sampling, stop at end of text, reproducible with a seed. On CUDA the cache is preallocated,
each decoding step is replayed from a CUDA graph (one launch instead of hundreds of small kernels),
and the next step is launched before the host reads the current step's tokens.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable, List, Optional, Sequence

import torch

from moeut.attention import AttentionMask, frozen_inference_weights, new_static_cache
from moeut.models import device_memory

COMPILE_CAPACITY_STEP = 256  # with compile=True the KV cache holds a multiple of this many positions
OVERLAP_HOST = True  # launch the next decoding step before reading this one's tokens (False: benchmarks' baseline)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """ValueError naming the first setting out of range."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and 0 <= temperature < math.inf):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0: all tokens), got {top_k!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")


def model_vocab_size(model) -> Optional[int]:
    emb = getattr(model, "embedding", None)
    return getattr(emb, "num_embeddings", None)


def kv_cache_bytes(model, batch: int, positions: int) -> int:
    """Bytes of a KV cache holding `positions` for `batch` rows: one key and one value tensor
    [batch, heads, positions, head width] per layer application, in the parameters' dtype."""
    for m in model.modules():
        heads = getattr(m, "n_heads", None)
        width = getattr(m, "projection_size", None) or getattr(m, "d_head", None)
        if isinstance(heads, int) and isinstance(width, int):
            break
    else:
        return 0  # an attention module we do not know: no estimate
    dtype_bytes = next(model.parameters()).element_size()
    return 2 * model.n_layers * batch * heads * positions * width * dtype_bytes


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


def pick_next(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """Next token per row from [B, V] logits: argmax when temperature == 0, else a seeded sample."""
    if temperature <= 0:
        return logits.argmax(-1)
    # In float64 and shifted so the largest logit is 0 before dividing: a tiny temperature sends the
    # others to -inf (a sample that is the argmax) instead of overflowing to inf or 0/0 (NaN probabilities).
    logits = logits.double()
    scaled = (logits - logits.max(-1, keepdim=True).values) / temperature
    probs = _filter_logits(scaled, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _DecodeStep:
    """One decoding step (token [B, 1] -> last-position logits [B, V]) against a preallocated cache,
    replayed from a CUDA graph after one warm-up step; optionally through torch.compile, which fuses
    the small elementwise kernels around the matmuls (the step's shapes never change)."""

    def __init__(self, model, mask: AttentionMask, cache, use_graph: bool, compile_step: bool):
        # A kept step (`_KEPT_STEPS`) must not keep its model alive: a weak reference unless compiled.
        compiled = torch.compile(model, dynamic=False) if compile_step else None
        self.model = (lambda: compiled) if compiled is not None else weakref.ref(model)
        self.mask, self.cache = mask, cache
        self.use_graph, self.graph, self.warm = use_graph, None, False

    def _eager(self, tok: torch.Tensor) -> torch.Tensor:
        return self.model()(tok, self.mask, kv_cache=self.cache).outputs[:, -1]

    def __call__(self, tok: torch.Tensor) -> torch.Tensor:
        if not self.use_graph:
            return self._eager(tok)
        if not self.warm:  # first step: eager on a side stream (lazy inits and Triton autotuning happen here)
            self.warm = True
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = self._eager(tok)
            torch.cuda.current_stream().wait_stream(side)
            return logits
        if self.graph is None:
            self.tok = tok.clone()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # recorded, not run: the replay below runs it
                self.logits = self._eager(self.tok)
        else:
            self.tok.copy_(tok)
        self.graph.replay()
        return self.logits


# The last decoding step (CUDA graph, KV cache) of each model, for the next call of the same batch
# size and cache size (capturing costs an eager step and a graph capture: 30-50 ms at 244M on the
# H200's host). Weakly keyed: it never keeps a model alive, and it is not part of the model
# (deepcopy, pickling).
_KEPT_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _state_signature(model) -> tuple:
    """Where and how the parameters and buffers are stored. A graph reads them by address, so values
    updated in place (an optimizer step, even through `.data`) need no new capture; a moved,
    converted or replaced tensor does."""
    return tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in (*model.parameters(), *model.buffers()))


def release_decode_graphs(model=None) -> None:
    """Drop the decoding step (CUDA graph, KV cache) that `generate` keeps for `model` (all models if
    None), returning its memory to PyTorch's allocator; for a given model also the inference weights
    its modules prepared (`attention.frozen_inference_weights`)."""
    if model is None:
        _KEPT_STEPS.clear()
        return
    _KEPT_STEPS.pop(model, None)
    for m in model.modules():
        if hasattr(m, "_freeze_inference_weight") and not m._inference_weight_frozen:
            m._inference_weight = None


def _static_decode_step(model, pad, cuda_graph: bool, compile: bool, reuse_graph: bool):
    """(step, key): the step kept from an earlier call if it has the same batch size, cache size
    (pad [B, capacity]) and weight storage, with its cache rewound and `pad` copied into the mask it
    reads; else a new step with a new cache. `key` (None: not to be kept) goes with it into
    `_KEPT_STEPS` after a successful call."""
    B, capacity = pad.shape
    # Compiled steps are not kept (the compiled module holds the model); dynamo caches their code.
    key = (B, capacity, cuda_graph, _state_signature(model)) if reuse_graph and not compile else None
    # Taken out while in use (a nested call, e.g. from `on_token`, makes its own) and put back after.
    kept = _KEPT_STEPS.pop(model, None) if key is not None else None
    if kept is not None and kept[0] == key:
        step = kept[1]
        step.mask.src_length_mask.copy_(pad)  # a captured graph reads the padding mask in place
        torch._foreach_zero_([e["pos"] for e in step.cache.values()])
        return step, key
    del kept  # one of other shapes: its memory is free before this call allocates
    kv = {i: new_static_cache(capacity) for i in range(model.n_layers)}
    return _DecodeStep(model, AttentionMask(pad, None, is_causal=True), kv, cuda_graph, compile), key


def _decode_static(model, x, step: _DecodeStep, sample, take, max_new_tokens: int) -> None:
    """Prefill into the step's cache, then one `step` per new token until `take` (which records a
    step's tokens) says all rows are done. Step i+1 is launched before step i's tokens are read on
    the host."""
    if max_new_tokens == 0:
        return
    nxt = sample(model(x, step.mask, kv_cache=step.cache).outputs[:, -1])
    on_gpu = x.device.type == "cuda"
    host = torch.empty(x.shape[0], dtype=torch.long, pin_memory=on_gpu)
    for i_step in range(max_new_tokens):
        host.copy_(nxt, non_blocking=on_gpu)
        if on_gpu:
            copied = torch.cuda.Event()
            copied.record()
        last = i_step + 1 == max_new_tokens
        following = None
        if OVERLAP_HOST and not last:
            # Launched before this step's tokens reach the host, so the device computes the next step
            # while the host streams and checks these (at worst one step for nothing).
            following = sample(step(nxt[:, None]))
        if on_gpu:
            copied.synchronize()
        if take(host.tolist()) or last:
            return
        nxt = following if following is not None else sample(step(nxt[:, None]))


def _decode_recomputing(model, x, pad, kv: Optional[dict], sample, take, max_new_tokens: int) -> None:
    """The official growing dict cache (kv = {}) or, with kv None, the whole sequence recomputed at
    every step (the reference the cached paths are tested against)."""
    seq, seq_pad, new = x, pad, x  # `new`: the tokens the cache has not seen (the prompt, then one)
    for _ in range(max_new_tokens):
        if kv is not None:
            out = model(new, AttentionMask(seq_pad, None, is_causal=True), kv_cache=kv)
            kv, logits = out.cache, out.outputs[:, -1]
        else:
            logits = model(seq, AttentionMask(seq_pad, None, is_causal=True)).outputs[:, -1]
        nxt = sample(logits)
        new = nxt[:, None]
        if take(nxt.tolist()):  # one device sync per step
            return
        seq = torch.cat([seq, nxt[:, None]], 1)
        seq_pad = torch.cat([seq_pad, torch.zeros(x.shape[0], 1, dtype=torch.bool, device=x.device)], 1)


def _supports_static_cache(model) -> bool:
    """Whether every layer's attention fills preallocated caches (`registry.supports_static_cache`); a
    class with only the official interface knows the growing dict."""
    from moeut.attention import supports_static_cache
    from moeut.model import MoEUTLayer

    return all(supports_static_cache(m.attention) for m in model.modules() if isinstance(m, MoEUTLayer))


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    eos_id: Optional[int] = None,
    on_token: Optional[Callable[[int, int], None]] = None,
    cache: str = "static",
    cuda_graph: Optional[bool] = None,
    compile: bool = False,
    reuse_graph: bool = True,
) -> List[List[int]]:
    """New tokens for each prompt (without the prompt; stops after eos_id, which is not returned).

    `on_token(row, token)` is called for every produced token (streaming). `cache`: "static" (a
    preallocated KV cache of prompt + max_new_tokens positions: fixed shapes, no copies), "dynamic"
    (the official growing dict cache; used for models with a user-supplied attention class) or "none"
    (recompute the whole sequence every step: slow, the reference the cached paths are tested
    against). `cuda_graph` (default: on CUDA with the static cache and at least 8 new tokens) replays
    each decoding step from a CUDA graph. `compile` runs the decoding step through torch.compile
    (static cache only; worth its compile time for long outputs).
    `reuse_graph`: keep the decoding step (its CUDA graph once captured) and its preallocated KV cache
    (not with `compile`) for the next call with the same batch size and cache size (prompt length +
    max_new_tokens) while the weights stay where they are (values updated in place are read anew);
    `release_decode_graphs(model)` frees them.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if cache not in ("static", "dynamic", "none"):
        raise ValueError(f"cache must be 'static', 'dynamic' or 'none', got {cache!r}")
    if not prompts:
        return []
    device = next(model.parameters()).device
    if cache == "static" and not _supports_static_cache(model):
        if cuda_graph or compile:
            raise ValueError(
                "cuda_graph and compile need a preallocated cache, which this model's attention modules do not support"
            )
        cache = "dynamic"
    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and cache == "static" and max_new_tokens >= 8
    if cuda_graph and (device.type != "cuda" or cache != "static"):
        raise ValueError("cuda_graph needs a CUDA model and cache='static'")
    if compile and cache != "static":
        raise ValueError("compile needs cache='static' (fixed shapes)")
    prompts = [list(p) if len(p) else [eos_id if eos_id is not None else 0] for p in prompts]
    B, L = len(prompts), max(len(p) for p in prompts)
    vocab = model_vocab_size(model)
    bad = [t for p in prompts for t in p if not isinstance(t, int) or not 0 <= t < (vocab or t + 1)]
    if bad:
        raise ValueError(f"prompt token {bad[0]!r} is not an id of this model's {vocab} tokens")
    need = kv_cache_bytes(model, B, L + max_new_tokens)
    if need > device_memory(device):
        raise ValueError(
            f"max_new_tokens={max_new_tokens}: the KV cache for {B} x {L + max_new_tokens} positions "
            f"would need {need / 2**30:,.1f} GiB, more than {device} has"
        )
    x = torch.zeros(B, L, dtype=torch.long, device=device)
    pad = torch.ones(B, L, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        x[i, L - len(p) :] = torch.tensor(p, device=device)
        pad[i, L - len(p) :] = False
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out_tokens: List[List[int]] = [[] for _ in range(B)]
    done = [False] * B
    kv, key = None, None
    if cache == "static":
        capacity = L + max_new_tokens
        if compile:  # compiled code is specialised on the cache size: let calls of similar lengths share it
            capacity = -(-capacity // COMPILE_CAPACITY_STEP) * COMPILE_CAPACITY_STEP
        pad = torch.cat([pad, torch.zeros(B, capacity - L, dtype=torch.bool, device=device)], 1)
        step, key = _static_decode_step(model, pad, cuda_graph, compile, reuse_graph)
    elif cache == "dynamic":
        kv = {}

    def take(tokens: List[int]) -> bool:
        """Record one step's tokens; whether every row is finished."""
        for i, t in enumerate(tokens):
            if done[i]:
                continue
            if eos_id is not None and t == eos_id:
                done[i] = True
                continue
            out_tokens[i].append(t)
            if on_token is not None:
                on_token(i, t)
        return all(done)

    sample = lambda logits: pick_next(logits.float(), temperature, top_k, top_p, gen)
    try:
        with frozen_inference_weights(model):  # the weights are constant during one call
            if cache == "static":
                _decode_static(model, x, step, sample, take, max_new_tokens)
            else:
                _decode_recomputing(model, x, pad, kv, sample, take, max_new_tokens)
    finally:
        model.train(was_training)
    if key is not None and max_new_tokens > 0:  # (with 0 new tokens the cache was never filled)
        _KEPT_STEPS[model] = (key, step)
    return out_tokens
