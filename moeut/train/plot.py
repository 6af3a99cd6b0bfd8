"""`moeut plot RUN... --out PNG`: training loss and validation perplexity of one or several runs, against
training tokens and against time, from their metrics.jsonl (no TensorBoard needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Sequence

X_AXES = {
    "tokens": ("tokens", 1e6, "training tokens (millions)"),
    "time": ("train_seconds", 1.0, "training time: step seconds"),
    "wall": ("wall_seconds", 1.0, "wall-clock seconds since launch"),
    "step": ("step", 1.0, "optimizer step"),
}


def _series(records: List[dict], key: str, x: str):
    pts = [
        (r[x], r[key])
        for r in records
        if isinstance(r.get(key), (int, float))
        and isinstance(r.get(x), (int, float))
        and not isinstance(r.get(key), bool)
        and math.isfinite(r[key])
    ]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(runs: Sequence[str | Path], out: str | Path, x_axes: Sequence[str] = ("tokens", "time")) -> Path:
    """One row per x axis (tokens, step time, wall time or step), loss on the left, validation perplexity
    on the right, one line per run; records without the axis (runs from before the trainer logged its
    clock) are left out of that row. ValueError naming a run without metrics or an unknown axis."""
    from moeut.train.run_dir import check_existing_run_dir, metric_records

    unknown = [a for a in x_axes if a not in X_AXES]
    if unknown or not x_axes:
        raise ValueError(f"--x takes {', '.join(X_AXES)}, got {', '.join(unknown) or 'nothing'}")
    data = []
    for run in runs:
        check_existing_run_dir(Path(run), writable=False)
        records = metric_records(Path(run))
        if not records:
            raise ValueError(f"{run} has no metrics yet (metrics.jsonl is empty)")
        data.append((Path(run).name, records))
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install 'moeut[train]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(x_axes), 2, figsize=(10, 3.4 * len(x_axes)), squeeze=False)
    for row, axis in enumerate(x_axes):
        key, scale, label = X_AXES[axis]
        for i, (name, records) in enumerate(data):
            for col, metric in enumerate(("loss", "val_ppl")):
                xs, ys = _series(records, metric, key)
                if xs:
                    axes[row][col].plot(
                        [v / scale for v in xs],
                        ys,
                        color=f"C{i}",
                        lw=1.2,
                        marker="." if metric == "val_ppl" else None,
                        label=name,
                    )
        for col, title in enumerate(("training loss", "validation perplexity")):
            ax = axes[row][col]
            ax.set_xlabel(label)
            ax.set_ylabel(title)
            if col == 1:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
    axes[0][0].legend(frameon=False)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out
