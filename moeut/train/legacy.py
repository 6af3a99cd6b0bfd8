"""Checkpoints of moeut's earlier pickle format (`checkpoints/step_*.pt`), converted once on request
(`moeut migrate RUN`), and the restricted reading the paper authors' checkpoints go through too.

Unpickling can run code, so these files are read with PyTorch's `weights_only` unpickler, which
builds tensors, containers and NumPy arrays and refuses anything else unexecuted; the converted
checkpoints are the current format (`checkpoint.py`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

from moeut.train.checkpoint import (LEGACY_FORMAT, TRAINING_KEYS, CheckpointError, checkpoint_dir,
                                    list_legacy_checkpoints, save_checkpoint)


# ------------------------------------------------------------------------------------------------

def _numpy_safe_globals() -> list:
    import numpy as np
    core = getattr(np, "_core", None) or np.core
    out = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    out += [type(np.dtype(t)) for t in (np.uint32, np.float64, np.int64)]
    return out


def load_pickle_safely(path: Path) -> Any:
    """A torch.save file read through the restricted unpickler: tensors, containers and NumPy arrays
    only; anything else (for example a `__reduce__` payload) is refused unexecuted."""
    from torch.serialization import safe_globals
    try:
        with safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()
        detail = next((line for line in first if "Unsupported" in line or "global" in line.lower()), first[0] if first else "")
        raise CheckpointError(f"{path} holds objects other than tensors and plain data, so it is not converted "
                              f"(nothing in it was run): {detail.strip()[:300]}") from None


def load_legacy_checkpoint(path: Path) -> Dict[str, Any]:
    """A `step_*.pt` of the earlier format, through `load_pickle_safely`."""
    data = load_pickle_safely(path)
    if not isinstance(data, dict) or data.get("format") != LEGACY_FORMAT:
        raise CheckpointError(f"{path} is not a moeut checkpoint of the earlier format")
    return data


def _plain_rng(rng: Any) -> Any:
    """RNG states with NumPy arrays turned into lists (JSON-able)."""
    import numpy as np
    if isinstance(rng, list):
        return [_plain_rng(r) for r in rng]
    if isinstance(rng, dict) and "numpy" in rng:
        name, keys, pos, has_gauss, cached = rng["numpy"]
        return {**rng, "numpy": (str(name), np.asarray(keys).astype(np.int64).tolist(), int(pos), int(has_gauss),
                                 float(cached))}
    return rng


def migrate_legacy_checkpoints(run_dir: Path, report: Callable[[str], None] = print) -> List[Path]:
    """Convert each `step_*.pt` of a run to the current format; the originals move to
    `checkpoints/legacy/` (delete it once the run resumes). Returns the new checkpoints."""
    run_dir = Path(run_dir)
    legacy = list_legacy_checkpoints(run_dir)
    if not legacy:
        raise CheckpointError(f"{run_dir} has no checkpoints of the earlier format (checkpoints/step_*.pt)")
    loaded = [(p, load_legacy_checkpoint(p)) for p in legacy]   # every file checked before anything is written
    out = []
    keep_dir = checkpoint_dir(run_dir) / "legacy"
    keep_dir.mkdir(exist_ok=True)
    for p, data in loaded:
        training = {k: data.get(k) for k in TRAINING_KEYS}
        training["rng"] = _plain_rng(data.get("rng"))
        new = save_checkpoint(run_dir, int(data["step"]), data["model"], training, keep=0)
        os.replace(p, keep_dir / p.name)
        report(f"converted {p.name} -> {new.name}")
        out.append(new)
    return out
