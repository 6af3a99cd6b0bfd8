"""Plot training tokens/s against model size from `train_throughput.py` JSON files: one line per model
family (MoEUT, dense, official release, Llama) and mode (eager, --cuda-graph, --compile).

    python benchmarks/plot_throughput.py results/train.json results/train_small.json ... [--out results/throughput.png]
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {"moeut": "MoEUT (this library)", "dense": "dense baseline (this library)",
          "official": "official MoEUT release", "llama": "Llama (transformers, SDPA)"}


def series(paths):
    """{(family, mode): sorted [(params M, tokens/s k)]} from the results of train_throughput.py."""
    out = defaultdict(list)
    for path in paths:
        for r in json.loads(Path(path).read_text())["results"]:
            if "error" in r:
                continue
            family = r["model"].split("-")[0]
            mode = "CUDA graph" if r.get("cuda_graph") else "compiled" if r.get("compiled") else "eager"
            out[(family, mode)].append((r["params_m"], r["tokens_per_s"] / 1e3))
    return {k: sorted(set(v)) for k, v in out.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "throughput.png")
    ap.add_argument("--title", default="Training throughput on one H200 (bf16, context 1024)")
    args = ap.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colors = {"moeut": "C0", "dense": "C1", "official": "C2", "llama": "C3"}
    styles = {"eager": "-", "CUDA graph": "--", "compiled": ":"}
    for (family, mode), pts in sorted(series(args.json).items()):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, styles[mode], marker="o", color=colors.get(family, "k"),
                label=f"{LABELS.get(family, family)}, {mode}")
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
