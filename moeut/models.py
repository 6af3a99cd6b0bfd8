"""The model names (`moeut-44M`, `dense-244M`, ...): their constructor arguments with `--set` overrides
checked by type and range, the parameter count and training FLOPs computed from the arguments alone,
size and memory checks made before anything is built, and the build itself.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from typing import Any, Dict

import torch

from moeut import profiles
from moeut.dense import DenseLM
from moeut.model import MoEUTLM


def device_memory(device) -> int:
    """Bytes of memory of `device`: a GPU's total, or the machine's physical RAM (the bound that sizes
    are checked against before allocating)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


BYTES_PER_PARAMETER = {"train": 16, "infer": 4}  # fp32 weights (+ gradients and AdamW's two moments)
MAX_INT_ARGUMENT = 1 << 20  # any width, count or k of a model
MAX_LAYERS = 4096
MAX_PARAMETERS = 10**12


def _argument_kinds(cls) -> Dict[str, str]:
    """{argument: its annotation as written} of a model class's constructor (strings: the modules use
    `from __future__ import annotations`). MoEUT's `attention` takes a registered name here
    (`moeut.attention.registry`), which run.json and the export record."""
    kinds = {
        n: str(p.annotation)
        for n, p in inspect.signature(cls.__init__).parameters.items()
        if n not in ("self", "n_tokens", "attention")
    }
    if "attention" in inspect.signature(cls.__init__).parameters:
        kinds["attention"] = "attention name"
    return kinds


def check_argument(name: str, value: Any, annotation: str, model: str) -> None:
    """One constructor argument against its annotation (int, Optional[int], float, bool, str) and range;
    ValueError naming the setting."""
    optional = annotation.startswith("Optional[")
    base = annotation[len("Optional[") : -1] if optional else annotation
    if value is None and optional:
        return
    where = f"--set {name}={json.dumps(value)[:40]}: {model}'s {name}"
    if annotation == "attention name":
        from moeut.attention import attention_class

        if not isinstance(value, str):
            raise ValueError(f"{where} must be the name of a registered attention class")
        attention_class(value)  # ValueError naming the registered ones
        return
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer" + (" or null" if optional else ""))
        if not 0 <= value <= MAX_INT_ARGUMENT:
            raise ValueError(f"{where} must be from 0 to {MAX_INT_ARGUMENT}")
        if name == "n_layers" and value > MAX_LAYERS:
            raise ValueError(f"{where} must be at most {MAX_LAYERS}")
    elif base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number")
        if not 0 <= value <= 1e6:
            raise ValueError(f"{where} must be from 0 to 1e6")
    elif base == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false")
    elif base == "str":
        if not isinstance(value, str) or len(value) > 100:
            raise ValueError(f"{where} must be a short string")
    elif not (value is None or isinstance(value, (bool, int, float, str))):
        raise ValueError(f"{where} must be a number, a string, true, false or null")


def model_kwargs(name: str, overrides: Dict[str, Any] | None = None) -> Dict[str, Any]:
    """Constructor arguments for `moeut-<size>` / `dense-<size>`, with `overrides` applied. Unknown
    argument names are refused by name."""
    kind, _, size = name.partition("-") if isinstance(name, str) else ("", "", "")
    table = {"moeut": profiles.MOEUT_PROFILES, "dense": profiles.DENSE_PROFILES}.get(kind)
    if table is None or size not in table:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(profiles.model_names())}")
    cls = MoEUTLM if kind == "moeut" else DenseLM
    kinds = _argument_kinds(cls)
    if not isinstance(overrides or {}, dict):
        raise ValueError(f"--set: the model's arguments must be a table of names and values, got {overrides!r}")
    unknown = sorted(set(overrides or {}) - set(kinds), key=str)
    if unknown:
        raise ValueError(f"--set {unknown[0]}: {name} has no such argument; it takes {', '.join(sorted(kinds))}")
    for k, v in (overrides or {}).items():
        check_argument(k, v, kinds[k], name)
    kwargs = dict(table[size])
    kwargs.update(overrides or {})
    if kind == "dense":
        kwargs.setdefault("scale_embedding", False)  # recorded in run.json (see `model_kwargs_of_run`)
    return kwargs


def model_kwargs_of_run(meta: Dict[str, Any]) -> Dict[str, Any]:
    """The model's constructor arguments as a run's run.json records them. Dense runs made before
    `scale_embedding` existed ran without the embedding scale, and keep running without it; runs that
    recorded it keep what they recorded."""
    recorded = meta.get("model_kwargs") or {}
    kwargs = model_kwargs(meta["model"], recorded)
    if meta["model"].startswith("dense") and "scale_embedding" not in recorded:
        kwargs["scale_embedding"] = False
    return kwargs


def parameter_count(name: str, n_tokens: int, kwargs: Dict[str, Any]) -> int:
    """The number of parameters `build_model(name, n_tokens, kwargs)` will have, computed from the
    arguments alone (tests compare it with built models)."""
    V, D = n_tokens, kwargs["d_model"]
    heads = kwargs["n_heads"]
    total = 2 * V * D + V + 2 * D  # embedding, head (with bias), output LayerNorm
    if name.startswith("dense"):
        Dh, F = kwargs.get("d_head") or D // heads, kwargs["d_ff"]
        per_layer = 4 * D + 3 * D * heads * Dh + heads * Dh * D + D * F + F + F * D + D
        return total + kwargs["n_layers"] * per_layer
    Dh = kwargs.get("d_head") or D // heads
    E, Ea = kwargs["ff_n_experts"], kwargs["att_n_experts"]
    F = kwargs.get("ff_expert_size", 128)
    attention = 2 * D * heads * Dh + (2 * heads * Ea * D * Dh + heads * Ea * D if Ea > 1 else 2 * heads * Dh * D)
    attention += heads * Ea * D  # the output selector (every Ea)
    per_layer = attention + 2 * E * D * F + E * D + 4 * D
    return total + kwargs.get("group_size", 2) * per_layer


def training_flops_per_token(name: str, n_tokens: int, kwargs: Dict[str, Any], context: int) -> float:
    """Matrix-multiply FLOPs one training token costs (forward and backward, 3x the forward's 2 per
    multiply-add), from the arguments: the dense model's every weight; MoEUT's weights that a token
    uses (Q and K, its att_k value and output experts per head, both routers, its ff_k FFN experts) at
    each of its n_layers applications; causal attention over half the context on average; the output
    head. Elementwise work is left out: MFU is taken against this, as usual."""
    D, L, heads = kwargs["d_model"], kwargs["n_layers"], kwargs["n_heads"]
    Dh = kwargs.get("d_head") or D // heads
    attention = 2 * heads * Dh * context  # QK^T and AV, causal: 2 x 2 x (context / 2)
    if name.startswith("dense"):
        per_layer = 2 * (4 * D * heads * Dh + 2 * D * kwargs["d_ff"]) + attention
    else:
        Ea, ka = kwargs["att_n_experts"], kwargs.get("att_k", 2)
        E, k, F = kwargs["ff_n_experts"], kwargs.get("ff_k", 8), kwargs.get("ff_expert_size", 128)
        heads_used = ka if Ea > 1 else 1
        per_layer = (
            2 * (2 * D * heads * Dh + 2 * D * Dh * heads * heads_used + 2 * heads * Ea * D + D * E + 2 * D * F * k)
            + attention
        )
    return 3.0 * (L * per_layer + 2 * D * n_tokens)


# Dense bf16 matrix throughput of the common training GPUs (their datasheets, without sparsity).
PEAK_BF16_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
}


def peak_bf16_flops(device) -> float | None:
    """The bf16 peak of a CUDA device by its name (None when it is not in PEAK_BF16_FLOPS, or not CUDA)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in sorted(PEAK_BF16_FLOPS.items(), key=lambda kv: -len(kv[0])) if k in name), None)


def check_model_size(name: str, n_tokens: int, kwargs: Dict[str, Any]) -> int:
    """Refuse, before any module is built, a model whose parameter count (from its arguments) is beyond
    any machine; returns the count."""
    try:
        n = parameter_count(name, n_tokens, kwargs)
    except (KeyError, TypeError, ZeroDivisionError) as e:
        raise ValueError(f"bad model argument for {name}: {e}") from None
    if n > MAX_PARAMETERS:
        raise ValueError(
            f"{name} with these arguments would have {n:.3g} parameters, more than {MAX_PARAMETERS:.0e}: "
            "check --set and run.json"
        )
    return n


def build_model(name: str, n_tokens: int, kwargs: Dict[str, Any]) -> torch.nn.Module:
    cls = MoEUTLM if name.startswith("moeut") else DenseLM
    try:
        return cls(n_tokens, **kwargs)
    except (TypeError, ValueError, AssertionError, ZeroDivisionError, RuntimeError) as e:
        raise ValueError(f"bad model argument for {name}: {e}") from None


def check_memory(model: torch.nn.Module, device, purpose: str) -> None:
    """Refuse a model (built on the meta device) whose parameters alone, with their gradients and
    optimizer state when training, exceed the device's memory."""
    n = sum(p.numel() for p in model.parameters())
    need = n * BYTES_PER_PARAMETER[purpose]
    have = device_memory(device)
    if need > have:
        raise ValueError(
            f"the model has {n / 1e6:,.0f}M parameters: {'training' if purpose == 'train' else 'running'} "
            f"it needs at least {need / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} GiB of "
            f"{device}; choose a smaller --model or --set"
        )


def parse_overrides(items) -> Dict[str, Any]:
    """`KEY=VALUE` strings -> dict, VALUE parsed as JSON when possible (ints, floats, null...)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out
