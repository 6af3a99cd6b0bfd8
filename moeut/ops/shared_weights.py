"""One low-precision copy of each shared expert weight per forward pass, and its gradient summed in place.

A MoEUT layer is applied n_layers / group_size times per forward pass (9 at 244M and 1B). Left to
themselves, the expert projections would cast their fp32 master weights to bf16 at every application,
forward and backward, and autograd would sum the applications' fp32 weight gradients with one
full-size add each. At 1B (8192 tokens per step, 222M expert parameters per layer) that weight traffic
is about as large as the projections' own.

Inside `share_weights(dtype)` (`begin_share` / `end_share` in `MoEUT.forward`, under autocast):
  - `shared_operand(w, dtype)` returns one cast copy of `w` per forward (padded if its rows are
    misaligned for the kernels), made by `_CastOnce`, and the `GradSink` that collects its gradient;
  - each application's backward adds its weight gradient into the sink's fp32 buffer inside the
    weight-gradient kernel (`grouped_mm.grouped_mm_weight_grad_add`), in backward order: sequential, so the
    sum is deterministic (no atomics). On CUDA the sink holds up to `settings.wgrad_defer` (by default all
    nine) applications' operands and one launch sums their gradients in one fp32 accumulator per tile,
    so the buffer is written once per weight and step, not read and written once per application;
  - `_CastOnce.backward` hands the finished sum to the master weight's `.grad` once, so DDP's
    per-parameter hooks and gradient clipping see an ordinary gradient.
Costs: the cast copies live from the forward to the backward (0.4 GiB at 244M), and a sink holds up to
`wgrad_defer` - 1 pending applications' operands (an input copy, an output gradient; ~0.1-0.2 GB per
weight and application at 244M) until the launch that computes them. They accumulate while the
backward frees more than that of each application's saved activations, so a step's peak does not
rise: no fp32 sum exists before the last application's backward.

Not used under torch.compile (the sink is Python state the compiler cannot trace) nor with activation
checkpointing (the recomputed forward runs after the scope has closed); those take the per-application
path. `MOEUT_WGRAD_DEFER=0` turns it off (the per-application path is what it is tested against).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from moeut.ops.grouped_mm import grouped_mm_weight_grad, grouped_mm_weight_grad_add
from moeut.settings import settings

# `settings.wgrad_defer`: how many applications of a shared weight one weight-gradient launch sums (1:
# one launch each; at most 9, every application in the paper's models; 0: no shared copy at all).
# Deferring an application's gradient to a later launch keeps its operands alive until then, and saves
# reading and writing the fp32 sum (0.4 GB per FFN weight and application at 244M, 0.9 GB at 1B) for
# all but one of them. CUDA only: the PyTorch path computes each at once.

_local = threading.local()


class GradSink:
    """The fp32 gradient of one master weight, summed over the applications of one forward pass."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype  # the master weight's dtype: the gradient's
        self.grad: Optional[Tensor] = None
        # applications whose weight gradients are still to be computed (`weight_grad`)
        self.pending: List[tuple] = []

    def flush(self) -> None:
        """Add the weight gradients of the pending applications into `grad`, in the order they came
        (deterministic): on CUDA in one launch, elsewhere one application at a time."""
        segments, self.pending = self.pending, []
        if not segments:
            return
        if len(segments) > 1:
            from moeut.kernels.weight_grad import weight_grad_segments_triton

            self.grad = weight_grad_segments_triton(segments, self.dtype, accumulate_into=self.grad)
            return
        x, grad, offsets, rows, grad_rows, grad_scale, scale_dst = segments[0]
        if self.grad is None:
            self.grad = grouped_mm_weight_grad(x, grad, offsets, rows, grad_rows, grad_scale, self.dtype, scale_dst)
        else:
            grouped_mm_weight_grad_add(self.grad, x, grad, offsets, rows, grad_rows, grad_scale, scale_dst)

    def take(self) -> Optional[Tensor]:
        self.flush()
        g, self.grad = self.grad, None
        return g


def weight_grad(
    sink: Optional[GradSink],
    x: Tensor,
    grad: Tensor,
    offsets: Tensor,
    rows: Optional[Tensor],
    grad_rows: Optional[Tensor],
    grad_scale: Optional[Tensor],
    out_dtype: torch.dtype,
    scale_dst: Optional[Tensor] = None,
) -> Optional[Tensor]:
    """The weight gradient of one expert projection's application (`grouped_mm.grouped_mm_weight_grad`):
    returned, or, for a weight shared within the forward pass, added into its sink and None returned.
    With `settings.wgrad_defer` > 1 on CUDA the sink keeps the application's operands and computes the
    gradients of several applications in one launch (`GradSink.flush`; `take` computes what is left)."""
    if sink is None:
        return grouped_mm_weight_grad(x, grad, offsets, rows, grad_rows, grad_scale, out_dtype, scale_dst)
    sink.pending.append((x, grad, offsets, rows, grad_rows, grad_scale, scale_dst))
    if len(sink.pending) >= _defer_count(x):
        sink.flush()
    return None


def _defer_count(x: Tensor) -> int:
    from moeut.ops.dispatch import use_fused  # (looked up at call time: tests switch the kernels on in `fused`)

    if settings.wgrad_defer <= 1 or not use_fused(x):
        return 1
    from moeut.kernels.weight_grad import MAX_SEGMENTS

    return min(settings.wgrad_defer, MAX_SEGMENTS)


class _CastOnce(torch.autograd.Function):
    """copy = w rounded to `dtype`; the gradient of w is what the consumers added into `sink`, plus
    any ordinary gradient of the copy (a consumer that is not an expert projection)."""

    @staticmethod
    def forward(ctx, w_master: Tensor, dtype: torch.dtype, sink: GradSink) -> Tensor:
        ctx.sink = sink
        ctx.set_materialize_grads(False)
        return _cast_copy(w_master, dtype)

    @staticmethod
    def backward(ctx, grad_copy: Optional[Tensor]):
        grad = ctx.sink.take()
        if grad_copy is not None:
            grad_copy = grad_copy.to(ctx.sink.dtype)
            grad = grad_copy if grad is None else grad + grad_copy
        return grad, None, None


def _cast_copy(w: Tensor, dtype: torch.dtype) -> Tensor:
    from moeut.ops.dispatch import use_fused

    if use_fused(w):
        from moeut.kernels.expert_mm import aligned

        return aligned(w, copy_dtype=dtype, always_copy=True)
    return w.to(dtype)


class _Scope:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.outer: Optional[_Scope] = None
        self.copies: Dict[Tuple[int, bool], Tuple[Tensor, Tensor, Optional[GradSink]]] = {}


def begin_share(dtype: Optional[torch.dtype]) -> Optional[_Scope]:
    """Open a scope (None when `dtype` is None, sharing is off, or under torch.compile): expert
    projections computing in `dtype` then share one copy of each weight. Close it with `end_share`."""
    if dtype is None or settings.wgrad_defer == 0 or torch.compiler.is_compiling():
        return None
    scope = _Scope(dtype)
    scope.outer = getattr(_local, "scope", None)
    _local.scope = scope
    return scope


def end_share(scope: Optional[_Scope]) -> None:
    if scope is not None:
        _local.scope = scope.outer


@contextmanager
def share_weights(dtype: Optional[torch.dtype]):
    """`begin_share` / `end_share` as a context manager."""
    scope = begin_share(dtype)
    try:
        yield
    finally:
        end_share(scope)


def shared_operand(w: Tensor, dtype: torch.dtype) -> Tuple[Optional[Tensor], Optional[GradSink]]:
    """(the forward's shared copy of w in `dtype`, its gradient sink or None without autograd), or
    (None, None) outside a scope or when w is not a master weight to be cast."""
    scope = getattr(_local, "scope", None)
    if scope is None or dtype != scope.dtype or w.dtype == dtype or torch.compiler.is_compiling():
        return None, None
    grad = w.requires_grad and torch.is_grad_enabled()
    key = (id(w), grad)
    entry = scope.copies.get(key)
    if entry is None or entry[0] is not w:  # (the master is kept in the entry, so its id stays unique)
        if grad:
            sink = GradSink(w.dtype)
            entry = (w, _CastOnce.apply(w, dtype, sink), sink)
        else:
            entry = (w, _cast_copy(w.detach(), dtype), None)
        scope.copies[key] = entry
    return entry[1], entry[2]
