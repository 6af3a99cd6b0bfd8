"""Which aten ops one training step runs, and how many bytes each moves: a CPU stand-in for a GPU
profile of the glue around the matmuls (casts, copies, gathers, sums), where a step is memory-bound.

Runs forward + backward of one sequence under bf16 autocast and records every dispatched op with
the bytes of its tensor inputs and outputs (views count zero), grouped by op and by the line of
moeut code that issued it (for backward ops: the forward line that created the autograd node).
Bytes on the GPU scale with the batch; op counts do not.

    python benchmarks/op_census.py --model moeut-244M --layers 2 [--tokens 1024] [--top 40]
"""
from __future__ import annotations

import collections
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from saved_activations import model_from_args  # noqa: E402

VIEW_OPS = {"view", "_unsafe_view", "reshape", "transpose", "permute", "expand", "unsqueeze", "squeeze",
            "select", "slice", "t", "alias", "as_strided", "detach", "split", "unbind", "narrow", "lift_fresh"}


def _moeut_site(frames) -> str:
    ours = [f for f in frames if "/moeut/" in f.filename]
    return f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"


class Census(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.bytes = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in VIEW_OPS:
            return out
        node = torch._C._current_autograd_node()
        if node is not None:  # anomaly mode keeps the forward traceback of every autograd node
            site = f"bwd {type(node).__name__} {self._site_from_anomaly(node.metadata.get('traceback_', []))}"
        else:
            site = "fwd " + _moeut_site(traceback.extract_stack())
        moved = sum(t.nbytes for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor))
        key = (func.overloadpacket._qualified_op_name.replace("aten::", ""), site)
        self.ops[key] += 1
        self.bytes[key] += moved
        return out

    @staticmethod
    def _site_from_anomaly(tb) -> str:
        text = "".join(tb) if isinstance(tb, list) else str(tb)
        lines = [l.strip() for l in text.splitlines() if "/moeut/" in l and l.strip().startswith("File")]
        if not lines:
            return "?"
        last = lines[-1]  # File "/x/moeut/attention.py", line 252, in forward_with_logits
        path = last.split('"')[1]
        return f"{Path(path).name}:{last.split('line ')[1].split(',')[0]}"


def main():
    args, model, kw = model_from_args(__doc__, layers=2, top=40)
    tokens = torch.randint(0, 8000, (1, args.tokens + 1))
    census = Census()
    with torch.autograd.set_detect_anomaly(True, check_nan=False), census:
        with torch.autocast("cpu", torch.bfloat16):
            out = model(tokens[:, :-1])
            loss = F.cross_entropy(out.outputs.float().flatten(0, 1), tokens[:, 1:].flatten())
        (loss + out.reg_loss.sum()).backward()
    total_ops, total_bytes = sum(census.ops.values()), sum(census.bytes.values())
    print(f"{args.model}, {kw.get('n_layers')} layers, {args.tokens} tokens: {total_ops} ops, "
          f"{total_bytes / 2**20:.0f} MiB moved (inputs + outputs)")
    print(f"{'MiB':>8s} {'ops':>5s}  op  site")
    for key, b in census.bytes.most_common(args.top):
        print(f"{b / 2**20:8.1f} {census.ops[key]:5d}  {key[0]}  {key[1]}")


if __name__ == "__main__":
    main()
