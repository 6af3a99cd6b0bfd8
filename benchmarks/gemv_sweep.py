"""GPU time of the decoding expert kernel (`moeut::expert_gemv`) for each MoEUT_244M projection at
batch 1 and 32, over block widths and warp counts: picks the heuristic's settings.

    python benchmarks/gemv_sweep.py [--blocks 8,16,32,64,128] [--warps 1,2,4,8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from profile_step import kernel_times
from moeut.kernels import expert_gemv as tg

D, S, E, K, H, EH, KH, Dh = 1024, 128, 387, 16, 4, 10, 2, 128


def cases(R):
    heads = dict(head_k=KH, n_heads=H, head_experts=EH)
    none = dict(head_k=1, n_heads=1, head_experts=0)
    return {
        "ffn_up": ((R, D), (E, D, S), R * K, E, False, dict(per_x=K, per_out=1, relu=True, **none)),
        "ffn_down": ((R * K, S), (E, S, D), R * K, E, True, dict(per_x=1, per_out=K, relu=False, **none)),
        "value": ((R, D), (H * EH, D, Dh), R * H * KH, EH, True, dict(per_x=H * KH, per_out=KH, relu=False, **heads)),
        "output": (
            (R * H, Dh),
            (H * EH, Dh, D),
            R * H * KH,
            EH,
            True,
            dict(per_x=KH, per_out=H * KH, relu=False, **heads),
        ),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", default="auto,8,16,32,64,128")
    ap.add_argument("--warps", default="1,2,4,8")
    ap.add_argument("--batches", default="1,32")
    args = ap.parse_args()
    for R in map(int, args.batches.split(",")):
        for name, (xs, ws, C, n_exp, gated, kw) in cases(R).items():
            x = torch.randn(xs, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(ws, device="cuda", dtype=torch.bfloat16)
            expert = torch.randint(0, n_exp, (C,), device="cuda")
            gate = torch.rand(C, device="cuda") if gated else None
            results = []
            for bo in args.blocks.split(","):
                for warps in map(int, args.warps.split(",")):
                    block_o = None if bo == "auto" else int(bo)
                    try:
                        t = kernel_times(
                            lambda: tg.expert_gemv_triton(x, w, expert, gate, **kw, block_o=block_o, num_warps=warps),
                            50,
                        )
                    except Exception as e:  # a config that does not compile
                        print(f"  {name} BO={bo} warps={warps}: {type(e).__name__}")
                        continue
                    us = sum(v[0] for v in t.values()) / 50
                    results.append((us, bo, warps))
            results.sort()
            best = ", ".join(f"BO={b} w={wp}: {us:.1f}" for us, b, wp in results[:4])
            auto4 = [us for us, b, wp in results if b == "auto" and wp == 4]
            print(
                f"batch {R:3d} {name:9s} auto/4 warps {auto4[0] if auto4 else float('nan'):6.1f} us | best: {best}",
                flush=True,
            )


if __name__ == "__main__":
    main()
