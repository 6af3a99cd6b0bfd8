"""SwitchHead attention block vs a dense attention block with the same number of heads: forward and
forward+backward time (bf16 autocast, batch x 1024 tokens), for the issue-3 target "the attention
block no slower than a dense attention block with the same number of heads".

The dense block is SwitchHeadRope with one expert per head (plain multi-head attention with a
sigmoid output gate, the same Q/K/RoPE/SDPA path), so the difference is the expert V/O projections.

    python benchmarks/attention_block.py [--sizes 244M,1B] [--batch 16] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from profile_step import busy_ms, clear_grads, kernel_times, print_table  # noqa: E402
from moeut import profiles  # noqa: E402
from moeut.attention import AttentionMask, SwitchHeadRope  # noqa: E402


def bench(fn):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median")


def time_block(att: SwitchHeadRope, x: torch.Tensor, top: int):
    mask = AttentionMask(None, None, is_causal=True)

    def fwd():
        with torch.autocast("cuda", torch.bfloat16):
            return att(x, x, x, mask)[0]

    def fwd_bwd():
        clear_grads(att, x)
        fwd().backward(torch.ones_like(x))

    wall = bench(fwd), bench(fwd_bwd)
    fwd_k, fb_k = kernel_times(fwd, 5), kernel_times(fwd_bwd, 5)
    if top:
        print_table(fb_k, 5, top, unit="call")
    return wall + (busy_ms(fwd_k, 5), busy_ms(fb_k, 5))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="244M,1B")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--kernels", type=int, default=0, help="print this many top kernels per block")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    head = f"{'size':5s} {'block':32s} {'fwd ms':>8s} {'fwd+bwd ms':>11s} {'GPU fwd':>8s} {'GPU fwd+bwd':>12s}"
    print(head)
    for size in args.sizes.split(","):
        p = getattr(profiles, f"MoEUT_{size}")
        D, H, Dh = p["d_model"], p["n_heads"], p["d_head"]
        x = torch.randn(args.batch, 1024, D, device="cuda", requires_grad=True)
        for name, E in ((f"SwitchHead ({p['att_n_experts']} experts, top-2)", p["att_n_experts"]),
                        ("dense (1 expert per head)", 1)):
            torch.manual_seed(0)
            att = SwitchHeadRope(D, H, E, projection_size=Dh, moe_k=2).cuda()
            att.reset_parameters(1.0)
            f, fb, gf, gfb = time_block(att, x, args.kernels)
            rows.append(dict(size=size, block=name, fwd_ms=f, fwd_bwd_ms=fb, gpu_fwd_ms=gf, gpu_fwd_bwd_ms=gfb))
            print(f"{size:5s} {name:32s} {f:8.3f} {fb:11.3f} {gf:8.3f} {gfb:12.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), indent=2))


if __name__ == "__main__":
    main()
