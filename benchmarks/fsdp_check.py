"""One GPU, one process: `moeut train --parallel fsdp` (FSDP2 over a group of one, with the Triton
kernels) against the plain eager step on the same data and seed: per-step losses side by side, tokens/s
and peak memory of each.

    python benchmarks/fsdp_check.py --model moeut-44M --data corpus.jsonl.gz --tokenizer tok.model --steps 12
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moeut.train.config import TrainConfig
from moeut.train.trainer import train


def run(args, parallel: str, out: Path):
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cfg = TrainConfig(
        model=args.model,
        data=[args.data],
        tokenizer=args.tokenizer,
        steps=args.steps,
        batch_size=args.batch_size,
        context=args.context,
        log_interval=1,
        eval_interval=10**6,
        ckpt_interval=10**6,
        cache_dir=str(out.parent / "cache"),
        out=str(out),
        tensorboard=False,
        progress=False,
        cuda_graph="off",
        parallel=parallel,
    )
    train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][2:]
    return (
        losses,
        sorted(speeds)[len(speeds) // 2] if speeds else None,
        (torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="moeut-44M")
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--context", type=int, default=1024)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp())
    eager, eager_tps, eager_mem = run(args, "ddp", root / "eager")
    fsdp, fsdp_tps, fsdp_mem = run(args, "fsdp", root / "fsdp")
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"{where}, {args.model}, batch {args.batch_size} x {args.context}, {'bf16' if torch.cuda.is_available() else 'fp32'}, eager steps"
    )
    print("| step | loss, plain | loss, FSDP2 (1 process) | difference |\n|---|---|---|---|")
    for s in sorted(eager):
        print(f"| {s} | {eager[s]:.5f} | {fsdp[s]:.5f} | {abs(eager[s] - fsdp[s]):.2e} |")
    print(
        f"\ntokens/s (median after 2 steps): plain {eager_tps:,.0f}, FSDP2 {fsdp_tps:,.0f}; "
        f"peak memory: plain {eager_mem:.2f} GiB, FSDP2 {fsdp_mem:.2f} GiB"
    )


if __name__ == "__main__":
    main()
