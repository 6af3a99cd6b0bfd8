"""Training checkpoints that load no code, prove their integrity, and never half-exist.

Layout of one checkpoint, a directory `<run>/checkpoints/step_00001000/`:

    model.safetensors      the model's state dict
    training.safetensors   every tensor of the training state (AdamW moments, RNG states)
    training.json          the rest of the training state as plain JSON: optimizer hyperparameters,
                           scheduler, step, data position, run config; tensors appear as references
                           {"$tensor": name} into training.safetensors
    manifest.json          format tag, layout, step, byte size and SHA-256 of each file above; written last

That is the "single" layout, written by one process (also for DDP runs, whose processes hold the
same state). FSDP runs write the "sharded" layout: instead of `model.safetensors`, one file per
process under `shards/` (see `shards.py`; written through PyTorch Distributed Checkpoint) holds that
process's pieces of the model ("model.<name>") and of the AdamW moments ("optim.<name>.exp_avg",
"...exp_avg_sq"); `training.json` keeps the optimizer's hyperparameters and step counts. Both layouts
load everywhere: whole tensors are assembled from the pieces for one process, evaluation and
generation; an FSDP run reads only its own parts on any number of processes. `convert_checkpoint`
turns one layout into the other.

Nothing here unpickles: safetensors and JSON are parsed, never executed.

Writing: the files go into a hidden temporary directory, are fsynced, hashed by reading them back,
the manifest is fsynced, and the directory is renamed into place (an atomic step on POSIX). A crash
at any point leaves either the complete checkpoint or a temporary directory that the next writer
of the run deletes (`remove_stale_temporaries`).

Reading: `verify_checkpoint` checks the manifest's sizes and hashes before anything is parsed;
`newest_intact_checkpoint` walks from the newest checkpoint down and reports each damaged one.

Checkpoints of the earlier pickle format (`step_*.pt`) are refused on load, because unpickling can
run code; `legacy.py` converts a user's own runs once (`moeut migrate`) without running any.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from moeut.train import shards as shard_lib

FORMAT = "moeut-checkpoint-v2"
LEGACY_FORMAT = "moeut-checkpoint-v1"
MODEL_FILE = "model.safetensors"
TRAINING_TENSORS_FILE = "training.safetensors"
TRAINING_JSON_FILE = "training.json"
MANIFEST_FILE = "manifest.json"
TRAINING_FILES = (TRAINING_TENSORS_FILE, TRAINING_JSON_FILE)
CHECKPOINT_FILES = (MODEL_FILE, *TRAINING_FILES)
TRAINING_KEYS = ("optimizer", "scheduler", "rng", "data_position", "config")
OPTIONAL_TRAINING_KEYS = ("optimizer_keys",)   # "names" (FSDP runs) or "positions"; absent: positions
SINGLE, SHARDED = "single", "sharded"           # layouts (see the module docstring)
MODEL_PREFIX, OPTIM_PREFIX = "model.", "optim."  # tensor names in the shard files
MOMENTS = ("exp_avg", "exp_avg_sq")

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
    """Write checkpoint `step` of a run in the single layout, then delete all but the newest `keep`.

    On any failure (full disk, file-size limit, a signal) the temporary directory is removed and
    every earlier checkpoint is untouched. Old checkpoints are deleted only after the new one has
    been read back and matched its manifest, so rotation never removes the last intact checkpoint."""
    _check_training(training)
    return _write_checkpoint(run_dir, step, lambda tmp: _save_safetensors(model_state, tmp / MODEL_FILE),
                             training, keep, loss)


def _write_checkpoint(run_dir: Path, step: int, write_weights: Callable[[Path], None], training: Dict[str, Any],
                      keep: int, loss: Optional[float]) -> Path:
    """One writer: `write_weights(tmp)` fills a fresh temporary directory, `finish_checkpoint` completes
    it; on any failure the temporary directory is removed."""
    tmp = prepare_temporary(run_dir, step, unique=True)
    try:
        write_weights(tmp)
        return finish_checkpoint(run_dir, tmp, step, training, keep, loss)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_training(training: Dict[str, Any]) -> None:
    missing = [k for k in TRAINING_KEYS if k not in training]
    if missing:
        raise ValueError(f"training state lacks {missing}")


def temporary_path(run_dir: Path, step: int, unique: bool = False) -> Path:
    """Where checkpoint `step` is written before it is renamed into place. Several processes writing
    one sharded checkpoint agree on it (`unique=False`); one writer adds its process id."""
    name = f"{_TEMP_PREFIX}step_{step:08d}" + (f"-{os.getpid()}" if unique else "-sharded")
    return checkpoint_dir(run_dir) / name


def prepare_temporary(run_dir: Path, step: int, unique: bool = False) -> Path:
    """An empty temporary directory for checkpoint `step` (made by the one process that finishes it)."""
    tmp = temporary_path(run_dir, step, unique)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def finish_checkpoint(run_dir: Path, tmp: Path, step: int, training: Dict[str, Any], keep: int = 3,
                      loss: Optional[float] = None) -> Path:
    """Complete a checkpoint whose weights are already in `tmp` (`model.safetensors`, or the shard files
    of every process under `shards/`): write the training files, fsync and hash every file, write the
    manifest, rename `tmp` into place, read it back, rotate. The caller removes `tmp` on failure."""
    _check_training(training)
    d = checkpoint_dir(run_dir)
    final = d / f"step_{step:08d}"
    sharded = (tmp / shard_lib.SHARD_DIR).is_dir()
    tensors: Dict[str, torch.Tensor] = {}
    tree = encode_tree({"step": step, **{k: training[k] for k in TRAINING_KEYS + OPTIONAL_TRAINING_KEYS
                                          if k in training}}, tensors)
    _save_safetensors(tensors, tmp / TRAINING_TENSORS_FILE)
    (tmp / TRAINING_JSON_FILE).write_text(json.dumps(tree))
    names = list(TRAINING_FILES)
    if sharded:
        names += [f"{shard_lib.SHARD_DIR}/{f.name}" for f in shard_lib.shard_files(tmp / shard_lib.SHARD_DIR)]
        _fsync_path(tmp / shard_lib.SHARD_DIR)
    else:
        names.insert(0, MODEL_FILE)
    files = {}
    for name in names:
        _fsync_path(tmp / name)
        files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": sha256_of(tmp / name)}
    manifest = {"format": FORMAT, "layout": SHARDED if sharded else SINGLE, "step": step, "loss": loss,
                "files": files, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    _fsync_path(tmp / MANIFEST_FILE)
    _fsync_path(tmp)
    if final.exists():   # the same step written again (a resumed run that fell back, a conversion)
        old = d / f"{_TEMP_PREFIX}replaced-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_path(d)
    verify_checkpoint(final)   # read back once more from its final place before anything is deleted
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_manifest(path: Path) -> Dict[str, Any]:
    path = Path(path)
    mpath = path / MANIFEST_FILE
    if path.is_symlink():
        raise CheckpointError(f"checkpoint {path} is a symbolic link; links in a run are not followed")
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
    layout = manifest.setdefault("layout", SINGLE)
    if layout == SINGLE:
        expected_ok = isinstance(files, dict) and set(files) == set(CHECKPOINT_FILES)
        expected = list(CHECKPOINT_FILES)
    elif layout == SHARDED:
        shard_names = [n for n in (files or {}) if n.startswith(shard_lib.SHARD_DIR + "/")]
        expected_ok = (isinstance(files, dict) and bool(shard_names)
                       and set(files) == {*TRAINING_FILES, *shard_names}
                       and all(shard_lib.SHARD_NAME.match(n.split("/", 1)[1]) for n in shard_names))
        expected = [*TRAINING_FILES, "shards/shard-NNNNN-model-00001-of-00001.safetensors ..."]
    else:
        raise CheckpointError(f"checkpoint {path} has the unknown layout {layout!r} (expected {SINGLE} or {SHARDED})")
    if not expected_ok:
        raise CheckpointError(f"checkpoint {path} is damaged: its manifest lists {sorted(files or {})}, "
                              f"expected {expected}")
    return manifest


def checkpoint_layout(path: Path) -> str:
    """"single" or "sharded" (see the module docstring)."""
    return read_manifest(path)["layout"]


def part_files(manifest: Dict[str, Any], part: str = "all") -> List[str]:
    """The files of a checkpoint that hold `part`: "model" (the weights), "training" (what resuming needs
    besides the weights) or "all"."""
    names = list(manifest["files"])
    shard_names = [n for n in names if n.startswith(shard_lib.SHARD_DIR + "/")]
    if part == "model":
        return shard_names or [MODEL_FILE]
    if part == "training":
        return [*TRAINING_FILES, *shard_names]
    return names


def verify_checkpoint(path: Path, part: str = "all") -> Dict[str, Any]:
    """The manifest, after checking that each file holding `part` ("all", "model", "training") has its
    recorded size and SHA-256; raises CheckpointError naming the first file that does not."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest["layout"] == SHARDED:
        # Distributed Checkpoint's reader takes every *.safetensors file in shards/: nothing else may be there.
        listed = {n.split("/", 1)[1] for n in manifest["files"] if n.startswith(shard_lib.SHARD_DIR + "/")}
        shard_dir = path / shard_lib.SHARD_DIR
        found = set(os.listdir(shard_dir)) if shard_dir.is_dir() and not shard_dir.is_symlink() else set()
        if found != listed:
            raise CheckpointError(f"checkpoint {path} is damaged: {shard_lib.SHARD_DIR}/ holds "
                                  f"{sorted(found - listed) or 'no'} files beyond its manifest and lacks "
                                  f"{sorted(listed - found) or 'none'}")
    for name in part_files(manifest, part):
        f = path / name
        rec = manifest["files"][name]
        if not f.is_file() or f.is_symlink() or f.parent.is_symlink():
            raise CheckpointError(f"checkpoint {path} is damaged: {name} is missing")
        size = f.stat().st_size
        if size != rec.get("bytes"):
            raise CheckpointError(f"checkpoint {path} is damaged: {name} has {size} bytes, its manifest says "
                                  f"{rec.get('bytes')} (truncated or overwritten)")
        if sha256_of(f) != rec.get("sha256"):
            raise CheckpointError(f"checkpoint {path} is damaged: {name} does not match its SHA-256 in the manifest")
    return manifest


def newest_intact_checkpoint(run_dir: Path, warn: Callable[[str], None] = print,
                             part: str = "all") -> Optional[Path]:
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
            verify_checkpoint(path, part)
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

def _shard_files(path: Path) -> List[Path]:
    try:
        return shard_lib.shard_files(Path(path) / shard_lib.SHARD_DIR)
    except (shard_lib.ShardError, OSError) as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None


def checkpoint_tensor_shapes(path: Path) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of the model tensors, read from safetensors headers only (no allocation)."""
    from safetensors import safe_open
    path = Path(path)
    if checkpoint_layout(path) == SHARDED:
        try:
            return shard_lib.whole_shapes(_shard_files(path), MODEL_PREFIX)
        except shard_lib.ShardError as e:
            raise CheckpointError(f"checkpoint {path}: {e}") from None
    try:
        with safe_open(str(path / MODEL_FILE), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:   # safetensors raises its own error types for a malformed header
        raise CheckpointError(f"checkpoint {path}: {MODEL_FILE} is not a valid safetensors file ({e})") from None


def _load_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({e})") from None


def _assemble(path: Path, prefix: str) -> Dict[str, torch.Tensor]:
    try:
        return shard_lib.assemble(_shard_files(path), prefix)
    except shard_lib.ShardError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None


def load_model_state(path: Path, verified: bool = False) -> Dict[str, torch.Tensor]:
    """The model's whole state dict from checkpoint directory `path`, in either layout (verified first
    unless `verified`)."""
    path = Path(path)
    manifest = read_manifest(path) if verified else verify_checkpoint(path, "model")
    if manifest["layout"] == SHARDED:
        return _assemble(path, MODEL_PREFIX)
    return _load_safetensors(path / MODEL_FILE)


def load_training_state(path: Path, verified: bool = False, optimizer_tensors: bool = True) -> Dict[str, Any]:
    """{step, optimizer, scheduler, rng, data_position, config} of checkpoint `path`. In the sharded
    layout the AdamW moments are assembled from the shard files into a name-keyed optimizer state
    dict, unless `optimizer_tensors` is False (an FSDP run reads its own parts of them instead)."""
    path = Path(path)
    manifest = read_manifest(path) if verified else verify_checkpoint(path, "training")
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
    if manifest["layout"] == SHARDED and optimizer_tensors:
        state["optimizer"] = whole_optimizer_state(state["optimizer"], _assemble(path, OPTIM_PREFIX), str(path))
    return state


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


def sharded_optimizer_record(optimizer_state: Dict[str, Any]) -> Dict[str, Any]:
    """What `training.json` keeps of a name-keyed AdamW state dict in the sharded layout: the groups and
    each parameter's step count (the moments go into the shard files)."""
    return {"param_groups": optimizer_state["param_groups"],
            "steps": {n: float(s["step"]) for n, s in optimizer_state["state"].items() if "step" in s}}


def whole_optimizer_state(record: Dict[str, Any], moments: Dict[str, torch.Tensor], source: str) -> Dict[str, Any]:
    """The name-keyed AdamW state dict from `sharded_optimizer_record` and the assembled moments
    ({"<name>.exp_avg": tensor, ...})."""
    if not isinstance(record, dict) or not isinstance(record.get("steps"), dict) or "param_groups" not in record:
        raise CheckpointError(f"checkpoint {source}: its optimizer record has no param_groups or steps")
    state = {}
    for name, step in record["steps"].items():
        entry = {"step": torch.tensor(float(step))}
        for m in MOMENTS:
            if f"{name}.{m}" not in moments:
                raise CheckpointError(f"checkpoint {source}: the shard files have no {m} for {name}")
            entry[m] = moments[f"{name}.{m}"]
        state[name] = entry
    return {"state": state, "param_groups": record["param_groups"]}


def convert_checkpoint(run_dir: Path, path: Path, layout: str, parameter_names: List[str], shards: int = 1,
                       report: Callable[[str], None] = print) -> Path:
    """Rewrite checkpoint `path` of a run in `layout` ("single" or "sharded" in `shards` files), in place
    and atomically (the old files stay until the new ones are verified). `parameter_names`: the
    model's parameters in the optimizer's group order, to key a single-layout AdamW state by name."""
    path = Path(path)
    if layout not in (SINGLE, SHARDED):
        raise CheckpointError(f"layout must be {SINGLE} or {SHARDED}, got {layout!r}")
    if layout == SHARDED and shards < 1:
        raise CheckpointError(f"--shards must be at least 1, got {shards}")
    manifest = verify_checkpoint(path)
    model_state = load_model_state(path, verified=True)
    training = load_training_state(path, verified=True)
    step = int(training.pop("step"))
    by_name = training.get("optimizer_keys") == "names"
    opt = training["optimizer"]
    if layout == SINGLE:
        if manifest["layout"] == SHARDED:   # one-process runs key AdamW by position
            training["optimizer"] = optimizer_state_by_position(opt, parameter_names)
            training["optimizer_keys"] = "positions"

        def write_weights(tmp):
            _save_safetensors(model_state, tmp / MODEL_FILE)
    else:
        named = opt if by_name else optimizer_state_by_name(opt, parameter_names)
        tensors = {**{MODEL_PREFIX + k: v for k, v in model_state.items()},
                   **{f"{OPTIM_PREFIX}{n}.{m}": s[m] for n, s in named["state"].items() for m in MOMENTS}}
        training["optimizer"], training["optimizer_keys"] = sharded_optimizer_record(named), "names"

        def write_weights(tmp):
            (tmp / shard_lib.SHARD_DIR).mkdir()
            for i, part in enumerate(shard_lib.split_dim0(tensors, shards), start=1):
                shard_lib.write_shard(tmp / shard_lib.SHARD_DIR / shard_lib.shard_file_name(i), part)
    final = _write_checkpoint(run_dir, step, write_weights, training, keep=0, loss=manifest.get("loss"))
    report(f"{final.name}: {manifest['layout']} -> {layout}" + (f" ({shards} shard files)" if layout == SHARDED else ""))
    return final


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
