"""What the trainer's expert statistics cost: `expert_statistics` (usage entropy, never-selected experts,
same-token overlap across a shared layer's applications, residual norms; two validation windows) runs
at evaluation steps only, so the training step itself is untouched. This times it against a training
step of the same model (GPU: graphed, bf16, context 1024; CPU: eager, fp32, context 256, the trainer's
CPU defaults) and prints the share of training time it takes at a given evaluation interval.

    python benchmarks/expert_statistics_cost.py --models moeut-44M,moeut-244M --batch-size 16 --eval-interval 1000
    python benchmarks/expert_statistics_cost.py --models moeut-tiny --batch-size 16     # on a machine without CUDA
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
from train_throughput import VOCAB, build, measure
from moeut.train.monitor import expert_statistics


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    """Median milliseconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def cpu_step_ms(model, batch: int, context: int, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, VOCAB, (batch, context + 1))

    def step():
        out = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.outputs.view(-1, VOCAB), tokens[:, 1:].reshape(-1))
        (loss + out.reg_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="moeut-44M,moeut-244M")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eval-interval", type=int, default=1000)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    context, amp = (1024, torch.bfloat16) if cuda else (256, torch.float32)
    where = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{where}, batch {args.batch_size} x {context}, {'bf16, graphed step' if cuda else 'fp32, eager step'}")
    print(
        f"| model | training step (ms) | expert statistics (ms) | = steps | share at every {args.eval_interval} steps |"
    )
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = build(name, None)
        if cuda:
            step_ms = measure(model, args.batch_size, args.steps, False, cuda_graph=True)["step_ms"]
        else:
            step_ms = cpu_step_ms(model, args.batch_size, context, args.steps)
        tokens = np.random.default_rng(0).integers(0, VOCAB, 4 * (context + 1)).astype(np.uint16)
        stats_ms = timed(lambda: expert_statistics(model, tokens, context, amp), 5)
        share = stats_ms / (args.eval_interval * step_ms)
        print(f"| {name} | {step_ms:.1f} | {stats_ms:.1f} | {stats_ms / step_ms:.2f} | {share:.3%} |", flush=True)
        model = None  # frees its memory before the next model is built
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
