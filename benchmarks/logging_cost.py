"""What the trainer's expert statistics cost: `expert_statistics` (usage entropy, never-selected experts,
same-token overlap across a shared layer's applications, residual norms; two validation windows) runs
at evaluation steps only, so the training step itself is untouched. This times it against a graphed
training step (bf16, context 1024) of the same model and prints the share of training time it takes at
a given evaluation interval.

    python benchmarks/logging_cost.py --models moeut-44M,moeut-244M --batch-size 16 --eval-interval 1000
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import VOCAB, build, measure  # noqa: E402
from moeut.train.trainer import expert_statistics  # noqa: E402


def time_statistics(model, repeats: int = 5) -> float:
    tokens = np.random.default_rng(0).integers(0, VOCAB, 4 * 1025).astype(np.uint16)
    expert_statistics(model, tokens, 1024, torch.bfloat16)   # warm-up
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        expert_statistics(model, tokens, 1024, torch.bfloat16)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="moeut-44M,moeut-244M")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eval-interval", type=int, default=1000)
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, batch {args.batch_size} x 1024, bf16")
    print("| model | graphed step (ms) | expert statistics (ms) | = steps | share at every "
          f"{args.eval_interval} steps |")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = build(name, None)
        step_ms = measure(model, args.batch_size, args.steps, False, cuda_graph=True)["step_ms"]
        stats_ms = time_statistics(model)
        share = stats_ms / (args.eval_interval * step_ms)
        print(f"| {name} | {step_ms:.1f} | {stats_ms:.1f} | {stats_ms / step_ms:.2f} | {share:.3%} |", flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
