"""Plot training tokens/s against model size from `train_throughput.py` JSON files: one line per model
family (MoEUT, dense, official release, Llama) and mode (eager, --cuda-graph, --compile). With
`--by-batch`, against the batch size instead: one line per model (family and size) and mode.

    python benchmarks/plot_throughput.py results/train.json results/train_small.json ... [--out results/throughput.png]
    python benchmarks/plot_throughput.py out/throughput.json --by-batch --out batches.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

LABELS = {
    "moeut": "MoEUT (this library)",
    "dense": "dense baseline (this library)",
    "official": "official MoEUT release",
    "llama": "Llama (transformers, SDPA)",
}


def series(paths, by_batch: bool = False):
    """{(family, mode): sorted [(params M, tokens/s k)]} from the results of train_throughput.py; with
    by_batch, {(family, mode, size): sorted [(batch, tokens/s k)]}, size as in the model's name."""
    out = defaultdict(list)
    for path in paths:
        for r in json.loads(Path(path).read_text())["results"]:
            if "error" in r:
                continue
            family, _, size = r["model"].partition("-")
            mode = "CUDA graph" if r.get("cuda_graph") else "compiled" if r.get("compiled") else "eager"
            if by_batch:
                out[(family, mode, size)].append((r["batch"], r["tokens_per_s"] / 1e3))
            else:
                out[(family, mode)].append((r["params_m"], r["tokens_per_s"] / 1e3))
    return {k: sorted(set(v)) for k, v in out.items()}


def main():
    import matplotlib  # here, not at the top: `series` is used (and tested) without matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "throughput.png")
    ap.add_argument("--title", default="Training throughput on one H200 (bf16, context 1024)")
    ap.add_argument("--by-batch", action="store_true", help="tokens/s against the batch size, a line per model")
    args = ap.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colors = {"moeut": "C0", "dense": "C1", "official": "C2", "llama": "C3"}
    styles = {"eager": "-", "CUDA graph": "--", "compiled": ":"}
    marker_of = {}  # one marker per model size (by batch), so a size's MoEUT and dense lines pair up
    lines = series(args.json, args.by_batch)
    for key, pts in sorted(lines.items()):
        family, mode = key[:2]
        size = key[2] if args.by_batch else ""
        marker = marker_of.setdefault(size, "osD^v<>"[len(marker_of) % 7])
        xs, ys = zip(*pts)
        ax.plot(
            xs,
            ys,
            styles[mode],
            marker=marker,
            color=colors.get(family, "k"),
            label=f"{LABELS.get(family, family)}{' ' + size if size else ''}, {mode}",
        )
    if args.by_batch:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({b for pts in lines.values() for b, _ in pts}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("batch (sequences of 1024 tokens)")
    else:
        ax.set_xscale("log")
        ax.set_xlabel("parameters (M)")
    ax.set_ylabel("training tokens/s (thousands)")
    ax.set_title(args.title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
