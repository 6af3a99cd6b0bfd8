"""Where the time of one training step goes: torch.profiler over a few steps of a model, printed as
a table of kernel categories (expert GEMMs, weight gradients, top-k sums, casts, LayerNorm, ...: the
rows PERF_NOTES reasons with) and a table of GPU kernels (total time per step, share, calls) grouped
by name.

    python benchmarks/profile_step.py --model moeut-244M --batch 16 [--top 30] [--trace trace.json] [--json out.json]
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
from train_throughput import build, training_step  # noqa: E402


def kernel_times(fn, iters: int, trace: Path = None):
    """{kernel name: [total us, calls]} of the GPU kernels `iters` calls of fn run (after one warm call)."""
    fn()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
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
    return per_kernel


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
    ("expert weight gradients", ("_weight_grad_kernel",)),
    ("top-k sums", ("_sum_choices_kernel",)),
    ("row dots", ("_row_dot_kernel",)),
    ("router top-k", ("_sigmoid_topk", "_router")),
    ("RoPE", ("_rope_kernel",)),
    ("bf16 casts", ("bfloat16_copy_kernel",)),
    ("other copies", ("direct_copy_kernel", "copy_kernel", "CatArrayBatched")),
    ("fp32 adds", ("CUDAFunctor_add",)),
    ("LayerNorm", ("layer_norm", "GammaBeta")),
    ("attention core", ("sdpa", "flash", "fmha")),
    ("AdamW", ("AdamW", "multi_tensor_apply")),
    ("sort and index glue", ("radix_sort", "RadixSort", "scatter_gather", "index", "searchsorted", "cub::")),
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
    args = ap.parse_args()
    torch.manual_seed(0)
    step = training_step(build(args.model, None), args.batch)
    for _ in range(2):
        step()
    per_kernel = kernel_times(step, args.steps, args.trace)
    print(f"{args.model} batch {args.batch}: GPU busy {busy_ms(per_kernel, args.steps):.1f} ms per step, "
          f"{sum(v[1] for v in per_kernel.values()) / args.steps:.0f} kernels per step")
    print_table(by_category(per_kernel), args.steps, len(CATEGORIES) + 1, what="category")
    print()
    print_table(per_kernel, args.steps, args.top)
    if args.json:
        rows = lambda d: {k: dict(ms=us / args.steps / 1e3, calls=n / args.steps) for k, (us, n) in d.items()}  # noqa: E731
        args.json.write_text(json.dumps(dict(model=args.model, batch=args.batch, gpu=torch.cuda.get_device_name(),
                                             torch=torch.__version__, busy_ms=busy_ms(per_kernel, args.steps),
                                             categories=rows(by_category(per_kernel)), kernels=rows(per_kernel)),
                                        indent=1))


if __name__ == "__main__":
    main()
