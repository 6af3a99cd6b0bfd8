"""Checkpoints that never lose a run: written to a temporary file, fsynced, then atomically renamed;
the last N kept; a corrupt, truncated or incompatible file is reported by name and never half-loaded.

Layout: <run>/checkpoints/step_00001000.pt, each a torch.save'd dict with a format tag, the run
config, model / optimizer / scheduler state, step, RNG states and data position.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

FORMAT = "moeut-checkpoint-v1"
_NAME = re.compile(r"^step_(\d{8,})\.pt$")


class CheckpointError(RuntimeError):
    pass


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> List[Path]:
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(run_dir: Path, step: int, state: Dict[str, Any], keep: int = 3) -> Path:
    """Write atomically; on any failure (e.g. a full disk) the temporary file is removed and every
    earlier checkpoint is left untouched. Only after success are checkpoints beyond `keep` deleted."""
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"step_{step:08d}.pt"
    tmp = d / f".{final.name}.tmp-{os.getpid()}"
    payload = {"format": FORMAT, "step": step, **state}
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        dir_fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return final


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Load a checkpoint file completely (to CPU) or raise CheckpointError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a moeut training checkpoint (format tag missing)")
    return data


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def check_compatible(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> None:
    """Refuse a state dict whose names or shapes differ from the model's, before copying anything."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    extra = sorted(set(state_dict) - set(own))
    bad = sorted(k for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if extra:
            parts.append(f"unexpected {extra[:3]}")
        if bad:
            parts.append(f"shape mismatch {[(k, tuple(state_dict[k].shape), tuple(own[k].shape)) for k in bad[:3]]}")
        raise CheckpointError(f"checkpoint {source} is incompatible with this model: " + "; ".join(parts))
