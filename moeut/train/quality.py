"""Time to quality: how soon each run of a sweep reaches a target validation perplexity, counted in
training tokens, in step-time seconds (the GPU time the steps took, `monitor.StepClock`) and in
wall-clock seconds since launch, against a baseline group of runs (the dense model, by default).

The target is the baseline's final perplexity (the mean over its seeds) unless the sweep sets one.
A run reaches it where its validation curve first crosses it, interpolated between the two
evaluations around the crossing (linearly in log-perplexity); a run whose first evaluation is already
below the target is credited with that evaluation's cost (an upper bound). The baseline's cost is what
its runs spent in all (tokens, seconds at their last evaluation): its final perplexity is the target.
Ratios are a group's mean cost to reach the target over the baseline's mean total cost.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional

AXES = ("tokens", "train_seconds", "wall_seconds")


def read_curve(run_dir: Path) -> List[Dict[str, float]]:
    """The run's validations in step order: [{step, val_ppl, tokens, train_seconds, wall_seconds}]
    (records from before the trainer logged its clock have only step and val_ppl)."""
    from moeut.train.run_dir import metric_records

    points = {}
    for r in metric_records(run_dir):
        v = r.get("val_ppl")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
            points[r["step"]] = {
                "step": r["step"],
                "val_ppl": float(v),
                **{
                    k: float(r[k])
                    for k in AXES
                    if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) and math.isfinite(r[k])
                },
            }
    return [points[s] for s in sorted(points)]


def crossing(curve: List[Dict[str, float]], target: float, axis: str) -> Optional[float]:
    """Where on `axis` the curve first reaches `target` perplexity (see the module docstring), or None."""
    prev = None
    for p in curve:
        if axis not in p:
            return None
        if p["val_ppl"] <= target:
            if prev is None:
                return p[axis]
            a, b = math.log(prev["val_ppl"]), math.log(p["val_ppl"])
            frac = (a - math.log(target)) / (a - b) if a != b else 1.0
            return prev[axis] + frac * (p[axis] - prev[axis])
        prev = p
    return None


def _mean_std(values: List[float]) -> Dict[str, Optional[float]]:
    return {
        "mean": statistics.mean(values) if values else None,
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def summarize(
    runs: Dict[str, Dict[str, Any]], baseline: Optional[str] = None, target_ppl: Optional[float] = None
) -> Dict[str, Any]:
    """`runs`: {name: {"group", "model", "curve"}} -> per group: final perplexity, cost to reach the target
    and in all (each mean ± std over its runs), and ratios to the baseline group."""
    groups: Dict[str, List[str]] = {}
    for name, r in runs.items():
        if r.get("curve"):
            groups.setdefault(r.get("group") or name, []).append(name)
    if baseline is None:
        dense = [
            g for g, names in groups.items() if all(str(runs[n].get("model", "")).startswith("dense") for n in names)
        ]
        baseline = dense[0] if len(dense) == 1 else None
    if baseline is not None and baseline not in groups:
        raise ValueError(f"the baseline group {baseline!r} has no finished run; groups: {sorted(groups)}")
    if target_ppl is None and baseline is not None:
        target_ppl = statistics.mean(runs[n]["curve"][-1]["val_ppl"] for n in groups[baseline])
    out: Dict[str, Any] = {"baseline": baseline, "target_ppl": target_ppl, "groups": {}}
    for g, names in groups.items():
        curves = [runs[n]["curve"] for n in names]
        entry = {
            "runs": names,
            "final_ppl": _mean_std([c[-1]["val_ppl"] for c in curves]),
            "total": {a: _mean_std([c[-1][a] for c in curves if a in c[-1]]) for a in AXES},
        }
        if target_ppl is not None:
            reached = {a: [x for c in curves if (x := crossing(c, target_ppl, a)) is not None] for a in AXES}
            entry["to_target"] = {a: _mean_std(v) for a, v in reached.items()}
            entry["reached"] = f"{len(reached['tokens'])}/{len(curves)}"
        out["groups"][g] = entry
    if baseline is not None:
        base = out["groups"][baseline]["total"]
        for g, entry in out["groups"].items():
            cost = base if g == baseline else entry.get("to_target", {})
            entry["ratio"] = {
                a: (cost[a]["mean"] / base[a]["mean"])
                if cost.get(a, {}).get("mean") is not None and base[a]["mean"]
                else None
                for a in AXES
            }
    return out


def _fmt(ms: Optional[Dict[str, Any]], digits: int = 1, scale: float = 1.0) -> str:
    if not ms or ms.get("mean") is None:
        return "not reached"
    text = f"{ms['mean'] / scale:.{digits}f}"
    return text + (f" ± {ms['std'] / scale:.{digits}f}" if ms.get("std") is not None else "")


def markdown(summary: Dict[str, Any]) -> str:
    """The time-to-quality table of `summarize`."""
    target = summary.get("target_ppl")
    lines = [
        f"target: validation perplexity {target:.2f}"
        + (f" (the final perplexity of {summary['baseline']})" if summary.get("baseline") else "")
        if target is not None
        else "no target: no baseline group and no target_ppl",
        "",
        "| group | runs | final perplexity | tokens to target (M) | GPU s to target | wall s to target "
        "| GPU-time ratio | token ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g, e in summary["groups"].items():
        base = g == summary.get("baseline")
        cost = e["total"] if base else e.get("to_target", {})
        ratio = e.get("ratio") or {}
        r = lambda a: f"{ratio[a]:.3f}" if ratio.get(a) is not None else "-"
        lines.append(
            f"| {g}{' (baseline)' if base else ''} | {len(e['runs'])} | {_fmt(e['final_ppl'], 2)} | "
            f"{_fmt(cost.get('tokens'), 2, 1e6)} | {_fmt(cost.get('train_seconds'))} | "
            f"{_fmt(cost.get('wall_seconds'))} | {r('train_seconds')} | {r('tokens')} |"
        )
    return "\n".join(lines)


def plot(runs: Dict[str, Dict[str, Any]], summary: Dict[str, Any], png: Path) -> bool:
    """Validation perplexity against GPU (step-time) seconds and against tokens, one line per run, one
    colour per group, the target dashed. False when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colours = {g: f"C{i}" for i, g in enumerate(summary["groups"])}
    for ax, axis, label, scale in (
        (axes[0], "train_seconds", "GPU time: step seconds", 1.0),
        (axes[1], "tokens", "training tokens (millions)", 1e6),
    ):
        for g, entry in summary["groups"].items():
            for i, name in enumerate(entry["runs"]):
                pts = [p for p in runs[name]["curve"] if axis in p]
                ax.plot(
                    [p[axis] / scale for p in pts],
                    [p["val_ppl"] for p in pts],
                    marker=".",
                    lw=1.2,
                    color=colours[g],
                    alpha=0.85,
                    label=g if i == 0 else None,
                )
        if summary.get("target_ppl"):
            ax.axhline(summary["target_ppl"], color="0.4", ls="--", lw=1, label="target")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("validation perplexity")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(frameon=False)
    fig.tight_layout()
    fig.savefig(png, dpi=140)
    plt.close(fig)
    return True
