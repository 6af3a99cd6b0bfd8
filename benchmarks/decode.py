"""Decode speed: new tokens per second of greedy generation (`moeut.generate.generate`) for MoEUT and
the dense baseline, bf16, at several batch sizes, for each cache mode: the official-style growing
dict ("dynamic"), the preallocated cache run eagerly ("static") and replayed from CUDA graphs
("static+graph"), optionally with the step compiled ("static+graph+compile"; the warm-up call pays the
compile time, which is reported apart). Prefill is timed separately. The step time is the steady
state (the difference of a call of n and one of 2n new tokens, over n, both capturing their own
graph); beside it the per-call overhead of a first call (the eager first step and the CUDA-graph
capture) and of a repeated call of the same shapes (which replays the graph `generate` kept).
Results of the session before this method (benchmarks/LOG.md, fourth session) averaged that overhead into
the steps.

    python benchmarks/decode.py [--models moeut-244M,dense-244M] [--batches 1,32] [--json out.json]
                                [--variants default,sorted]

Variants (each measured beside "default" in the same run, to see what one change is worth):
"sorted" turns off the per-choice expert kernels of decoding (MOEUT_PYTORCH_OPS=expert_gemv), so each step routes
by sorting as training does; "gemv-all" uses them however many choices each expert gets (the policy's
threshold lifted); "no-overlap" reads each step's tokens before launching the next
(`generate.OVERLAP_HOST = False`; MoEUT and dense). The others apply to MoEUT only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moeut.ops import expert_gemv
from moeut import generate as generate_module
from moeut.generate import generate
from moeut.settings import settings
from moeut.models import build_model, model_kwargs

MODES = {
    "dynamic": dict(cache="dynamic"),
    "static": dict(cache="static", cuda_graph=False),
    "static+graph": dict(cache="static", cuda_graph=True),
    "static+graph+compile": dict(cache="static", cuda_graph=True, compile=True),
}


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="moeut-244M,dense-244M")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--modes", default="dynamic,static,static+graph,static+graph+compile")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--variants", default="default", help="default, sorted, gemv-all, no-overlap")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    modes = [m for m in args.modes.split(",") if device == "cuda" or "graph" not in m]
    rows = []
    default_max = expert_gemv.MAX_CHOICES_PER_EXPERT, expert_gemv.MAX_CHOICES_PER_EXPERT_PAST_L2
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = build_model(name, 8000, model_kwargs(name)).to(device).eval()
        if device == "cuda":
            model = model.to(torch.bfloat16)
        for b in map(int, args.batches.split(",")):
            prompts = torch.randint(0, 8000, (b, args.prompt_len)).tolist()
            for variant, mode in [(v, m) for v in args.variants.split(",") for m in modes]:
                if variant not in ("default", "no-overlap") and not name.startswith("moeut"):
                    continue
                settings.pytorch_ops = frozenset({"expert_gemv"}) if variant == "sorted" else frozenset()
                generate_module.OVERLAP_HOST = variant != "no-overlap"
                expert_gemv.MAX_CHOICES_PER_EXPERT = float("inf") if variant == "gemv-all" else default_max[0]
                expert_gemv.MAX_CHOICES_PER_EXPERT_PAST_L2 = float("inf") if variant == "gemv-all" else default_max[1]
                torch._dynamo.reset()  # compiled steps do not guard on the variable
                kw = MODES[mode]
                fresh = dict(kw, reuse_graph=False) if "graph" in mode else kw
                # Steady-state step time from two calls of n and 2n new tokens: their difference holds
                # n replayed steps and none of the per-call costs (prefill, the eager first step, graph
                # capture), which a single call's average would spread over its steps. Both lengths
                # are warmed up first (autotuning; compiled steps per cache-size bucket).
                n = args.new_tokens
                warm = sum(timed(lambda: generate(model, prompts, m + 1, **fresh), device) for m in (2 * n, n))
                prefill = timed(lambda: generate(model, prompts, 1, **{**kw, "cuda_graph": False}), device)
                t_short = timed(lambda: generate(model, prompts, n + 1, **fresh), device)
                t_long = timed(lambda: generate(model, prompts, 2 * n + 1, **fresh), device)
                per_step = (t_long - t_short) / n
                overhead = t_short - n * per_step - prefill  # first step, capture / compile lookup
                generate(model, prompts, n + 1, **kw)  # captures the graph `generate` keeps
                t_repeat = timed(lambda: generate(model, prompts, n + 1, **kw), device)
                repeat_overhead = t_repeat - n * per_step - prefill
                rows.append(
                    dict(
                        model=name,
                        batch=b,
                        mode=mode,
                        variant=variant,
                        prefill_ms=prefill * 1e3,
                        step_ms=per_step * 1e3,
                        new_tokens_per_s=b / per_step,
                        call_overhead_ms=overhead * 1e3,
                        repeat_call_overhead_ms=repeat_overhead * 1e3,
                        warmup_s=warm,
                    )
                )
                print(
                    f"{name:12s} {variant:8s} batch {b:3d}  {mode:21s} prefill {prefill * 1e3:7.1f} ms  "
                    f"step {per_step * 1e3:7.2f} ms  {b / per_step:9.1f} new tokens/s  "
                    f"per-call overhead {overhead * 1e3:6.1f} ms, repeated call {repeat_overhead * 1e3:6.1f} ms  "
                    f"(warm-up {warm:.1f} s)",
                    flush=True,
                )
                if args.json:  # after every row: a time limit keeps what was measured
                    args.json.write_text(
                        json.dumps(dict(device=device, torch=torch.__version__, results=rows), indent=2)
                    )
        model = None  # frees its memory before the next model is built


if __name__ == "__main__":
    main()
