"""moeut's LayerNorm kernels against torch's LayerNorm as a bf16-autocast model runs it: forward
(torch's fp32 output and the consumer's bf16 copy) and forward+backward (the bf16 gradient cast back
to fp32, LayerNorm's backward with its weight/bias gradient), on the fp32 residual stream.

    python benchmarks/norm.py [--shapes 16384x1024,8192x1536] [--json out.json] [--sweep]

Prints GPU-busy ms per call (the sum of the kernels' times, from the profiler: the device's slow host
makes the wall time of one small pass launch-bound, which a graphed step does not see), the wall
time beside it, the fused form's effective bandwidth (its minimal bytes over its GPU time), and the
fused/torch ratio of GPU time. --sweep then times the backward's launch shapes (programs, rows per tile,
warps, columns per program of the partial sums' reduction) at the first shape.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from profile_step import gpu_and_wall_ms  # noqa: E402
from moeut.ops.norm import layer_norm  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="16384x1024,8192x1536,16384x1536")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--sweep", action="store_true", help="time the backward's launch shapes at the first shape")
    args = ap.parse_args()
    rows = []
    print(f"{'shape':12s} {'pass':8s} {'torch GPU ms':>12s} {'moeut GPU ms':>12s} {'torch wall':>10s} "
          f"{'moeut wall':>10s} {'moeut GB/s':>11s} {'ratio':>6s}")
    for shape in args.shapes.split(","):
        R, D = map(int, shape.split("x"))
        x = torch.randn(R, D, device="cuda", requires_grad=True)
        w = (1 + 0.1 * torch.randn(D, device="cuda")).requires_grad_()
        b = torch.zeros(D, device="cuda", requires_grad=True)
        g = torch.randn(R, D, device="cuda", dtype=torch.bfloat16)

        def torch_fwd():
            with torch.autocast("cuda", torch.bfloat16):
                return F.layer_norm(x, (D,), w, b).to(torch.bfloat16)

        def moeut_fwd():
            with torch.autocast("cuda", torch.bfloat16):
                return layer_norm(x, w, b)

        def fwd_bwd(fwd):
            def run():
                x.grad = w.grad = b.grad = None
                fwd().backward(g)
            return run

        # bytes a fused pass must move: x read (fp32), y written (bf16); backward: x and dy read, dx written
        min_bytes = {"fwd": R * D * 6, "fwd+bwd": R * D * 6 + R * D * 10}
        for name, torch_fn, ours_fn in (("fwd", torch_fwd, moeut_fwd),
                                        ("fwd+bwd", fwd_bwd(torch_fwd), fwd_bwd(moeut_fwd))):
            (gpu_torch, _, wall_torch), (gpu_ours, _, wall_ours) = (gpu_and_wall_ms(f) for f in (torch_fn, ours_fn))
            gbs = min_bytes[name] / gpu_ours / 1e6
            print(f"{shape:12s} {name:8s} {gpu_torch:12.3f} {gpu_ours:12.3f} {wall_torch:10.3f} {wall_ours:10.3f} "
                  f"{gbs:11.0f} {gpu_ours / gpu_torch:6.2f}")
            rows.append(dict(shape=shape, pass_=name, torch_gpu_ms=gpu_torch, moeut_gpu_ms=gpu_ours,
                             torch_wall_ms=wall_torch, moeut_wall_ms=wall_ours, moeut_gbs=gbs))
    if args.sweep:
        rows += sweep(*map(int, args.shapes.split(",")[0].split("x")))
    if args.json:
        args.json.write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                                             rows=rows), indent=1))


def sweep(R: int, D: int):
    """GPU ms of the fused forward+backward per backward launch shape; the first row is the default."""
    from moeut.kernels import norm as triton_norm
    x = torch.randn(R, D, device="cuda", requires_grad=True)
    w = (1 + 0.1 * torch.randn(D, device="cuda")).requires_grad_()
    b = torch.zeros(D, device="cuda", requires_grad=True)
    g = torch.randn(R, D, device="cuda", dtype=torch.bfloat16)

    def run():
        x.grad = w.grad = b.grad = None
        with torch.autocast("cuda", torch.bfloat16):
            y = layer_norm(x, w, b)
        y.backward(g)

    default = (triton_norm.BACKWARD_PROGRAMS, triton_norm.SUM_COLUMNS)
    configs = [default] + [(p, c) for p in (256, 1024, 2048) for c in (8, 32, 64)]
    out = []
    print(f"\nbackward launch shapes at {R}x{D}: programs, partial-sum columns")
    for programs, columns in configs:
        triton_norm.BACKWARD_PROGRAMS, triton_norm.SUM_COLUMNS = programs, columns
        gpu_ms, _, _ = gpu_and_wall_ms(run)
        print(f"  {programs:5d} {columns:3d}  fwd+bwd {gpu_ms:.4f} ms")
        out.append(dict(shape=f"{R}x{D}", sweep=[programs, columns], moeut_gpu_ms=gpu_ms))
    triton_norm.BACKWARD_PROGRAMS, triton_norm.SUM_COLUMNS = default
    return out


if __name__ == "__main__":
    main()
