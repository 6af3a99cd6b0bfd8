"""Weight gradients with the gate already applied to one operand (eighteenth session).

A gated expert projection's weight gradient is dW[e] = sum over e's routed rows n of g_n x_n^T dy_n. The
weight-gradient kernel applies g_n inside its K loop, to one operand tile after it is loaded
(`_wgrad_segment`: GSCALE), which sends that operand through registers before the tensor-core product.
The ungated passes run faster (RESULTS I.3: up dW 313 TFLOP/s against down dW 238). If a pass that
already reads the operand wrote the gated copy (the FFN's row dot reads h; SwitchHead's output
projection's reads its input), the kernel would run ungated. This times, per projection, three
segments per launch as in a step:

- FFN down dW: h [N, S] gated in the loop vs h*g precomputed (d out rows gathered either way);
- SwitchHead output dW: gathered head outputs gated in the loop vs a gated routed copy;
- SwitchHead value dW: gathered x gated in the loop vs the routed d v rows gated (x gathered either way);
- the FFN's up dW (never gated) for scale, and the cost of writing a gated copy alone;
- SwitchHead's passes (routed over heads x experts: 40 at 244M, 72 at 1B) with each expert's rows
  split over 1, 2, 4 or 8 programs, and with the count `wgrad_splits` picks.

    python benchmarks/experiments/prescaled_wgrad.py      (CUDA; on CPU the tiny shape, interpreted)
"""
import torch

from common import DEVICE, bench, ffn_problem, shapes, try_variant
from moeut.ops import grouped_mm as expert_ops
from moeut.ops.expert_mm import route
from moeut.kernels import weight_grad as triton_weight_grad
from moeut.kernels.weight_grad import weight_grad_segments_triton, wgrad_splits

# name: (heads, attention experts per head); SwitchHead's value and output projections pick 2 of its
# head's experts per (token, head), routed over heads x experts (40 at 244M, 72 at 1B) as in the model
ATTENTION = {"244M": (4, 10), "1B": (6, 12), "tiny": (2, 3)}


def main(names=None):
    results = []
    for name in shapes(names):
        p = ffn_problem(name)
        D, T, S = p.D, p.T, p.S
        dt = p.x.dtype
        H, E_att = ATTENTION[name]
        problems = []
        # FFN: three applications with their own routing, gates, h and d out
        ffn = []
        for _ in range(3):
            expert = torch.rand(T, p.E, device=DEVICE).topk(p.K, dim=-1).indices
            ffn.append(dict(r=route(expert, p.E), h=torch.randn(p.N, S, device=DEVICE, dtype=dt),
                            gh=torch.randn(p.N, S, device=DEVICE, dtype=dt),
                            dy=torch.randn(T, D, device=DEVICE, dtype=dt), g=torch.rand(p.N, device=DEVICE)))
        for f in ffn:
            f["hg"] = (f["h"].float() * f["g"][:, None]).to(dt)
        flop = 3 * 2.0 * p.N * D * S
        problems += [
            ("FFN up dW (ungated)", flop, [(p.x, f["gh"], f["r"].offsets_E1, f["r"].rows_N, None, None, None) for f in ffn]),
            ("FFN down dW, gated in loop", flop,
             [(f["h"], f["dy"], f["r"].offsets_E1, None, f["r"].rows_N, f["g"], None) for f in ffn]),
            ("FFN down dW, h*g given", flop,
             [(f["hg"], f["dy"], f["r"].offsets_E1, None, f["r"].rows_N, None, None) for f in ffn]),
        ]
        # SwitchHead: routed row n is (token, head, choice); head rows (token, head) are rows_N, tokens rows_N // H
        att = []
        for _ in range(3):
            local = torch.rand(T * H, E_att, device=DEVICE).topk(2, dim=-1).indices
            head = torch.arange(T * H, device=DEVICE) % H
            r = route(local + head[:, None] * E_att, H * E_att)
            N = r.rows_N.numel()
            a = dict(r=r, tok=r.rows_N // H, o=torch.randn(T * H, S, device=DEVICE, dtype=dt),
                     dy=torch.randn(T, D, device=DEVICE, dtype=dt), dv=torch.randn(T * H, S, device=DEVICE, dtype=dt),
                     g=torch.rand(N, device=DEVICE))
            a["og"] = (a["o"].index_select(0, r.rows_N).float() * a["g"][:, None]).to(dt)
            a["dvg"] = (a["dv"].index_select(0, r.rows_N).float() * a["g"][:, None]).to(dt)
            att.append(a)
        flop_att = 3 * 2.0 * att[0]["r"].rows_N.numel() * D * S
        problems += [
            ("SwitchHead O dW, gated in loop", flop_att,
             [(a["o"], a["dy"], a["r"].offsets_E1, a["r"].rows_N, a["tok"], a["g"], None) for a in att]),
            ("SwitchHead O dW, gated copy given", flop_att,
             [(a["og"], a["dy"], a["r"].offsets_E1, None, a["tok"], None, None) for a in att]),
            ("SwitchHead V dW, gated in loop", flop_att,
             [(p.x, a["dv"], a["r"].offsets_E1, a["tok"], a["r"].rows_N, a["g"], None) for a in att]),
            ("SwitchHead V dW, gated d v given", flop_att,
             [(p.x, a["dvg"], a["r"].offsets_E1, a["tok"], None, None, None) for a in att]),
        ]
        for label, fl, segs in problems:
            x0, g0, off0, rows0 = segs[0][:4]
            auto = wgrad_splits(off0.numel() - 1, x0.shape[1], g0.shape[1],
                                rows0.numel() if rows0 is not None else x0.shape[0], x0.device)
            # the row split where the experts are few: the automatic count, none, and a few forced
            # counts for SwitchHead's gated passes (is the automatic count right?)
            sweep = (None, 1, 2, 4, 8) if label.startswith("SwitchHead") and "given" in label else (None,)
            for split in sweep:
                triton_weight_grad.wgrad_splits = wgrad_splits if split is None else (lambda *a, n=split: n)
                want = sum(expert_ops.weight_grad_reference(*s[:6], torch.float32) for s in segs)
                got = []

                def run():
                    got[:] = [weight_grad_segments_triton(segs, torch.float32)]
                side = ""
                if len(sweep) > 1:
                    side += f" (automatic: {auto} row ranges)" if split is None else f" ({split} row ranges)"
                results.append(try_variant(f"{name}  {label}{side}", run,
                                           lambda: ((got[0] - want).abs().max() / want.abs().max()).item(), fl))
            triton_weight_grad.wgrad_splits = wgrad_splits
        f = ffn[0]
        ms = bench(lambda: (f["h"].float() * f["g"][:, None]).to(dt))
        if ms == ms:
            print(f"{name}  writing h*g alone (torch, 3 kernels): {ms:.3f} ms", flush=True)
    return results


if __name__ == "__main__":
    main()
