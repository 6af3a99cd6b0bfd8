"""Which kernels a change made faster or slower: two `profile_step.py --json` files of the same model,
compared category by category and kernel by kernel (ms per step and calls per step, B minus A).

A change can be faster on its own and slower in a training step (RESULTS.md L: the gate gradient in the
down projection's epilogue saved 0.08 ms standalone and cost 1.3 ms per graphed step). Profiling the
step with the switch off and on, in the same device call, and diffing the two says which kernels moved:

    MOEUT_X=0 python benchmarks/profile_step.py --model moeut-244M --json off.json
    python benchmarks/profile_step.py --model moeut-244M --json on.json
    python benchmarks/profile_diff.py off.json on.json [--top 25]

Triton names a kernel by its function, not by its constexpr variant or config: every expert GEMM is one
`_expert_mm_kernel` row. So the files also hold the config each autotuning key settled on
(`triton_weight_grad.autotune_choices`), and the keys whose configs differ between the runs are listed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Tuple


def load(path: Path) -> dict:
    data = json.loads(path.read_text())
    for key in ("busy_ms", "categories", "kernels"):
        if key not in data:
            raise SystemExit(f"{path}: not a profile_step.py --json file (no {key!r})")
    return data


def diff_rows(a: Dict[str, dict], b: Dict[str, dict]) -> List[Tuple[str, float, float, float, float]]:
    """(name, ms in a, ms in b, b - a, calls b - a) for every name in either, largest change first."""
    rows = []
    for name in set(a) | set(b):
        ra, rb = a.get(name, dict(ms=0.0, calls=0.0)), b.get(name, dict(ms=0.0, calls=0.0))
        rows.append((name, ra["ms"], rb["ms"], rb["ms"] - ra["ms"], rb["calls"] - ra["calls"]))
    return sorted(rows, key=lambda r: (-abs(r[3]), r[0]))


def autotune_differences(a: list, b: list) -> List[Tuple[str, str, str]]:
    """(kernel and key, config in a or "-", config in b or "-") for every key whose config differs."""
    as_map = lambda rows: {f"{r['kernel']} {r['key']}": r["config"] for r in rows}
    ma, mb = as_map(a), as_map(b)
    return [(k, ma.get(k, "-"), mb.get(k, "-")) for k in sorted(set(ma) | set(mb)) if ma.get(k) != mb.get(k)]


def print_rows(title: str, rows, top: int) -> None:
    print(f"{'A ms':>8s} {'B ms':>8s} {'B - A':>8s} {'calls':>6s}  {title}")
    for name, ms_a, ms_b, delta, calls in rows[:top]:
        print(f"{ms_a:8.3f} {ms_b:8.3f} {delta:+8.3f} {calls:+6.0f}  {name}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="profile_step.py --json of the baseline")
    ap.add_argument("b", type=Path, help="profile_step.py --json of the change")
    ap.add_argument("--top", type=int, default=25, help="kernels to print (largest change first)")
    args = ap.parse_args(argv)
    a, b = load(args.a), load(args.b)
    if (a.get("model"), a.get("batch")) != (b.get("model"), b.get("batch")):
        print(
            f"warning: comparing {a.get('model')} batch {a.get('batch')} with {b.get('model')} batch {b.get('batch')}"
        )
    print(
        f"GPU busy per step: A {a['busy_ms']:.2f} ms, B {b['busy_ms']:.2f} ms, B - A {b['busy_ms'] - a['busy_ms']:+.2f}"
    )
    print()
    print_rows("category", diff_rows(a["categories"], b["categories"]), len(a["categories"]) + len(b["categories"]))
    print()
    print_rows("kernel", diff_rows(a["kernels"], b["kernels"]), args.top)
    if "autotune" in a and "autotune" in b:
        changed = autotune_differences(a["autotune"], b["autotune"])
        print(f"\nautotuning keys whose config differs: {len(changed)}")
        for key, config_a, config_b in changed:
            print(f"  {key}\n    A: {config_a}\n    B: {config_b}")


if __name__ == "__main__":
    main()
