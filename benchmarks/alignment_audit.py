"""Matmuls that cuBLAS would see as misaligned, in one bf16-autocast training step, found on CPU.

A bf16 matrix whose leading dimension is not a multiple of 8 elements (16 bytes), or whose data does
not start on a 16-byte boundary, sends cuBLAS to slower kernels. On the H200 this cost the dense 244M
baseline a third of its speed: its d_ff of 4110 ran at 149.5k tokens/s against 223.7k when padded
to 4112 (LOG.md, sixth session). The same fault put MoEUT's router (387 experts) on sm75 `align1` kernels,
7 ms per 244M step. This tool lists every such matmul of a model's forward and backward by shape and
by the line of moeut code that issued it. Check a new model or baseline with it before timing it.

    python benchmarks/alignment_audit.py --model dense-244M --layers 2 [--tokens 1024]

Our own expert kernels (`moeut::` operators) align their operands themselves and are not listed.
"""

from __future__ import annotations

import collections
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "addmv", "mv"}


def misaligned(t: torch.Tensor) -> bool:
    """True if a matrix operand (the last two dims of t) is misaligned for vectorised GPU loads."""
    if t.dim() < 2 or t.numel() == 0:
        return False
    per_16_bytes = max(1, 16 // t.element_size())
    if t.data_ptr() % 16:
        return True
    rows, cols = t.stride(-2), t.stride(-1)
    if cols == 1 or t.shape[-1] == 1:
        leading = rows
    elif rows == 1 or t.shape[-2] == 1:
        leading = cols  # a transposed (column-major) view
    else:
        return True  # no unit-stride dim at all
    batch = [s for s, n in zip(t.stride()[:-2], t.shape[:-2]) if n > 1]
    return any(s % per_16_bytes for s in [leading, *batch]) if t.shape[-2] > 1 and t.shape[-1] > 1 else False


def _site() -> str:
    node = torch._C._current_autograd_node()
    if node is not None:
        return f"backward of {type(node).__name__}"
    ours = [f for f in traceback.extract_stack() if "/moeut/" in f.filename]
    return f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"


class _Audit(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found = collections.Counter()
        self.matmuls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ not in MATMUL_OPS:
            return func(*args, **kwargs)
        if any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            # A CPU without bf16 matrix units runs bf16 GEMMs ~50x slower than fp32 ones. The audit
            # needs the operands' layouts, not bf16 rounding: compute in fp32 and hand back a fresh
            # contiguous bf16 result, the layout the bf16 GEMM returns.
            wide = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
            out = func(*wide, **kwargs).to(torch.bfloat16)
        else:
            out = func(*args, **kwargs)
        self.matmuls += 1
        operands = [a for a in args if isinstance(a, torch.Tensor)] + [out]
        if any(misaligned(a) for a in operands):
            shapes = " x ".join(str(tuple(a.shape)) for a in operands[:-1]) + f" -> {tuple(out.shape)}"
            self.found[(func.overloadpacket.__name__, shapes, _site())] += 1
        return out


def misaligned_matmuls(model, tokens: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
    """(Counter of (op, shapes, site) -> calls for the misaligned matmuls, number of matmuls) of one
    forward and backward of `model` on `tokens` [batch, T+1] under `dtype` autocast (on CPU)."""
    audit = _Audit()
    with audit:
        with torch.autocast("cpu", dtype):
            out = model(tokens[:, :-1])
            loss = F.cross_entropy(out.outputs.float().flatten(0, 1), tokens[:, 1:].flatten())
        (loss + out.reg_loss).backward()
    return audit.found, audit.matmuls


def main():
    import argparse
    from moeut import DenseLM, MoEUTLM, profiles

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="moeut-244M", help="moeut-<size> or dense-<size> (moeut models)")
    ap.add_argument("--layers", type=int, default=2, help="layers to build (widths, not depth, decide alignment)")
    ap.add_argument(
        "--tokens", type=int, default=1024, help="rows of the step (padding starts at moe.PADDING_MIN_ROWS)"
    )
    ap.add_argument("--top", type=int, default=40, help="rows of the table")
    args = ap.parse_args()
    kind, _, size = args.model.partition("-")
    preset = getattr(profiles, f"{'MoEUT' if kind == 'moeut' else 'Dense'}_{size}", None)
    if kind not in ("moeut", "dense") or preset is None:
        ap.error(f"unknown model {args.model!r}: moeut-<size> or dense-<size>, a size of moeut.profiles")
    torch.manual_seed(0)
    model = (MoEUTLM if kind == "moeut" else DenseLM)(8000, **{**preset, "n_layers": args.layers}).train()
    found, total = misaligned_matmuls(model, torch.randint(0, 8000, (1, args.tokens + 1)))
    print(
        f"{args.model}, {args.layers} layers, {args.tokens} tokens: {sum(found.values())} of {total} matmuls misaligned"
    )
    for (op, shapes, site), n in found.most_common(args.top):
        print(f"{n:4d}  {op:8s} {shapes:60s} {site}")


if __name__ == "__main__":
    main()
