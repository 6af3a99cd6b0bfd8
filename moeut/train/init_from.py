"""`moeut train --init-from SOURCE`: a new run that starts from trained weights (fine-tuning, or continued
pre-training with another learning rate or schedule).

SOURCE is a moeut run directory or one of its checkpoint directories (trained here, or made by
`moeut import-official`), or a Hugging Face directory written by `moeut export`. From it come the model
(its name and constructor arguments, which `--set` may change only where no weight's shape changes),
the weights, and the tokenizer (unless `--tokenizer` gives one of the same vocabulary size). The new
run has its own data, schedule, validation and a fresh optimizer. Everything is read as data and
checked before the new run directory exists: the source's files (the usable-checkpoint test, or the
export's safetensors header), the shapes against the model the new run builds, the vocabulary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from moeut.files import FileProblem, open_file, read_json
from moeut.train.checkpoint_format import CheckpointError, checkpoint_step
from moeut.train.checkpoint_reader import (
    ModelSpec,
    Shapes,
    check_compatible,
    check_finite,
    newest_usable_checkpoint,
    read_checkpoint,
)
from moeut.train.tensor_file import read_header, read_tensor

HF_WEIGHTS, HF_CONFIG, HF_PREFIX = "model.safetensors", "config.json", "lm."


@dataclass
class InitSource:
    kind: str  # "run" or "hf"
    path: Path  # the checkpoint directory, or the Hugging Face directory
    model: str  # moeut-<size> / dense-<size>
    kwargs: Dict[str, Any]  # the model's constructor arguments as the source records them
    tokenizer: Any  # its tokenizer (`tokenizer.run_tokenizer`)
    shapes: Shapes  # its weights' names, shapes and dtypes (from headers)
    step: Optional[int] = None

    def describe(self) -> Dict[str, Any]:
        """What run.json records of where the run came from."""
        return {"kind": self.kind, "path": str(self.path.resolve()), "model": self.model, "step": self.step}

    def weights(self, spec: ModelSpec) -> Dict[str, torch.Tensor]:
        """The weights, read and checked (shapes, dtypes, finite) for the model of `spec`."""
        if self.kind == "run":
            return read_checkpoint(self.path, "model", spec).model
        fd = _open_in(self.path, HF_WEIGHTS)
        try:
            header = read_header(fd, str(self.path / HF_WEIGHTS))
            state = {
                k[len(HF_PREFIX) :]: read_tensor(fd, e, str(self.path / HF_WEIGHTS)) for k, e in header.entries.items()
            }
        finally:
            os.close(fd)
        check_compatible(spec.tensors, {k: (tuple(v.shape), v.dtype) for k, v in state.items()}, str(self.path))
        check_finite(state, str(self.path))
        return state


def _open_in(directory: Path, name: str) -> int:
    """A read handle on `directory`/`name`, neither followed through a link."""
    from moeut.files import open_dir

    dir_fd = open_dir(directory)
    try:
        return open_file(name, dir_fd, what=str(directory / name))
    finally:
        os.close(dir_fd)


def open_source(path: str | Path, say=print) -> InitSource:
    """The source of --init-from, its model, tokenizer and weight shapes read (no weight data yet)."""
    from moeut.models import model_kwargs, model_kwargs_of_run
    from moeut.train.run_dir import check_existing_run_dir, read_run_json
    from moeut.train.tokenizer import run_tokenizer

    path = Path(path)
    if not path.exists():
        raise ValueError(f"--init-from {path}: no such run or model directory")
    try:
        if (path / HF_CONFIG).is_file() and (path / HF_WEIGHTS).is_file():
            config = read_json(path / HF_CONFIG, 1 << 20)
            if not isinstance(config, dict) or config.get("model_type") != "moeut":
                raise ValueError(
                    f"--init-from {path}: its config.json is not a moeut model's (model_type "
                    f"{config.get('model_type') if isinstance(config, dict) else None!r})"
                )
            name, kwargs = config.get("moeut_model"), config.get("model_kwargs")
            if not isinstance(name, str) or not isinstance(kwargs, dict):
                raise ValueError(f"--init-from {path}: its config.json names no moeut_model and model_kwargs")
            kwargs = model_kwargs(name, kwargs)
            fd = _open_in(path, HF_WEIGHTS)
            try:
                header = read_header(fd, str(path / HF_WEIGHTS))
            finally:
                os.close(fd)
            if not all(k.startswith(HF_PREFIX) for k in header.entries):
                raise ValueError(f"--init-from {path}: {HF_WEIGHTS} is not an export of moeut's (names without 'lm.')")
            shapes = {k[len(HF_PREFIX) :]: (e.shape, e.dtype) for k, e in header.entries.items()}
            return InitSource("hf", path, name, kwargs, run_tokenizer(path), shapes)
        if path.parent.name == "checkpoints":  # one checkpoint of a run
            run_dir, chosen = path.parent.parent, path
        else:
            run_dir, chosen = path, None
        check_existing_run_dir(run_dir, writable=False)
        meta = read_run_json(run_dir)
        kwargs = model_kwargs_of_run(meta)
        found = (
            read_checkpoint(chosen, "verify")
            if chosen is not None
            else newest_usable_checkpoint(run_dir, "verify", warn=say)
        )
        if found is None:
            raise ValueError(f"--init-from {run_dir}: the run has no checkpoint yet")
        return InitSource(
            "run", found.path, meta["model"], kwargs, run_tokenizer(run_dir), found.shapes, checkpoint_step(found.path)
        )
    except FileProblem as e:
        raise ValueError(f"--init-from {path}: {e}") from None
    except CheckpointError as e:
        raise ValueError(f"--init-from {path}: {e}") from None
