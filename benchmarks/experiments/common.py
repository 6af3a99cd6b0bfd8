"""What the kernel experiments share: the FFN shapes, a random routed problem, a timer, and a runner that
checks, times and prints one kernel variant (or the reason it failed to compile).

On a machine without a GPU the experiments run their "tiny" shape through Triton's interpreter
(`TRITON_INTERPRET=1`, set before Triton is imported), untimed: that is how CI keeps them runnable.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():   # before Triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from moeut.ops.expert_mm import route  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EXPERT_SIZE = 128
# name: (d_model, experts, k, tokens). "tiny" is for the CPU interpreter; its expert size is 16.
SHAPES = {"244M": (1024, 387, 16, 16384), "1B": (1536, 565, 24, 8192), "tiny": (32, 5, 2, 40)}


def shapes(names=None):
    """The shapes to run: the two GPU ones on a GPU, the tiny one on CPU (or `names`)."""
    names = names or (["244M", "1B"] if DEVICE == "cuda" else ["tiny"])
    return {n: SHAPES[n] for n in names}


def ffn_problem(name: str, dtype=torch.bfloat16) -> SimpleNamespace:
    """Random top-k routing of T tokens and the σ-MoE FFN's operands at shape `name`: x [T, D], w1
    [E, D, S], w2 [E, S, D], the expert activations h and their gradient gh [T*K, S] in routed order,
    the gates [T*K] (fp32)."""
    D, E, K, T = SHAPES[name]
    S = EXPERT_SIZE if name != "tiny" else 16
    dtype = dtype if DEVICE == "cuda" else torch.float32   # the interpreter's bf16 dots are not exact
    expert = torch.rand(T, E, device=DEVICE).topk(K, dim=-1).indices
    N = T * K
    return SimpleNamespace(
        name=name, D=D, E=E, K=K, T=T, S=S, N=N, r=route(expert, E),
        x=torch.randn(T, D, device=DEVICE, dtype=dtype),
        w1=torch.randn(E, D, S, device=DEVICE, dtype=dtype) / D ** 0.5,
        w2=torch.randn(E, S, D, device=DEVICE, dtype=dtype) / S ** 0.5,
        h=torch.randn(N, S, device=DEVICE, dtype=dtype), gh=torch.randn(N, S, device=DEVICE, dtype=dtype),
        gate=torch.rand(N, device=DEVICE))


def bench(fn) -> float:
    """Median ms of fn on the GPU; NaN on CPU (the interpreter's times mean nothing)."""
    if DEVICE != "cuda":
        fn()
        return math.nan
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def try_variant(label: str, run, error, flop: float = 0.0) -> dict:
    """Run a kernel variant once, measure its error against the reference (`error()`), time it, print a
    line; a variant that fails to compile is printed as failed, not raised (Triton's passes can crash)."""
    try:
        run()
        err = error()
        ms = bench(run)
    except Exception as exc:   # noqa: BLE001 (a compiler crash is a result here)
        print(f"{label}: failed {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        return dict(label=label, failed=type(exc).__name__)
    rate = f" {flop / ms / 1e9:.0f} TFLOP/s" if flop and ms == ms else ""
    print(f"{label}: {ms:.3f} ms{rate}  error {err:.1e}", flush=True)
    return dict(label=label, ms=ms, error=err)
