"""Where the GPU time of one decoding step goes: kernels of a cached single-token step (bf16, after a
prefill), grouped by name, for each model and batch size. GPU times are those of the CUDA-graph
replay; only the launch gaps differ.

    python benchmarks/decode_profile.py [--models moeut-244M,dense-244M] [--batches 1,32] [--top 25]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from profile_step import busy_ms, kernel_times, print_table
from moeut.attention import AttentionMask, new_static_cache
from moeut.models import build_model, model_kwargs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="moeut-244M,dense-244M")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--gemv-max-choices", type=float, help="override both of expert_gemv's choices-per-expert limits")
    args = ap.parse_args()
    if args.gemv_max_choices is not None:
        from moeut.ops import expert_gemv

        expert_gemv.MAX_CHOICES_PER_EXPERT = expert_gemv.MAX_CHOICES_PER_EXPERT_PAST_L2 = args.gemv_max_choices
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = build_model(name, 8000, model_kwargs(name)).cuda().to(torch.bfloat16).eval()
        for b in map(int, args.batches.split(",")):
            capacity = args.prompt_len + 2 * args.steps + 2
            kv = {i: new_static_cache(capacity) for i in range(model.n_layers)}
            mask = AttentionMask(torch.zeros(b, capacity, dtype=torch.bool, device="cuda"), None, is_causal=True)
            tok = torch.randint(0, 8000, (b, 1), device="cuda")
            with torch.no_grad():
                model(torch.randint(0, 8000, (b, args.prompt_len), device="cuda"), mask, kv_cache=kv)
                per_kernel = kernel_times(lambda: model(tok, mask, kv_cache=kv), args.steps)
            print(
                f"\n{name} batch {b}: GPU busy {busy_ms(per_kernel, args.steps):.2f} ms per step, "
                f"{sum(v[1] for v in per_kernel.values()) / args.steps:.0f} kernels per step"
            )
            print_table(per_kernel, args.steps, args.top)
        model = None  # frees its memory before the next model is built


if __name__ == "__main__":
    main()
