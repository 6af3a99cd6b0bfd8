"""Tokens/s of `moeut train` itself (data loading, logging, the optimizer), eager against `--cuda-graph`.

`train_throughput.py` times a bare step on a fixed batch; this runs the real trainer on the default
corpus (the Python standard library) and reads tokens/s from its metrics.jsonl, the first two log
intervals (warm-up, capture) left out.

    python benchmarks/trainer_speed.py --models moeut-126M,moeut-244M [--tokenizer PATH] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moeut.train.trainer import TrainConfig, train  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="moeut-126M,moeut-244M")
    ap.add_argument("--modes", default="eager,cuda-graph", help="comma list of eager, cuda-graph, default")
    ap.add_argument("--batch-size", type=int, default=16, help="0: the trainer's default (64 on a GPU)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--log-interval", type=int, default=10)
    ap.add_argument("--tokenizer", type=Path, help="a trained tokenizer.model to reuse (skips training one)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    cache = Path(tempfile.mkdtemp(prefix="moeut_cache_"))
    for name in args.models.split(","):
        for mode in args.modes.split(","):
            out = Path(tempfile.mkdtemp(prefix="moeut_run_"))
            cfg = TrainConfig(model=name, out=str(out), steps=args.steps, batch_size=args.batch_size,
                              tokenizer=str(args.tokenizer or ""),
                              log_interval=args.log_interval, eval_interval=10 ** 9, ckpt_interval=10 ** 9,
                              eval_windows=8, cache_dir=str(cache), tensorboard=False, progress=False,
                              cuda_graph={"cuda-graph": "on", "eager": "off", "default": "auto"}[mode])
            t = time.perf_counter()
            result = train(cfg)
            wall = time.perf_counter() - t
            recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
            speeds = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r][2:]
            losses = [r["loss"] for r in recs if "loss" in r]
            row = dict(model=name, mode=mode, batch=args.batch_size, steps=args.steps,
                       tokens_per_s=statistics.median(speeds) if speeds else None, final_loss=losses[-1],
                       val_ppl=result.get("val_ppl"), wall_s=wall)
            rows.append(row)
            print(f"{name:12s} {mode:10s} {row['tokens_per_s'] or 0:10.0f} tokens/s  final loss {losses[-1]:.3f}  "
                  f"(run {wall:.0f} s)", flush=True)
            if args.json:
                args.json.write_text(json.dumps(dict(results=rows), indent=2))
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
