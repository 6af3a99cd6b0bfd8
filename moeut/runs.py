"""Loading a trained run for generate, eval, export and analyze (the model names live in `models`).

A run directory is described in `run_dir`; loading one reads only data (JSON, safetensors,
SentencePiece): the model's arguments are checked by type and range and its size computed from them
before any module is built, and the newest checkpoint that passes `checkpoint_reader`'s usable test
(integrity, the model's shapes and dtypes, finite values) is loaded; checkpoints of the earlier pickle
format are refused.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from moeut.models import build_model, check_memory, check_model_size, model_kwargs_of_run
from moeut.train import checkpoint as ckpt_lib
from moeut.train.checkpoint import CheckpointError
from moeut.train.run_dir import check_existing_run_dir, read_run_json
from moeut.train.tokenizer import run_tokenizer


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_run(path: str | Path, device: str = "cpu") -> Tuple[torch.nn.Module, Any, Dict[str, Any]]:
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
    check_run_config(meta, run_dir)
    tok = run_tokenizer(run_dir)
    kwargs = model_kwargs_of_run(meta)
    check_model_size(meta["model"], tok.vocab_size, kwargs)
    with torch.device("meta"):
        meta_model = build_model(meta["model"], tok.vocab_size, kwargs)
    check_memory(meta_model, device, "infer")
    spec = ckpt_lib.ModelSpec.of(meta_model)
    if chosen is not None:
        found = ckpt_lib.read_checkpoint(chosen, "model", spec)
    else:
        found = ckpt_lib.newest_usable_checkpoint(run_dir, "model", spec, warn=_warn)
        if found is None:
            raise CheckpointError(f"run {run_dir} has no checkpoint yet")
    model = build_model(meta["model"], tok.vocab_size, kwargs)
    model.load_state_dict(found.model)
    meta = {**meta, "loaded_checkpoint": {"path": str(found.path), "step": found.step}}
    return model.to(device).eval(), tok, meta


def check_run_config(meta: Dict[str, Any], run_dir: Path) -> None:
    """The settings of run.json that readers use (the training context), in range; CheckpointError naming
    the file and the field."""
    context = meta.get("config", {}).get("context")
    if context is not None and (
        isinstance(context, bool) or not isinstance(context, int) or not 1 <= context <= 1 << 20
    ):
        raise CheckpointError(
            f"{Path(run_dir) / 'run.json'}: config.context must be an integer from 1 to 1048576, got {context!r}"
        )
