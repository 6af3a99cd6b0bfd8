"""Decode speed: new tokens per second of KV-cached greedy generation (`moeut.generate.generate`) for
MoEUT and the dense baseline, bf16, at several batch sizes.

    python benchmarks/decode.py [--models moeut-244M,dense-244M] [--batches 1,32] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moeut.generate import generate  # noqa: E402
from moeut.runs import build_model, model_kwargs  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="moeut-244M,dense-244M")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = build_model(name, 8000, model_kwargs(name)).to(device).eval()
        if device == "cuda":
            model = model.to(torch.bfloat16)
        for b in map(int, args.batches.split(",")):
            prompts = torch.randint(0, 8000, (b, args.prompt_len)).tolist()
            generate(model, prompts, 4)  # warm-up: kernels compiled / autotuned
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            generate(model, prompts, args.new_tokens)
            if device == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            rows.append(dict(model=name, batch=b, new_tokens_per_s=b * args.new_tokens / dt, seconds=dt))
            print(f"{name:12s} batch {b:3d}  {rows[-1]['new_tokens_per_s']:9.1f} new tokens/s", flush=True)
        del model
    if args.json:
        args.json.write_text(json.dumps(dict(device=device, torch=torch.__version__, results=rows), indent=2))


if __name__ == "__main__":
    main()
