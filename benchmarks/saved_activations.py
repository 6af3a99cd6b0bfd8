"""What autograd keeps for the backward pass of one training forward: bytes of saved tensors
(parameters excluded, shared storage counted once), grouped by the line of moeut code that saved
them. Runs on CPU under bf16 autocast, so activation memory can be studied without a GPU; with
`--device cuda` on the GPU, where the fused paths (Triton LayerNorm, router, RoPE, ...) save other
tensors than their PyTorch forms do.

    python benchmarks/saved_activations.py --model moeut-244M [--tokens 1024] [--batch 1] [--top 25]
    python benchmarks/saved_activations.py --model moeut-244M --batch 16 --device cuda
"""
from __future__ import annotations

import argparse
import collections
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moeut.runs import build_model, model_kwargs  # noqa: E402


def saved_bytes(model, tokens: torch.Tensor, device_type: str = "cpu"):
    """(total bytes, Counter of (site, dtype, shape) -> bytes) saved for backward by one forward."""
    seen, by_site = set(), collections.Counter()

    def pack(t):
        if t.is_leaf and t.requires_grad:  # parameters exist anyway
            return t
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            frames = [f for f in traceback.extract_stack() if "/moeut/" in f.filename]
            site = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
            by_site[(site, str(t.dtype).replace("torch.", ""), tuple(t.shape))] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device_type, torch.bfloat16):
            model(tokens)
    return sum(by_site.values()), by_site


def model_from_args(description: str, layers: int, top: int):
    """(args, model, model kwargs) for the CPU studies: --model, --tokens, --layers, --top."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="moeut-244M")
    ap.add_argument("--tokens", type=int, default=1024, help="one sequence of this many tokens")
    ap.add_argument("--layers", type=int, default=layers, help="build with this many layers (0: the profile's)")
    ap.add_argument("--top", type=int, default=top)
    ap.add_argument("--batch", type=int, default=1, help="sequences of --tokens each")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    kw = model_kwargs(args.model)
    if args.layers:
        kw["n_layers"] = args.layers
    torch.manual_seed(0)
    return args, build_model(args.model, 8000, kw).to(args.device).train(), kw


def main():
    args, model, kw = model_from_args(__doc__, layers=0, top=25)
    tokens = args.batch * args.tokens
    device = torch.device(args.device)
    total, by_site = saved_bytes(model, torch.randint(0, 8000, (args.batch, args.tokens), device=device), device.type)
    print(f"{args.model} ({kw.get('n_layers')} layer applications), {args.batch} x {args.tokens} tokens on "
          f"{args.device}: {total / 2**20:.1f} MiB saved for backward "
          f"({total / 2**20 / tokens * 1024:.1f} MiB per 1024 tokens)")
    for (site, dt, shape), b in by_site.most_common(args.top):
        print(f"{b / 2**20:9.2f} MiB  {dt:9s} {str(shape):24s} {site}")


if __name__ == "__main__":
    main()
