"""FSDP2 and MoEUT's shared layers: free a layer's gathered weights after each application
(`reshard_after_forward=True`, the trainer's choice) or keep them from its first application until
its backward (False)? Counts the all-gathers and their bytes per step, times the step, and on CUDA
reads the peak memory, for both settings in the same processes.

    torchrun --nproc_per_node=2 benchmarks/fsdp_reshard.py --model moeut-44M --batch-size 2 --context 256
    python benchmarks/fsdp_reshard.py --model moeut-1B --batch-size 8        # one GPU: a group of one
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moeut.models import build_model, model_kwargs
from moeut.train.fsdp import shard_model
from moeut.train.step import step_body
from moeut.train.loop import optimizer_groups

GATHERS = {"calls": 0, "bytes": 0}


def counting_all_gather():
    """Wrap the collective FSDP2 gathers parameters with (its name differs between torch releases),
    counting calls and output bytes."""
    for name in ("all_gather_single", "all_gather_into_tensor"):
        real = getattr(dist, name, None)
        if real is None:
            continue

        def wrapped(output, input, *args, _real=real, **kwargs):
            GATHERS["calls"] += 1
            GATHERS["bytes"] += output.numel() * output.element_size()
            return _real(output, input, *args, **kwargs)

        setattr(dist, name, wrapped)


def measure(args, reshard: bool, device) -> dict:
    torch.manual_seed(0)
    model = build_model(args.model, 8000, model_kwargs(args.model, {})).to(device)
    amp = torch.bfloat16 if device.type == "cuda" else torch.float32
    shard_model(model, amp, reshard_after_forward=reshard)
    opt = torch.optim.AdamW(optimizer_groups(model, 0.01), lr=2.5e-4)
    batch = torch.randint(0, 8000, (1, args.batch_size // dist.get_world_size(), args.context + 1), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, gathers = [], []
    for i in range(args.steps + 2):
        GATHERS.update(calls=0, bytes=0)
        t0 = time.perf_counter()
        step_body(model, model, opt, batch, amp, 0.25, dist.get_world_size())
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
            gathers.append(dict(GATHERS))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del model, opt
    return {
        "ms": 1000 * statistics.median(times),
        "gathers": gathers[-1]["calls"],
        "gather_mb": gathers[-1]["bytes"] / 2**20,
        "peak_gib": peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="moeut-44M")
    ap.add_argument("--batch-size", type=int, default=2, help="global batch (split over the processes)")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
    else:
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    rank = dist.get_rank()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    counting_all_gather()
    rows = {r: measure(args, r, device) for r in (True, False)}
    if rank == 0:
        where = torch.cuda.get_device_name() if cuda else "CPU (gloo)"
        print(
            f"{where}, {dist.get_world_size()} processes, {args.model}, global batch {args.batch_size} x "
            f"{args.context}, median of {args.steps} steps"
        )
        print("| reshard_after_forward | step (ms) | all-gathers per step | gathered MB per step | peak GiB |")
        print("|---|---|---|---|---|")
        for r, m in rows.items():
            print(f"| {r} | {m['ms']:.1f} | {m['gathers']} | {m['gather_mb']:.1f} | {m['peak_gib']:.2f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
