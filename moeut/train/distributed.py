"""The process group of a run: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; one process without
torchrun is rank 0 of 1 (FSDP2 still gets a group of one, since it shards over a process group)."""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist


def setup_distributed(want: str = "auto", group_of_one: bool = False):
    """(rank, world size, device): `want` is auto (a GPU when there is one), cpu, cuda or cuda:N;
    under torchrun each process takes the GPU of its LOCAL_RANK unless an index is given.
    `group_of_one`: a one-process group even without torchrun (FSDP2 shards over a process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise ValueError(f"--device {want}: no CUDA device is available (use --device cpu)")
        device = torch.device("cuda", local) if want in ("auto", "cuda") else torch.device(want)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {want}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    elif group_of_one and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1
        )
    return rank, world, device


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def end_distributed() -> None:
    """After a finished run: every rank waits for the others (rank 0 still evaluates and samples), then
    the process group is torn down. A rank that exits with gloo's group alive can abort in its
    threads' teardown ('terminate called without an active exception'; seen in CI)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def on_rank0(fn: Callable[[], Any], rank: int, world: int, device) -> Any:
    """Run `fn` on rank 0; if it raises, every rank raises (rank 0 its own error), so no rank waits
    forever at the next collective."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except BaseException as e:  # re-raised below, after the others are told
            error = e
    if world > 1:
        failed = torch.tensor(int(error is not None), device=device)
        dist.broadcast(failed, 0)
        if failed.item() and error is None:
            raise RuntimeError("rank 0 stopped the run (its error is printed above)")
    if error is not None:
        raise error
    return result
