"""Plot training tokens/s against model size for MoEUT (ours, official) and dense, from the figures
recorded in benchmarks/RESULTS.md (H200, bf16, context 1024). Writes benchmarks/results/throughput.png.

    python benchmarks/plot_throughput.py
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (parameters in millions, tokens/s in thousands), 2026-11-28, one H200 (RESULTS.md A.2; the 44M
# points are the first session's single-GPU batch-16 figures, RESULTS.md §4)
SERIES = {
    "moeut (this library)": [(44.3, 79.9), (243.3, 81.8), (1040.3, 19.7)],
    "official MoEUT release (NOTES.md §6)": [(243.3, 45.6), (1040.3, 11.2)],
    "dense baseline (this library)": [(44.5, 228.8), (243.6, 123.3), (1044.3, 49.0)],
    "Llama (transformers, SDPA)": [(243.4, 96.4)],
}


def main():
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for (name, pts), marker in zip(SERIES.items(), "osD^"):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker=marker, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("training tokens/s (thousands)")
    ax.set_title("Training throughput on one H200 (bf16, context 1024)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(__file__).parent / "results" / "throughput.png"
    fig.savefig(out)
    print(out)


if __name__ == "__main__":
    main()
