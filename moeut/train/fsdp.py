"""`moeut train --parallel fsdp`: parameters, gradients and AdamW state sharded over the processes with
PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`), for models whose optimizer state does not fit
one GPU beside a full copy of the weights.

How it is laid out:
  - one FSDP unit per distinct layer (MoEUT's G group layers, the dense model's layers) and the root
    (embedding, output norm and head). A MoEUT layer is applied n_layers / G times; its unit is
    gathered at each application and freed after it (`reshard_after_forward`), and its gradient is
    reduce-scattered once, after its last application's backward. MoEUT calls its layers through
    `forward_with_logits`, which is registered as an FSDP forward method so the gather happens there;
  - mixed precision: with bf16, parameters are gathered in bf16 for compute, and gradients are reduced
    and the master weights and AdamW state kept in fp32;
  - gradient accumulation: the reduce-scatter runs only after the last micro-batch;
  - checkpoints: the sharded layout of `checkpoint.py`, written through PyTorch Distributed
    Checkpoint: each process writes its own pieces of the weights and AdamW moments (`dcp.save` with
    `HuggingFaceStorageWriter`: safetensors files whose headers give each piece's offsets; DCP's
    default writer would pickle its metadata, and nothing we load may be unpickled). On resume each
    process reads its own rows from any number of files with our reader (`load_sharded_state`, which
    verifies each file through the handle it reads), so a run resumes on a different number of
    processes. The run directory must be one file system that every process sees. A single-layout checkpoint (one
    process, DDP) resumes under FSDP through the full state (`load_optimizer_state`), and a sharded one
    without FSDP through the assembled whole tensors.
The eager step is `step.step_body`; CUDA graphs and torch.compile are not combined with FSDP here.
"""

from __future__ import annotations

from typing import Any, Dict

import torch


def shard_model(model: torch.nn.Module, amp: torch.dtype, reshard_after_forward: bool = True) -> torch.nn.Module:
    """Shard `model` in place (see the module docstring); returns it. `reshard_after_forward=False`
    gathers each layer once in the forward and keeps it for its later applications and into the
    backward, which still gathers it again at each application after the first: 1 + G·applications
    all-gathers per step instead of 1 + 2·G·applications, with every layer's gathered copy held
    from the forward into the backward (`benchmarks/fsdp_reshard.py` measures both)."""
    import warnings
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    # FSDP2 warns at every forward that a unit returned a view (an in-place op on it would skip the
    # gather). Our layers return views (cache, router logits) that nothing modifies in place; the CPU
    # tests compare FSDP's weights and losses with one process's.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    policy = MixedPrecisionPolicy(param_dtype=amp if amp != torch.float32 else None, reduce_dtype=torch.float32)
    backbone = getattr(model, "transformer", model)
    for layer in backbone.layers:
        fully_shard(layer, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        if hasattr(layer, "forward_with_logits"):
            register_fsdp_forward_method(layer, "forward_with_logits")
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def load_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, optimizer_state: Dict[str, Any]) -> None:
    """Load a full, name-keyed optimizer state into the optimizer of the sharded model: each rank keeps
    its own shards. (The model's weights are loaded into the full model before `shard_model`.)"""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, optimizer_state, options=_options())


def _flat_sharded_state(model: torch.nn.Module, opt: torch.optim.Optimizer):
    """(the flat dict DCP saves or loads: "model.<name>" and "optim.<name>.<moment>" DTensors, the model
    state dict, the optimizer state dict) of the sharded model; the dicts share the tensors."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from moeut.train.checkpoint import MODEL_PREFIX, MOMENTS, OPTIM_PREFIX

    model_sd = get_model_state_dict(model)
    opt_sd = get_optimizer_state_dict(model, opt)  # creates zero moments in a fresh optimizer
    flat = {MODEL_PREFIX + k: v for k, v in model_sd.items()}
    flat.update({f"{OPTIM_PREFIX}{n}.{m}": s[m] for n, s in opt_sd["state"].items() for m in MOMENTS})
    return flat, model_sd, opt_sd


def all_parameters_finite(model: torch.nn.Module) -> bool:
    """Whether every process's pieces of every parameter are finite (collective)."""
    import torch.distributed as dist

    bad = torch.zeros((), device=next(model.parameters()).device)
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        bad += (~torch.isfinite(local.detach())).any().float()
    if dist.is_initialized():
        dist.all_reduce(bad)
    return not bool(bad)


def save_sharded_state(model: torch.nn.Module, opt: torch.optim.Optimizer, shard_dir) -> Dict[str, Any]:
    """Every process writes its pieces of the weights and moments into `shard_dir` (collective).
    Returns the name-keyed optimizer state without its moments' data (for `sharded_optimizer_record`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    flat, _, opt_sd = _flat_sharded_state(model, opt)
    dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(shard_dir), save_distributed=True))
    return opt_sd


def load_sharded_state(
    model: torch.nn.Module, opt: torch.optim.Optimizer, checkpoint_path, record: Dict[str, Any]
) -> None:
    """Each process reads its own rows of the weights and moments from a sharded checkpoint written by
    any number of processes (collective: a fault on any process stops every process, each with a
    CheckpointError). `record`: the checkpoint's optimizer record (groups and step counts,
    `sharded_optimizer_record`). The checkpoint was found usable before (`checkpoint_reader`); each
    process verifies the files it reads, through the handles it reads them from."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    from moeut.train.checkpoint_format import CheckpointError
    from moeut.train.checkpoint_reader import check_finite, read_rows
    from moeut.train.shards import dim0_chunk

    flat, model_sd, opt_sd = _flat_sharded_state(model, opt)
    error = None
    try:
        requests, targets = {}, {}
        for name, t in flat.items():
            local = t.to_local() if hasattr(t, "to_local") else t
            if t.dim() == 0:
                requests[name] = (0, 0)
            else:
                mesh = getattr(t, "device_mesh", None)
                world, rank = (mesh.size(), mesh.get_coordinate()[0]) if mesh is not None else (1, 0)
                requests[name] = dim0_chunk(t.shape[0], world, rank)
                if requests[name][1] - requests[name][0] != local.shape[0]:
                    raise CheckpointError(
                        f"{name}: this process holds {local.shape[0]} rows, not torch.chunk's "
                        f"{requests[name]} of {t.shape[0]} (an FSDP layout this reader does not know)"
                    )
            targets[name] = local
        rows = read_rows(checkpoint_path, requests)
        check_finite(rows, str(checkpoint_path))
        with torch.no_grad():
            for name, local in targets.items():
                local.copy_(rows[name].view(local.shape))
    except CheckpointError as e:
        error = e
    failed = torch.tensor(float(error is not None), device=next(model.parameters()).device)
    if dist.is_initialized():
        dist.all_reduce(failed)
    if error is not None:
        raise error
    if failed.item():
        raise CheckpointError(
            f"checkpoint {checkpoint_path}: another process could not read its part (its error "
            "is printed by that process)"
        )
    set_model_state_dict(model, model_sd)
    for name, entry in opt_sd["state"].items():
        entry["step"] = torch.tensor(float(record["steps"][name]))
    opt_sd["param_groups"] = record["param_groups"]
    set_optimizer_state_dict(model, opt, opt_sd)
