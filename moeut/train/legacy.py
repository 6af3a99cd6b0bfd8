"""Checkpoints of moeut's earlier pickle format (`checkpoints/step_*.pt`), converted once on request
(`moeut migrate RUN`), and the restricted reading the paper authors' checkpoints go through too.

Unpickling can run code, so these files are read with PyTorch's `weights_only` unpickler, which
builds tensors, containers and NumPy arrays and refuses anything else unexecuted; the converted
checkpoints are the current format (`checkpoint.py`)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

from moeut.files import FileProblem, open_dir, read_bytes
from moeut.train.checkpoint import (
    LEGACY_FORMAT,
    TRAINING_KEYS,
    CheckpointError,
    checkpoint_dir,
    list_legacy_checkpoints,
    save_checkpoint,
)

MAX_PICKLE_BYTES = 1 << 40


# ------------------------------------------------------------------------------------------------


def _numpy_safe_globals() -> list:
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    out = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    out += [type(np.dtype(t)) for t in (np.uint32, np.float64, np.int64)]
    return out


def load_pickle_safely(path: Path, extra_globals: tuple = ()) -> Any:
    """A torch.save file read through the restricted unpickler: tensors, containers and NumPy arrays
    only (and `extra_globals`: (stand-in, "module.Name") pairs for the unpickler's allow-list); anything
    else (for example a `__reduce__` payload) is refused unexecuted. The file is read once, following
    no link."""
    from torch.serialization import safe_globals

    try:
        data = read_bytes(path, MAX_PICKLE_BYTES)
    except FileProblem as e:
        raise CheckpointError(str(e)) from None
    try:
        with safe_globals(_numpy_safe_globals() + list(extra_globals)):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()
        detail = next(
            (line for line in first if "Unsupported" in line or "global" in line.lower()), first[0] if first else ""
        )
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain data, so it is not converted "
            f"(nothing in it was run): {detail.strip()[:300]}"
        ) from None


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
        return {
            **rng,
            "numpy": (str(name), np.asarray(keys).astype(np.int64).tolist(), int(pos), int(has_gauss), float(cached)),
        }
    return rng


def migrate_legacy_checkpoints(run_dir: Path, report: Callable[[str], None] = print) -> List[Path]:
    """Convert each `step_*.pt` of a run to the current format; the originals move to
    `checkpoints/legacy/` (delete it once the run resumes). Returns the new checkpoints."""
    run_dir = Path(run_dir)
    legacy = list_legacy_checkpoints(run_dir)
    if not legacy:
        raise CheckpointError(f"{run_dir} has no checkpoints of the earlier format (checkpoints/step_*.pt)")
    loaded = [(p, load_legacy_checkpoint(p)) for p in legacy]  # every file checked before anything is written
    for p, data in loaded:
        step = data.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 10**12:
            raise CheckpointError(f"{p}: its step {step!r} is not a step number")
    out = []
    keep_dir = checkpoint_dir(run_dir) / "legacy"
    if keep_dir.is_symlink() or (keep_dir.exists() and not keep_dir.is_dir()):
        raise CheckpointError(
            f"{keep_dir} is a symbolic link or a file; the originals are moved only into a real directory of the run"
        )
    keep_dir.mkdir(exist_ok=True)
    ckpt_fd = open_dir(checkpoint_dir(run_dir))
    try:
        keep_fd = open_dir("legacy", ckpt_fd)
        try:
            for p, data in loaded:
                training = {k: data.get(k) for k in TRAINING_KEYS}
                training["rng"] = _plain_rng(data.get("rng"))
                new = save_checkpoint(run_dir, int(data["step"]), data["model"], training, keep=0)
                os.rename(p.name, p.name, src_dir_fd=ckpt_fd, dst_dir_fd=keep_fd)  # no path is followed
                report(f"converted {p.name} -> {new.name}")
                out.append(new)
        finally:
            os.close(keep_fd)
    finally:
        os.close(ckpt_fd)
    return out


def migrate_run(run_dir: Path, report: Callable[[str], None] = print) -> List[Path]:
    """`moeut migrate`: the run locked, its legacy checkpoints converted (`migrate_legacy_checkpoints`),
    and data.json's earlier record of the cache's path rewritten as the cache's key."""
    import re
    from moeut.files import write_json_atomic
    from moeut.train.run_dir import RunLock, check_existing_run_dir, read_json_record

    check_existing_run_dir(run_dir, writable=True)
    with RunLock(run_dir):
        out = migrate_legacy_checkpoints(run_dir, report)
        record = Path(run_dir) / "data.json"
        if record.exists():
            data = read_json_record(record)
            key = Path(str(data.get("cache", ""))).name if isinstance(data, dict) else ""
            if isinstance(data, dict) and "key" not in data and re.fullmatch(r"[0-9a-f]{24}", key):
                write_json_atomic(record, {"key": key, **{k: v for k, v in data.items() if k != "cache"}})
    return out
