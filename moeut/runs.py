"""Model names, construction from a name plus overrides, and loading a trained run for generate/eval.

A run directory is described in `run_dir`; loading one reads only data (JSON, safetensors,
SentencePiece), checks the checkpoint's integrity and its tensor shapes against the model the run
describes before allocating the model, and refuses checkpoints of the earlier pickle format.
"""
from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from moeut.train import checkpoint as ckpt_lib
from moeut import profiles
from moeut.train.checkpoint import CheckpointError
from moeut.dense import DenseLM
from moeut.memory import device_memory
from moeut.model import MoEUTLM
from moeut.train.run_dir import check_existing_run_dir, read_run_json
from moeut.train.tokenizer import Tokenizer

BYTES_PER_PARAMETER = {"train": 16, "infer": 4}   # fp32 weights (+ gradients and AdamW's two moments)


def write_json_atomic(path, obj) -> None:
    """Written whole or not at all (a temporary file beside it, fsynced, then renamed)."""
    ckpt_lib.write_json_atomic(Path(path), obj)


def model_kwargs(name: str, overrides: Dict[str, Any] | None = None) -> Dict[str, Any]:
    """Constructor arguments for `moeut-<size>` / `dense-<size>`, with `overrides` applied. Unknown
    argument names are refused by name."""
    kind, _, size = name.partition("-") if isinstance(name, str) else ("", "", "")
    table = {"moeut": profiles.MOEUT_PROFILES, "dense": profiles.DENSE_PROFILES}.get(kind)
    if table is None or size not in table:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(profiles.model_names())}")
    cls = MoEUTLM if kind == "moeut" else DenseLM
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "n_tokens", "attention"}
    unknown = sorted(set(overrides or {}) - accepted)
    if unknown:
        raise ValueError(f"--set {unknown[0]}: {name} has no such argument; it takes {', '.join(sorted(accepted))}")
    kwargs = dict(table[size])
    kwargs.update(overrides or {})
    if kind == "dense":
        kwargs.setdefault("scale_embedding", True)   # recorded in run.json (see `model_kwargs_of_run`)
    return kwargs


def model_kwargs_of_run(meta: Dict[str, Any]) -> Dict[str, Any]:
    """The model's constructor arguments as a run's run.json records them. Dense runs made before
    `scale_embedding` existed ran without the embedding scale, and keep running without it."""
    recorded = meta.get("model_kwargs") or {}
    kwargs = model_kwargs(meta["model"], recorded)
    if meta["model"].startswith("dense") and "scale_embedding" not in recorded:
        kwargs["scale_embedding"] = False
    return kwargs


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
        raise ValueError(f"the model has {n / 1e6:,.0f}M parameters: {'training' if purpose == 'train' else 'running'} "
                         f"it needs at least {need / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} GiB of "
                         f"{device}; choose a smaller --model or --set")


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


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_run(path: str | Path, device: str = "cpu") -> Tuple[torch.nn.Module, Tokenizer, Dict[str, Any]]:
    """(model in eval mode with the newest intact checkpoint's weights, tokenizer, run.json plus
    "loaded_checkpoint": {path, step}) of a run
    directory, or of one checkpoint directory inside it (`<run>/checkpoints/step_N`; then exactly that
    one). A damaged newest checkpoint is reported and an older intact one used."""
    path = Path(path)
    chosen = None
    if path.parent.name == "checkpoints" and (path.suffix == ".pt" or path.name.startswith("step_")):
        chosen, run_dir = path, path.parent.parent
        if path.suffix == ".pt":
            raise ckpt_lib.legacy_refusal(path, run_dir)
    else:
        run_dir = path
    if not run_dir.exists():
        raise CheckpointError(f"{run_dir} does not exist")
    check_existing_run_dir(run_dir, writable=False)
    meta = read_run_json(run_dir)
    tok = Tokenizer(run_dir / "tokenizer.model")
    if chosen is not None:
        ckpt_lib.verify_checkpoint(chosen, "model")
    else:
        chosen = ckpt_lib.newest_intact_checkpoint(run_dir, warn=_warn, part="model")
        if chosen is None:
            raise CheckpointError(f"run {run_dir} has no checkpoint yet")
    kwargs = model_kwargs_of_run(meta)
    with torch.device("meta"):
        meta_model = build_model(meta["model"], tok.vocab_size, kwargs)
    ckpt_lib.check_compatible({k: tuple(v.shape) for k, v in meta_model.state_dict().items()},
                              ckpt_lib.checkpoint_tensor_shapes(chosen), str(chosen))
    check_memory(meta_model, device, "infer")
    state = ckpt_lib.load_model_state(chosen, verified=True)
    ckpt_lib.check_finite(state, str(chosen))
    model = build_model(meta["model"], tok.vocab_size, kwargs)
    model.load_state_dict(state)
    meta = {**meta, "loaded_checkpoint": {"path": str(chosen), "step": ckpt_lib.checkpoint_step(chosen)}}
    return model.to(device).eval(), tok, meta
