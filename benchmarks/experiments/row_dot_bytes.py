"""What the FFN's row dot costs, and for what (nineteenth session, RESULTS R.5).

The σ-MoE backward's row dot reads d h and h [N, S] and writes the ReLU input's gradient (gate * d h
where h > 0) and, with GATED_WGRAD, g·h. At 244M it moves 256 MB in ~65 µs per call, near the H200's
bandwidth. Yet dropping the g·h write (64 MB) saved only ~2 µs per call in a step (R.5). This times
the kernel as the FFN calls it, with and without that write, beside torch copies of the same byte
counts, at the tile the kernel picks and with other rows per program (`row_dot_triton`'s `rows_per_program`).

    python benchmarks/experiments/row_dot_bytes.py      (CUDA; on CPU the tiny shape, interpreted)
"""
import torch

from common import bench, ffn_problem, shapes
from moeut.kernels.expert_mm import row_dot_triton


def main(names=None):
    results = []
    for name in shapes(names):
        p = ffn_problem(name)
        d_h, h = p.gh, p.h.relu()
        gate, dst = p.gate, p.r.slot_N
        mb = d_h.numel() * d_h.element_size() / 2 ** 20

        def row_dot(gate_b, br=None):
            return row_dot_triton(d_h, h, None, gate, dst, relu_mask=True, gate_b=gate_b, rows_per_program=br)

        want = row_dot(True)

        def error(got):   # every output of a row-dot variant against the default one's
            return max((a.float() - b.float()).abs().max().item() if a.numel() else 0.0
                       for a, b in zip(got, want) if a.numel() or b.numel() == 0)
        results.append(dict(label="no g·h", error=error(row_dot(False))))
        for br in (16, 32, 128):
            results.append(dict(label=f"{br} rows", error=error(row_dot(True, br))))
        rows = [(f"{name}  row dot, writes g·h too ({4 * mb:.0f} MB)", lambda: row_dot(True)),
                (f"{name}  row dot, no g·h ({3 * mb:.0f} MB)", lambda: row_dot(False))]
        for br in (16, 32, 128):
            rows.append((f"{name}  row dot, writes g·h too, {br} rows per program",
                         lambda br=br: row_dot(True, br)))
        out = torch.empty_like(d_h)
        rows += [(f"{name}  torch.stack of d h and h ({4 * mb:.0f} MB)", lambda: torch.stack([d_h, h])),
                 (f"{name}  torch.mul of d h and h ({3 * mb:.0f} MB)", lambda: torch.mul(d_h, h, out=out)),
                 (f"{name}  torch clone of d h ({2 * mb:.0f} MB)", lambda: d_h.clone())]
        for label, fn in rows:
            ms, moved = bench(fn), _megabytes(label)
            rate = f"  {moved / 2 ** 20 / ms * 1e3:.2f} TB/s" if moved and ms == ms else ""
            print(f"{label}: {ms:.4f} ms{rate}", flush=True)
    return results


def _megabytes(label: str) -> float:
    """The "(... N MB)" figure of a row's label, 0 when it has none."""
    if not label.endswith(" MB)"):
        return 0.0
    return float(label.rsplit("(", 1)[1].split()[0])


if __name__ == "__main__":
    main()
