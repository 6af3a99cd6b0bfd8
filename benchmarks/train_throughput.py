"""Training throughput: tokens/s and peak memory of one training step (forward + backward + AdamW,
bf16 autocast, context 1024) for MoEUT, the paper's dense baselines, a parameter-matched Llama from
`transformers` (if installed), and the official release (if `--official PATH` is given). All models
are measured in the same run, the median of `--steps` steps after warm-up.

    python benchmarks/train_throughput.py [--models moeut-244M,dense-244M,...] [--compile] [--cuda-graph] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moeut
from moeut import profiles

VOCAB = 8000
DEFAULT_MODELS = (
    "moeut-244M:16,dense-244M:16,llama-244M:16,official-244M:16,moeut-1B:8,dense-1B:8,llama-1B:8,official-1B:8"
)
LLAMA = {
    "244M": dict(hidden_size=1024, num_hidden_layers=18, num_attention_heads=16, intermediate_size=2736),
    "1B": dict(hidden_size=1536, num_hidden_layers=36, num_attention_heads=24, intermediate_size=4096),
    "44M": dict(hidden_size=412, num_hidden_layers=16, num_attention_heads=4, head_dim=103, intermediate_size=1369),
}


class LlamaWrapper(torch.nn.Module):
    def __init__(self, size):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=2048, tie_word_embeddings=False, **LLAMA[size])
        cfg._attn_implementation = "sdpa"
        self.m = LlamaForCausalLM(cfg)

    def forward(self, x):
        return moeut.MoEUTOutput(self.m(input_ids=x).logits, torch.zeros((), device=x.device), None)


def build(name: str, official):
    kind, size = name.split("-")
    if kind == "moeut":
        return moeut.MoEUTLM(VOCAB, **profiles.MOEUT_PROFILES[size])
    if kind == "moeut_att1":
        return moeut.MoEUTLM(VOCAB, **{**profiles.MOEUT_PROFILES[size], "att_n_experts": 1, "n_heads": 8})
    if kind == "dense":
        return moeut.DenseLM(VOCAB, **profiles.DENSE_PROFILES[{"319M": "319M"}.get(size, size)])
    if kind == "llama":
        return LlamaWrapper(size)
    if kind == "official":
        if official is None:
            return None
        mod, prof = official
        return mod.MoEUTLM(VOCAB, **getattr(prof, f"MoEUT_{size}"))
    raise ValueError(name)


def training_step(model, batch: int, compile_: bool = False, cuda_graph: bool = False):
    """A closure running one training step (forward, backward, fused AdamW; bf16 autocast, context
    1024) of `model` (moved to the GPU) on a fixed random batch. With `cuda_graph`, the whole step
    (optimizer included) is captured once and replayed: no per-kernel launch cost on the host."""
    model = model.cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=cuda_graph)
    fwd = torch.compile(model) if compile_ else model
    tokens = torch.randint(0, VOCAB, (batch, 1025), device="cuda")

    def step():
        # Autocast's cast cache must be off under CUDA-graph capture (its entries would not survive it).
        with torch.autocast("cuda", torch.bfloat16, cache_enabled=not cuda_graph):
            out = fwd(tokens[:, :-1])
            loss = F.cross_entropy(out.outputs.float().view(-1, VOCAB), tokens[:, 1:].reshape(-1))
        (loss + out.reg_loss.sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if not cuda_graph:
        return step
    side = torch.cuda.Stream()  # warm-up off the capture stream: autotuning, lazy state, optimizer moments
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # gradients are allocated from the graph's pool and rewritten each replay
        step()
    return graph.replay


def measure(model, batch, steps, compile_, cuda_graph=False):
    # A graphed step allocates its tensors once, in the graph's pool during capture, so its peak is
    # counted from before the warm-up (which also runs the eager steps). An eager step's peak is
    # counted after the first steps, leaving out one-off autotuning buffers.
    if cuda_graph:
        torch.cuda.reset_peak_memory_stats()
    step = training_step(model, batch, compile_, cuda_graph)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    if not cuda_graph:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    ms = statistics.median(times)
    return dict(
        tokens_per_s=batch * 1024 / ms,
        step_ms=ms * 1e3,
        peak_gib=torch.cuda.max_memory_allocated() / 2**30,
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma list of name:batch")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--compile", action="store_true", help="torch.compile every model (official excluded)")
    ap.add_argument(
        "--cuda-graph",
        action="store_true",
        help="capture each model's whole training step in a CUDA graph (official excluded)",
    )
    ap.add_argument("--official", type=Path, help="checkout of the official release, for the side-by-side")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    official = None
    if args.official:
        from compare_official import load_official

        official = load_official(args.official)
    results = []
    for spec in args.models.split(","):
        name, batch = spec.split(":")
        torch.manual_seed(0)
        try:
            model = build(name, official)
        except ImportError as e:
            print(f"{name}: skipped ({e})")
            continue
        if model is None:
            continue
        try:
            ours = not name.startswith("official")
            r = measure(model, int(batch), args.steps, args.compile and ours, args.cuda_graph and ours)
        except Exception as e:
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}")
            r = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
        r.update(
            model=name,
            batch=int(batch),
            compiled=args.compile and not name.startswith("official"),
            cuda_graph=args.cuda_graph and not name.startswith("official"),
        )
        results.append(r)
        if "error" not in r:
            print(
                f"{name:16s} batch {batch:>3s}  {r['tokens_per_s'] / 1e3:8.1f}k tok/s  {r['step_ms']:8.1f} ms/step  "
                f"peak {r['peak_gib']:6.1f} GiB  {r['params_m']:7.1f}M params",
                flush=True,
            )
        del model
        torch.cuda.empty_cache()
        if args.json:  # after every model: a run cut short by a time limit keeps what it measured
            args.json.write_text(
                json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, results=results), indent=2)
            )


if __name__ == "__main__":
    main()
