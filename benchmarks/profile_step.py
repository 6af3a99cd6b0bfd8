"""Where the time of one training step goes: torch.profiler over a few steps of a model, printed as
a table of kernel categories (expert GEMMs, weight gradients, top-k sums, casts, LayerNorm, ...: the
rows RESULTS and LOG reason with) and a table of GPU kernels (total time per step, share, calls) grouped
by name. With --sites, a third table: the glue kernels (everything but the expert GEMMs, weight
gradients, top-k sums, attention core and AdamW) by the line of moeut code that launched them, or for
backward kernels the autograd node they ran in, to say which casts, copies and adds to remove. With
--launches, the expert kernels by launch shape (grid and block, read from the profile's Chrome trace):
a grid is fixed by the shapes and the tile config, so each row is one pass of one projection (the
FFN's against SwitchHead's), which the by-name table lumps together.

    python benchmarks/profile_step.py --model moeut-244M --batch 16 [--top 30] [--trace trace.json] \
        [--json out.json] [--sites 40] [--launches 30]

Two --json files of the same model (a switch off and on) compare with `profile_diff.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_throughput import build, training_step


def kernel_times(fn, iters: int, trace: Path = None, sites: bool = False):
    """{kernel name: [total us, calls]} of the GPU kernels `iters` calls of fn run (after one warm call);
    with `sites`, also `site_times` of the same profile."""
    fn()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, with_stack=sites) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(str(trace))
    per_kernel = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        # A record_function range (the optimizer's "Optimizer.step#AdamW.step") shows up on the GPU
        # timeline spanning its kernels: counting it too would count them twice.
        annotation = getattr(ev, "is_user_annotation", False) or ev.name.startswith(("Optimizer.", "ProfilerStep#"))
        if ev.device_type == torch.autograd.DeviceType.CUDA and not annotation:
            name = ev.name[:90]
            per_kernel[name][0] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            per_kernel[name][1] += 1
    if sites:
        py = sorted({e.name for e in prof.events() if ".py(" in e.name and "moeut" in e.name})
        print(f"({len(py)} Python functions of moeut in the profile, e.g. {py[:3]})")
        return per_kernel, site_times(prof.events())
    return per_kernel


# The kernels --launches splits by launch shape.
EXPERT_KERNELS = (
    "_expert_mm_kernel",
    "_weight_grad_kernel",
    "_sum_choices_kernel",
    "_row_dot_kernel",
    "_sum_splits_kernel",
)


def launch_times(trace_events, names=EXPERT_KERNELS):
    """{(kernel name, grid, block): [total us, calls]} of the kernel events of a Chrome trace (torch's
    profiler writes each launch's grid and block among its args)."""
    out = defaultdict(lambda: [0.0, 0])
    for ev in trace_events:
        if ev.get("cat") == "kernel" and ev.get("name", "").startswith(names):
            args = ev.get("args", {})
            key = (ev["name"], tuple(args.get("grid", ())), tuple(args.get("block", ())))
            out[key][0] += ev.get("dur", 0.0)
            out[key][1] += 1
    return out


def print_launches(per_launch, iters: int, top: int) -> None:
    print(f"{'ms/step':>8s} {'calls':>6s} {'us/call':>8s}  {'kernel':22s} {'grid':>16s} {'block':>12s}")
    for (name, grid, block), (us, n) in sorted(per_launch.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{us / iters / 1e3:8.3f} {n / iters:6.0f} {us / n:8.1f}  {name:22s} {str(grid):>16s} {str(block):>12s}")


# Categories --sites leaves out: the kernels themselves, not the glue around them.
NOT_GLUE = ("expert GEMMs", "expert weight gradients", "top-k sums", "attention core", "AdamW")


def _site(ev) -> str:
    """Where an op ran: the two innermost moeut functions above it ("file(def line): name", from the
    Python tracer's events that enclose it), and the autograd node when it ran in the backward."""
    node, frames = "", []
    e = ev
    while e is not None:
        if "moeut/" in e.name and ".py(" in e.name and len(frames) < 2:  # paths differ between machines
            frames.append(e.name.rsplit("moeut/", 1)[1])
        if not node and e.name.startswith("autograd::engine::evaluate_function: "):
            node = e.name.split(": ", 1)[1]
        e = e.cpu_parent
    site = " < ".join(frames) or "?"
    return f"{site} [{node}]" if node else site


def site_times(events, use_kernels: bool = True):
    """{(category, site, op, kernel): [total us, calls]} for the glue kernels of a profile taken with
    with_stack=True. On a machine without CUDA (tests), leaf CPU ops stand in for kernels."""
    out = defaultdict(lambda: [0.0, 0])
    for ev in events:
        if use_kernels:
            launched = [(k.name, k.duration) for k in getattr(ev, "kernels", [])]
        else:
            launched = (
                [(ev.name, ev.self_cpu_time_total)] if not ev.cpu_children and ev.name.startswith("aten::") else []
            )
        if not launched:
            continue
        op = ev  # the runtime's launch call -> the aten op above it (none for a Triton launch)
        while op is not None and not op.name.startswith("aten::"):
            op = op.cpu_parent
        site, op_name = _site(ev), op.name if op is not None else "-"
        for name, us in launched:
            cat = category(name) if use_kernels else "cpu op"
            if cat in NOT_GLUE:
                continue
            key = (cat, site, op_name, name[:48])
            out[key][0] += us
            out[key][1] += 1
    return out


def print_sites(per_site, iters: int, top: int) -> None:
    total = sum(v[0] for v in per_site.values())
    print(f"glue kernels by site: {total / iters / 1e3:.2f} ms per step")
    print(f"{'ms/step':>8s} {'calls':>6s}  {'category':20s} {'site':60s} {'op':28s} kernel")
    for (cat, site, op, name), (us, n) in sorted(per_site.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{us / iters / 1e3:8.3f} {n // iters:6d}  {cat:20s} {site[:60]:60s} {op[:28]:28s} {name}")


def clear_grads(module, *tensors) -> None:
    """Gradients back to None before a timed backward, as a training step's zero_grad(set_to_none=True)
    leaves them: accumulating into the last call's would time an fp32 add per parameter that a step
    never runs."""
    for t in (*module.parameters(), *tensors):
        t.grad = None


# (category, substrings of a kernel's name), first match wins: MoEUT's own kernels, then the glue and
# what a dense model runs too. Anything else is "other".
CATEGORIES = [
    ("expert GEMMs", ("_expert_mm_kernel",)),
    ("expert weight gradients", ("_weight_grad_kernel", "_sum_splits_kernel")),
    ("top-k sums", ("_sum_choices_kernel",)),
    ("row dots", ("_row_dot_kernel",)),
    ("router and regulariser", ("_sigmoid_topk", "_router", "_prob_sum")),
    ("RoPE", ("_rope_kernel",)),
    ("bf16 casts", ("bfloat16_copy_kernel",)),
    ("other copies", ("direct_copy_kernel", "copy_kernel", "CatArrayBatched")),
    ("fp32 adds", ("CUDAFunctor_add",)),
    ("LayerNorm", ("layer_norm", "GammaBeta")),
    ("attention core", ("sdpa", "flash", "fmha")),
    ("AdamW", ("AdamW", "multi_tensor_apply")),
    ("sort and index glue", ("radix_sort", "RadixSort", "scatter_gather", "index", "searchsorted", "cub::", "_route_")),
    ("dense GEMMs (cuBLAS)", ("nvjet", "gemm", "cutlass", "xmma")),
]


def category(kernel_name: str) -> str:
    for label, keys in CATEGORIES:
        if any(k in kernel_name for k in keys):
            return label
    return "other"


def by_category(per_kernel):
    """{category: [total us, calls]}, categories in CATEGORIES' order, then "other"."""
    out = {label: [0.0, 0] for label, _ in CATEGORIES + [("other", ())]}
    for name, (us, n) in per_kernel.items():
        out[category(name)][0] += us
        out[category(name)][1] += n
    return {k: v for k, v in out.items() if v[1]}


def busy_ms(per_kernel, iters: int) -> float:
    return sum(v[0] for v in per_kernel.values()) / iters / 1e3


def gpu_and_wall_ms(fn, iters: int = 20):
    """(GPU-busy ms per call, kernels per call, wall ms per call) of fn. The device's host is slow, so
    the wall time of a small eager pass is launch-bound; a graphed step sees the GPU-busy time."""
    import triton.testing

    per_kernel = kernel_times(fn, iters)
    kernels = sum(calls for _, calls in per_kernel.values()) // iters
    wall = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    return busy_ms(per_kernel, iters), kernels, wall


def print_table(per_kernel, iters: int, top: int, unit: str = "step", what: str = "kernel") -> None:
    total = sum(v[0] for v in per_kernel.values())
    print(f"{'ms/' + unit:>8s} {'share':>6s} {'calls':>6s}  {what}")
    for name, (us, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{us / iters / 1e3:8.3f} {100 * us / total:5.1f}% {n // iters:6d}  {name}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="moeut-244M")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--trace", type=Path, help="also write a Chrome trace")
    ap.add_argument("--json", type=Path, help="also write the categories and kernels (ms per step, calls per step)")
    ap.add_argument(
        "--sites",
        type=int,
        default=0,
        metavar="N",
        help="also print the N costliest glue kernels by the moeut line (or autograd node) that "
        "launched them (a second, slower profile with Python stacks)",
    )
    ap.add_argument(
        "--launches",
        type=int,
        default=0,
        metavar="N",
        help="also print the N costliest expert-kernel launch shapes (grid, block), from the trace",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    step = training_step(build(args.model, None), args.batch)
    for _ in range(2):
        step()
    trace = args.trace
    if args.launches and trace is None:
        import tempfile

        trace = Path(tempfile.mkdtemp()) / "trace.json"
    per_kernel = kernel_times(step, args.steps, trace)
    print(
        f"{args.model} batch {args.batch}: GPU busy {busy_ms(per_kernel, args.steps):.1f} ms per step, "
        f"{sum(v[1] for v in per_kernel.values()) / args.steps:.0f} kernels per step"
    )
    print_table(by_category(per_kernel), args.steps, len(CATEGORIES) + 1, what="category")
    print()
    print_table(per_kernel, args.steps, args.top)
    if args.launches:
        print(f"\nexpert kernels by launch shape ({trace}):")
        print_launches(launch_times(json.loads(trace.read_text())["traceEvents"]), args.steps, args.launches)
    if args.sites:
        print()
        _, per_site = kernel_times(step, args.steps, sites=True)
        print_sites(per_site, args.steps, args.sites)
    from moeut.kernels.weight_grad import autotune_choices  # (configs vary between processes: benchmarks/LOG.md)

    choices = autotune_choices()
    print("\nautotuning in this process (key -> config):")
    for kernel, key, config in choices:
        print(f"  {kernel} {key} -> {config}")
    if args.json:
        rows = lambda d: {k: dict(ms=us / args.steps / 1e3, calls=n / args.steps) for k, (us, n) in d.items()}
        args.json.write_text(
            json.dumps(
                dict(
                    model=args.model,
                    batch=args.batch,
                    gpu=torch.cuda.get_device_name(),
                    torch=torch.__version__,
                    busy_ms=busy_ms(per_kernel, args.steps),
                    categories=rows(by_category(per_kernel)),
                    kernels=rows(per_kernel),
                    autotune=[dict(kernel=k, key=key, config=c) for k, key, c in choices],
                ),
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
