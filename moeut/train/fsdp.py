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
  - checkpoints: the full model and optimizer state are gathered to rank 0 (on the CPU) and written in
    the one-process format (safetensors and JSON, nothing pickled), so an FSDP run resumes on any
    number of processes, with or without FSDP, and a one-process or DDP checkpoint resumes under FSDP.
    The optimizer state is saved keyed by parameter name ("optimizer_keys": "names"); the one-process
    format keys it by position, and `optimizer_state_by_name` converts.
The eager step is `step.step_body`; CUDA graphs and torch.compile are not combined with FSDP here.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch

def shard_model(model: torch.nn.Module, amp: torch.dtype) -> torch.nn.Module:
    """Shard `model` in place (see the module docstring); returns it."""
    import warnings
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    # FSDP2 warns at every forward that a unit returned a view (an in-place op on it would skip the
    # gather). Our layers return views (cache, router logits) that nothing modifies in place; the CPU
    # tests compare FSDP's weights and losses with one process's.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    policy = MixedPrecisionPolicy(param_dtype=amp if amp != torch.float32 else None, reduce_dtype=torch.float32)
    backbone = getattr(model, "transformer", model)
    for layer in backbone.layers:
        fully_shard(layer, mp_policy=policy)
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


def full_model_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0's CPU (empty elsewhere). Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_options())


def full_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> Dict[str, Any]:
    """The whole AdamW state keyed by parameter name, on rank 0's CPU. Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, opt, options=_options())


def load_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, optimizer_state: Dict[str, Any]) -> None:
    """Load a full, name-keyed optimizer state into the optimizer of the sharded model: each rank keeps
    its own shards. (The model's weights are loaded into the full model before `shard_model`.)"""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, optimizer_state, options=_options())


def parameter_names_in_group_order(model: torch.nn.Module, opt: torch.optim.Optimizer) -> List[str]:
    """The names of the optimizer's parameters in the order of its groups (the positions that key a
    one-process optimizer state dict)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in opt.param_groups for p in g["params"]]


def optimizer_state_by_name(state: Dict[str, Any], names: List[str]) -> Dict[str, Any]:
    """A one-process optimizer state dict (state and groups keyed by position) keyed by parameter name,
    as `get_optimizer_state_dict` writes it."""
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
              for g in state["param_groups"]]
    return {"state": {names[int(i)]: s for i, s in state["state"].items()}, "param_groups": groups}


def optimizer_state_by_position(state: Dict[str, Any], names: List[str]) -> Dict[str, Any]:
    """The inverse of `optimizer_state_by_name`."""
    index = {n: i for i, n in enumerate(names)}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
              for g in state["param_groups"]]
    return {"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups}
