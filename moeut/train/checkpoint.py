"""Training checkpoints that load no code, prove their integrity, and never half-exist.

Layout of one checkpoint, a directory `<run>/checkpoints/step_00001000/`:

    model.safetensors      the model's state dict
    training.safetensors   every tensor of the training state (AdamW moments, RNG states)
    training.json          the rest of the training state as plain JSON: optimizer hyperparameters,
                           scheduler, step, data position, run config; tensors appear as references
                           {"$tensor": name} into training.safetensors
    manifest.json          format tag, step, byte size and SHA-256 of each file above; written last

Nothing here unpickles: safetensors and JSON are parsed, never executed.

Writing: the files go into a hidden temporary directory, are fsynced, hashed by reading them back,
the manifest is fsynced, and the directory is renamed into place (an atomic step on POSIX). A crash
at any point leaves either the complete checkpoint or a temporary directory that the next writer
of the run deletes (`remove_stale_temporaries`).

Reading: `verify_checkpoint` checks the manifest's sizes and hashes before anything is parsed;
`newest_intact_checkpoint` walks from the newest checkpoint down and reports each damaged one.

Checkpoints of the earlier pickle format (`step_*.pt`) are refused on load, because unpickling can
run code; `migrate_legacy_checkpoints` converts a user's own runs once, through PyTorch's restricted
`weights_only` unpickler (tensors, containers and NumPy arrays only), so even it runs no code.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

FORMAT = "moeut-checkpoint-v2"
LEGACY_FORMAT = "moeut-checkpoint-v1"
MODEL_FILE = "model.safetensors"
TRAINING_TENSORS_FILE = "training.safetensors"
TRAINING_JSON_FILE = "training.json"
MANIFEST_FILE = "manifest.json"
CHECKPOINT_FILES = (MODEL_FILE, TRAINING_TENSORS_FILE, TRAINING_JSON_FILE)
TRAINING_KEYS = ("optimizer", "scheduler", "rng", "data_position", "config")
OPTIONAL_TRAINING_KEYS = ("optimizer_keys",)   # "names" (FSDP runs) or "positions"; absent: positions

_NAME = re.compile(r"^step_(\d{8,})$")
_LEGACY_NAME = re.compile(r"^step_(\d{8,})\.pt$")
_TEMP_PREFIX = ".tmp-"
DAMAGED_SUFFIX = ".damaged"
_HASH_CHUNK = 1 << 24


class CheckpointError(RuntimeError):
    """A checkpoint (or run directory) that cannot be used; the message names the file and the fault."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_step(path: Path) -> int:
    m = _NAME.match(Path(path).name)
    if m is None:
        raise CheckpointError(f"{path} is not named like a checkpoint (step_NNNNNNNN)")
    return int(m.group(1))


def list_checkpoints(run_dir: Path) -> List[Path]:
    """Checkpoint directories of a run, oldest first (complete or damaged: see `verify_checkpoint`)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name)) and not p.is_symlink()]
    return [p for _, p in sorted(found)]


def list_legacy_checkpoints(run_dir: Path) -> List[Path]:
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _LEGACY_NAME.match(p.name))


def legacy_refusal(path: Path, run_dir: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is a checkpoint in moeut's earlier pickle format, which can run arbitrary code when loaded, "
        f"so it is not loaded. If this run is your own, convert its checkpoints once with: "
        f"moeut migrate {run_dir}")


# ------------------------------------------------------------------------------------------------
# Plain-data encoding of nested training state (optimizer and scheduler state dicts, RNG states).
# ------------------------------------------------------------------------------------------------

def encode_tree(obj: Any, tensors: Dict[str, torch.Tensor], path: str = "t") -> Any:
    """JSON-able form of `obj`; its tensors are moved into `tensors` under generated names.

    Dicts with non-string keys (an optimizer's per-parameter state) and tuples are tagged so that
    `decode_tree` gives back exactly the same Python types."""
    if isinstance(obj, torch.Tensor):
        name = f"{path}"
        tensors[name] = obj.detach()
        return {"$tensor": name}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"$tuple": [encode_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: encode_tree(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"$items": [[encode_tree(k, tensors, f"{path}.k{i}"), encode_tree(v, tensors, f"{path}.{i}")]
                           for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint ({path}): only tensors and plain data")


def decode_tree(obj: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"$tensor"}:
            if obj["$tensor"] not in tensors:
                raise CheckpointError(f"tensor {obj['$tensor']!r} is referenced but not stored")
            return tensors[obj["$tensor"]]
        if set(obj) == {"$tuple"}:
            return tuple(decode_tree(v, tensors) for v in obj["$tuple"])
        if set(obj) == {"$items"}:
            return {_hashable(decode_tree(k, tensors)): decode_tree(v, tensors) for k, v in obj["$items"]}
        return {k: decode_tree(v, tensors) for k, v in obj.items()}
    return obj


def _hashable(key: Any) -> Any:
    if isinstance(key, (dict, list, torch.Tensor)):
        raise CheckpointError(f"a dictionary key of type {type(key).__name__} in the training state")
    return key


def _safetensors_ready(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """CPU, contiguous, and no two entries sharing memory (safetensors refuses aliasing)."""
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.numel() else None
        if key is not None and key in seen:
            t = t.clone()
        elif key is not None:
            seen.add(key)
        out[name] = t
    return out


# ------------------------------------------------------------------------------------------------
# Files: writing durably, hashing, verifying.
# ------------------------------------------------------------------------------------------------

def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes) -> None:
    """`path` holds all of `data` or its previous content: a temporary file, fsynced, then renamed."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_file_atomic(Path(path), (json.dumps(obj, indent=2) + "\n").encode())


def _save_safetensors(tensors: Dict[str, torch.Tensor], path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    try:
        save_file(_safetensors_ready(tensors), str(path))
    except SafetensorError as e:   # its I/O errors (a full disk, a file-size limit) are not OSErrors
        raise CheckpointError(f"could not write {path}: {e}") from None


def save_checkpoint(run_dir: Path, step: int, model_state: Dict[str, torch.Tensor], training: Dict[str, Any],
                    keep: int = 3, loss: Optional[float] = None) -> Path:
    """Write checkpoint `step` of a run, then delete all but the newest `keep` checkpoints.

    On any failure (full disk, file-size limit, a signal) the temporary directory is removed and
    every earlier checkpoint is untouched. Old checkpoints are deleted only after the new one has
    been read back and matched its manifest, so rotation never removes the last intact checkpoint."""
    missing = [k for k in TRAINING_KEYS if k not in training]
    if missing:
        raise ValueError(f"training state lacks {missing}")
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"step_{step:08d}"
    tmp = d / f"{_TEMP_PREFIX}{final.name}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _save_safetensors(model_state, tmp / MODEL_FILE)
        tensors: Dict[str, torch.Tensor] = {}
        tree = encode_tree({"step": step, **{k: training[k] for k in TRAINING_KEYS + OPTIONAL_TRAINING_KEYS
                                              if k in training}}, tensors)
        _save_safetensors(tensors, tmp / TRAINING_TENSORS_FILE)
        (tmp / TRAINING_JSON_FILE).write_text(json.dumps(tree))
        files = {}
        for name in CHECKPOINT_FILES:
            _fsync_path(tmp / name)
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": sha256_of(tmp / name)}
        manifest = {"format": FORMAT, "step": step, "loss": loss, "files": files,
                    "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync_path(tmp / MANIFEST_FILE)
        _fsync_path(tmp)
        if final.exists():   # the same step written again (a resumed run that fell back): replace it
            old = d / f"{_TEMP_PREFIX}replaced-{final.name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_path(d)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    verify_checkpoint(final)   # read back once more from its final place before anything is deleted
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_manifest(path: Path) -> Dict[str, Any]:
    path = Path(path)
    mpath = path / MANIFEST_FILE
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not mpath.is_file() or mpath.is_symlink():
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {MANIFEST_FILE}")
    try:
        manifest = json.loads(mpath.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged: {MANIFEST_FILE} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT} checkpoint ({MANIFEST_FILE} has no such format tag)")
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != set(CHECKPOINT_FILES):
        raise CheckpointError(f"checkpoint {path} is damaged: its manifest lists {sorted(files or {})}, "
                              f"expected {list(CHECKPOINT_FILES)}")
    return manifest


def verify_checkpoint(path: Path, files: Iterable[str] = CHECKPOINT_FILES) -> Dict[str, Any]:
    """The manifest, after checking that each of `files` has its recorded size and SHA-256; raises
    CheckpointError naming the first file that does not."""
    path = Path(path)
    manifest = read_manifest(path)
    for name in files:
        f = path / name
        rec = manifest["files"][name]
        if not f.is_file() or f.is_symlink():
            raise CheckpointError(f"checkpoint {path} is damaged: {name} is missing")
        size = f.stat().st_size
        if size != rec.get("bytes"):
            raise CheckpointError(f"checkpoint {path} is damaged: {name} has {size} bytes, its manifest says "
                                  f"{rec.get('bytes')} (truncated or overwritten)")
        if sha256_of(f) != rec.get("sha256"):
            raise CheckpointError(f"checkpoint {path} is damaged: {name} does not match its SHA-256 in the manifest")
    return manifest


def newest_intact_checkpoint(run_dir: Path, warn: Callable[[str], None] = print,
                             files: Iterable[str] = CHECKPOINT_FILES) -> Optional[Path]:
    """The newest checkpoint that verifies; each newer, damaged one is reported through `warn`.
    None when the run has no checkpoint; CheckpointError when it has some and none is intact, or
    has only checkpoints of the refused pickle format."""
    found = list_checkpoints(run_dir)
    if not found:
        legacy = list_legacy_checkpoints(run_dir)
        if legacy:
            raise legacy_refusal(legacy[-1], run_dir)
        return None
    problems = []
    for path in reversed(found):
        try:
            verify_checkpoint(path, files)
        except CheckpointError as e:
            problems.append(str(e))
            warn(f"warning: {e}; trying an older checkpoint")
            continue
        return path
    raise CheckpointError(f"run {run_dir} has no intact checkpoint: " + "; ".join(problems))


def quarantine(path: Path) -> Path:
    """Rename a damaged checkpoint out of the run's list (kept for inspection, never deleted)."""
    target = path.with_name(path.name + DAMAGED_SUFFIX)
    i = 1
    while target.exists():
        target = path.with_name(f"{path.name}{DAMAGED_SUFFIX}.{i}")
        i += 1
    os.rename(path, target)
    return target


def remove_stale_temporaries(run_dir: Path) -> List[Path]:
    """Delete what interrupted writers left behind (the caller holds the run's lock)."""
    removed = []
    d = checkpoint_dir(run_dir)
    for parent in (Path(run_dir), d):
        if not parent.is_dir():
            continue
        for p in parent.iterdir():
            if p.name.startswith(_TEMP_PREFIX) or ".tmp-" in p.name or p.name.endswith(".tmp"):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed


# ------------------------------------------------------------------------------------------------
# Loading.
# ------------------------------------------------------------------------------------------------

def checkpoint_tensor_shapes(path: Path) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of the model tensors, read from the safetensors header only (no allocation)."""
    from safetensors import safe_open
    try:
        with safe_open(str(Path(path) / MODEL_FILE), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:   # safetensors raises its own error types for a malformed header
        raise CheckpointError(f"checkpoint {path}: {MODEL_FILE} is not a valid safetensors file ({e})") from None


def _load_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({e})") from None


def load_model_state(path: Path, verified: bool = False) -> Dict[str, torch.Tensor]:
    """The model's state dict from checkpoint directory `path` (verified first unless `verified`)."""
    path = Path(path)
    if not verified:
        verify_checkpoint(path, (MODEL_FILE,))
    return _load_safetensors(path / MODEL_FILE)


def load_training_state(path: Path, verified: bool = False) -> Dict[str, Any]:
    """{step, optimizer, scheduler, rng, data_position, config} of checkpoint `path`."""
    path = Path(path)
    if not verified:
        verify_checkpoint(path, (TRAINING_TENSORS_FILE, TRAINING_JSON_FILE))
    tensors = _load_safetensors(path / TRAINING_TENSORS_FILE)
    try:
        tree = json.loads((path / TRAINING_JSON_FILE).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: {TRAINING_JSON_FILE} is not valid JSON ({e})") from None
    state = decode_tree(tree, tensors)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: {TRAINING_JSON_FILE} does not hold a training state")
    missing = [k for k in ("step", *TRAINING_KEYS) if k not in state]
    missing += [k for k in ("optimizer", "scheduler", "rng") if k in state and not state[k]]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no {', '.join(missing)} state (it cannot continue training)")
    return state


def check_compatible(own_shapes: Dict[str, Tuple[int, ...]], saved_shapes: Dict[str, Tuple[int, ...]],
                     source: str) -> None:
    """Refuse saved tensors whose names or shapes differ from the model's, before anything is allocated."""
    missing = sorted(set(own_shapes) - set(saved_shapes))
    extra = sorted(set(saved_shapes) - set(own_shapes))
    bad = sorted(k for k in set(own_shapes) & set(saved_shapes) if tuple(own_shapes[k]) != tuple(saved_shapes[k]))
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if extra:
            parts.append(f"unexpected {extra[:3]}")
        if bad:
            parts.append(f"shape mismatch {[(k, tuple(saved_shapes[k]), tuple(own_shapes[k])) for k in bad[:3]]}")
        raise CheckpointError(f"checkpoint {source} does not fit this model: " + "; ".join(parts))


def check_finite(state: Dict[str, torch.Tensor], source: str) -> None:
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"checkpoint {source} holds non-finite values in {bad[:3]}")


# ------------------------------------------------------------------------------------------------
# The earlier pickle format: converted once, on request, without running code.
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
