"""moeut's LayerNorm kernels against torch's LayerNorm as a bf16-autocast model runs it: forward
(torch's fp32 output and the consumer's bf16 copy) and forward+backward (the bf16 gradient cast back
to fp32, LayerNorm's backward with its weight/bias gradient), on the fp32 residual stream.

    python benchmarks/norm.py [--shapes 16384x1024,8192x1536] [--json out.json]

Prints ms per call, the effective bandwidth of the fused form (its minimal bytes over its time), and the
fused/torch time ratio.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moeut.norm import layer_norm  # noqa: E402


def bench(fn):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="16384x1024,8192x1536,16384x1536")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    print(f"{'shape':12s} {'pass':8s} {'torch ms':>9s} {'moeut ms':>9s} {'moeut GB/s':>11s} {'ratio':>6s}")
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
        for name, t_torch, t_ours in (("fwd", bench(torch_fwd), bench(moeut_fwd)),
                                      ("fwd+bwd", bench(fwd_bwd(torch_fwd)), bench(fwd_bwd(moeut_fwd)))):
            gbs = min_bytes[name] / t_ours / 1e6
            print(f"{shape:12s} {name:8s} {t_torch:9.3f} {t_ours:9.3f} {gbs:11.0f} {t_ours / t_torch:6.2f}")
            rows.append(dict(shape=shape, pass_=name, torch_ms=t_torch, moeut_ms=t_ours, moeut_gbs=gbs))
    if args.json:
        args.json.write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                                             rows=rows), indent=1))


if __name__ == "__main__":
    main()
