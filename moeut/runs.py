"""Model names, construction from a name plus overrides, and loading a trained run for generate/eval.

A run directory holds run.json (model name, constructor arguments, training config), tokenizer.model,
metrics.jsonl, tensorboard/ and checkpoints/step_*.pt.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from . import profiles
from .checkpoint import CheckpointError, check_compatible, latest_checkpoint, load_checkpoint
from .dense import DenseLM
from .model import MoEUTLM
from .tokenizer import Tokenizer


def write_json_atomic(path, obj) -> None:
    """Written whole or not at all: a crash mid-write must not leave a run that cannot be resumed, nor
    an evaluation report that cannot be read (a temporary file beside it, then renamed)."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def model_kwargs(name: str, overrides: Dict[str, Any] | None = None) -> Dict[str, Any]:
    """Constructor arguments for `moeut-<size>` / `dense-<size>`, with `overrides` applied."""
    kind, _, size = name.partition("-")
    table = {"moeut": profiles.MOEUT_PROFILES, "dense": profiles.DENSE_PROFILES}.get(kind)
    if table is None or size not in table:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(profiles.model_names())}")
    kwargs = dict(table[size])
    kwargs.update(overrides or {})
    return kwargs


def build_model(name: str, n_tokens: int, kwargs: Dict[str, Any]) -> torch.nn.Module:
    cls = MoEUTLM if name.startswith("moeut") else DenseLM
    try:
        return cls(n_tokens, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad model argument for {name}: {e}") from None


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


def load_run(path: str | Path, device: str = "cpu") -> Tuple[torch.nn.Module, Tokenizer, Dict[str, Any]]:
    """(model in eval mode with the latest checkpoint's weights, tokenizer, run.json) of a run dir."""
    run_dir = Path(path)
    ckpt = None
    if run_dir.is_file():  # a checkpoint file inside <run>/checkpoints/
        ckpt, run_dir = run_dir, run_dir.parent.parent
    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{run_dir} is not a moeut run directory (no run.json)")
    meta = json.loads(meta_path.read_text())
    tok = Tokenizer(run_dir / "tokenizer.model")
    ckpt = ckpt or latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"run {run_dir} has no checkpoint yet")
    state = load_checkpoint(ckpt)
    model = build_model(meta["model"], tok.vocab_size, meta["model_kwargs"])
    check_compatible(model, state["model"], str(ckpt))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tok, meta
