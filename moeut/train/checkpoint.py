"""Training checkpoints that load no code, prove their integrity, and never half-exist: writing them.

What a checkpoint holds is `checkpoint_format.py`; how it is read, and when it counts as usable,
`checkpoint_reader.py` (whose reading functions this module also offers, so that callers need one
name for checkpoints).

The "single" layout is written by one process (also for DDP runs, whose processes hold the same
state). FSDP runs write the "sharded" layout (`save_sharded_checkpoint`): each process writes its
pieces of the weights and AdamW moments into one file of `shards/` (through PyTorch Distributed
Checkpoint), `training.json` keeps the optimizer's hyperparameters and step counts. Both layouts load
everywhere, and `convert_checkpoint` turns one into the other.

Writing: the files go into a temporary directory created exclusively under an unpredictable name, are
fsynced, hashed by reading them back, the manifest is fsynced, and the directory is renamed into place
(an atomic step on POSIX), read back from there, and only then are older checkpoints rotated out (or,
for a step written again, the previous directory of that step deleted). A crash at any point leaves
either the complete checkpoint or a temporary directory that the next writer of the run deletes
(`remove_stale_temporaries`). Callers check that the state is finite before they save.

Checkpoints of the earlier pickle format (`step_*.pt`) are refused on load, because unpickling can
run code; `legacy.py` converts a user's own runs once (`moeut migrate`) without running any.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from moeut.files import fsync_path, hash_fd, is_temporary_name
from moeut.train import shards as shard_lib

# The format's names, which other modules read through this one.
# fmt: off
from moeut.train.checkpoint_format import (CHECKPOINT_FILES, DAMAGED_SUFFIX, FORMAT, LEGACY_FORMAT,  # noqa: F401
                                           MANIFEST_FILE, MAX_SHARDS, MODEL_FILE, MODEL_PREFIX, MOMENTS,
                                           OPTIM_PREFIX, OPTIONAL_TRAINING_KEYS, SHARD_DIR, SHARDED, SINGLE,
                                           TEMP_PREFIX, TRAINING_FILES, TRAINING_JSON_FILE, TRAINING_KEYS,
                                           TRAINING_TENSORS_FILE, CheckpointError, checkpoint_dir, checkpoint_name,
                                           checkpoint_step, decode_tree, encode_tree, legacy_refusal,
                                           list_checkpoints, list_legacy_checkpoints)
from moeut.train.checkpoint_reader import (Checkpoint, CheckpointVanished, ModelSpec,  # noqa: F401
                                           check_compatible, check_finite, newest_usable_checkpoint,
                                           read_checkpoint, whole_optimizer_state)
# fmt: on


def write_json_atomic(path: Path, obj: Any) -> None:
    from moeut.files import write_json_atomic as write

    write(path, obj)


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


def _save_safetensors(tensors: Dict[str, torch.Tensor], path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(_safetensors_ready(tensors), str(path))
    except SafetensorError as e:  # its I/O errors (a full disk, a file-size limit) are not OSErrors
        raise CheckpointError(f"could not write {path}: {e}") from None


def _check_training(training: Dict[str, Any]) -> None:
    missing = [k for k in TRAINING_KEYS if k not in training]
    if missing:
        raise ValueError(f"training state lacks {missing}")


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_state: Dict[str, torch.Tensor],
    training: Dict[str, Any],
    keep: int = 3,
    loss: Optional[float] = None,
) -> Path:
    """Write checkpoint `step` of a run in the single layout, then delete all but the newest `keep`.

    On any failure (full disk, file-size limit, a signal) the temporary directory is removed and
    every earlier checkpoint is untouched. Old checkpoints are deleted only after the new one has
    been read back and matched its manifest, so rotation never removes the last intact checkpoint."""
    _check_training(training)
    return _write_checkpoint(
        run_dir, step, lambda tmp: _save_safetensors(model_state, tmp / MODEL_FILE), training, keep, loss
    )


def _write_checkpoint(
    run_dir: Path,
    step: int,
    write_weights: Callable[[Path], None],
    training: Dict[str, Any],
    keep: int,
    loss: Optional[float],
) -> Path:
    """One writer: `write_weights(tmp)` fills a fresh temporary directory, `finish_checkpoint` completes
    it; on any failure the temporary directory is removed."""
    tmp = make_temporary(run_dir, step)
    try:
        write_weights(tmp)
        return finish_checkpoint(run_dir, tmp, step, training, keep, loss)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_temporary(run_dir: Path, step: int, token: Optional[int] = None) -> Path:
    """A new, empty temporary directory for checkpoint `step`, created exclusively under an unpredictable
    name (`token`: the random part, when several processes must agree on it)."""
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    if d.is_symlink():
        raise CheckpointError(f"{d} is a symbolic link; a run's checkpoints must be its own directory")
    if token is None:
        return Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{checkpoint_name(step)}-", dir=d))
    tmp = d / f"{TEMP_PREFIX}{checkpoint_name(step)}-{token:016x}"
    tmp.mkdir()  # fails if it exists: never reuses what someone else put there
    return tmp


def save_sharded_checkpoint(
    run_dir: Path,
    step: int,
    write_shards: Callable[[Path], Dict[str, Any]],
    training_of: Callable[[Dict[str, Any]], Dict[str, Any]],
    keep: int,
    loss: Optional[float],
    rank: int,
    world: int,
    device,
) -> None:
    """The sharded save, called by every process together. Rank 0 makes the temporary directory (its
    random name sent to the others), every process writes its pieces into its `shards/`
    (`write_shards(shard_dir)` returns the optimizer state without its moments' data), rank 0 completes
    the checkpoint with `training_of(that state)`. A failure on any process reaches every process
    (through DCP, or the final barrier), and rank 0 removes the directory."""
    import torch.distributed as dist

    token = torch.tensor([secrets.randbits(62) if rank == 0 else 0], dtype=torch.int64, device=device)
    if world > 1:
        dist.broadcast(token, 0)
    tmp = (
        make_temporary(run_dir, step, int(token.item()))
        if rank == 0
        else checkpoint_dir(run_dir) / f"{TEMP_PREFIX}{checkpoint_name(step)}-{int(token.item()):016x}"
    )
    if world > 1:
        dist.barrier()
    try:
        opt_state = write_shards(tmp / SHARD_DIR)
        if rank == 0:
            finish_checkpoint(run_dir, tmp, step, training_of(opt_state), keep=keep, loss=loss)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if world > 1:
        dist.barrier()


def _file_record(tmp: Path, name: str) -> Dict[str, Any]:
    fd = os.open(tmp / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        return {"bytes": os.fstat(fd).st_size, "sha256": hash_fd(fd)}
    finally:
        os.close(fd)


def finish_checkpoint(
    run_dir: Path, tmp: Path, step: int, training: Dict[str, Any], keep: int = 3, loss: Optional[float] = None
) -> Path:
    """Complete a checkpoint whose weights are already in `tmp` (`model.safetensors`, or the shard files
    of every process under `shards/`): write the training files, fsync and hash every file, write the
    manifest, rename `tmp` into place, read it back, rotate. The caller removes `tmp` on failure."""
    _check_training(training)
    d = checkpoint_dir(run_dir)
    final = d / checkpoint_name(step)
    sharded = (tmp / SHARD_DIR).is_dir()
    tensors: Dict[str, torch.Tensor] = {}
    tree = encode_tree(
        {"step": step, **{k: training[k] for k in TRAINING_KEYS + OPTIONAL_TRAINING_KEYS if k in training}}, tensors
    )
    _save_safetensors(tensors, tmp / TRAINING_TENSORS_FILE)
    (tmp / TRAINING_JSON_FILE).write_text(json.dumps(tree))
    names = list(TRAINING_FILES)
    if sharded:
        found = sorted(os.listdir(tmp / SHARD_DIR))
        if not found or len(found) > MAX_SHARDS or not all(shard_lib.SHARD_NAME.match(n) for n in found):
            raise CheckpointError(f"{tmp / SHARD_DIR} holds {found[:4]}, not 1 to {MAX_SHARDS} shard files")
        names += [f"{SHARD_DIR}/{n}" for n in found]
        fsync_path(tmp / SHARD_DIR)
    else:
        names.insert(0, MODEL_FILE)
    files = {name: _file_record(tmp, name) for name in names}
    manifest = {
        "format": FORMAT,
        "layout": SHARDED if sharded else SINGLE,
        "step": step,
        "loss": loss if loss is not None and math.isfinite(loss) else None,
        "files": files,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    fsync_path(tmp / MANIFEST_FILE)
    fsync_path(tmp)
    old = None
    if final.exists() or final.is_symlink():  # the same step written again (a run that fell back, a conversion)
        old = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}replaced-{final.name}-", dir=d))
        os.rename(final, old / final.name)
    os.rename(tmp, final)
    fsync_path(d)
    try:
        read_checkpoint(final, "verify")  # read back from its final place before anything is deleted
    except BaseException:
        os.rename(final, tmp)  # out of the run's list again (the caller removes it)
        if old is not None:  # and the previous checkpoint of this step back in place
            os.rename(old / final.name, final)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if keep > 0:
        for stale in list_checkpoints(run_dir)[:-keep]:
            if stale != final:
                shutil.rmtree(stale, ignore_errors=True)
    return final


def checkpoint_layout(path: Path) -> str:
    """ "single" or "sharded" (see `checkpoint_format`)."""
    return read_checkpoint(path, "verify").layout


def verify_checkpoint(path: Path) -> Dict[str, Any]:
    """The manifest of checkpoint `path` after checking every file's size, SHA-256 and header;
    CheckpointError naming the first fault."""
    return read_checkpoint(path, "verify").manifest


def load_model_state(path: Path, spec: Optional[ModelSpec] = None) -> Dict[str, torch.Tensor]:
    """The model's whole state dict from usable checkpoint `path`, in either layout."""
    return read_checkpoint(path, "model", spec).model


def load_training_state(path: Path, spec: Optional[ModelSpec] = None) -> Dict[str, Any]:
    """{step, optimizer, scheduler, rng, data_position, config} of usable checkpoint `path`; in the sharded
    layout the AdamW moments are assembled into a name-keyed optimizer state dict."""
    return read_checkpoint(path, "all", spec).training


def checkpoint_tensor_shapes(path: Path) -> Dict[str, tuple]:
    """{name: shape} of the model tensors of checkpoint `path`, from the headers."""
    return {k: v[0] for k, v in read_checkpoint(path, "verify").shapes.items()}


def quarantine(path: Path) -> Path:
    """Rename an unusable checkpoint out of the run's list (kept for inspection, never deleted)."""
    target = path.with_name(path.name + DAMAGED_SUFFIX)
    i = 1
    while target.exists() or target.is_symlink():
        target = path.with_name(f"{path.name}{DAMAGED_SUFFIX}.{i}")
        i += 1
    os.rename(path, target)
    return target


def remove_stale_temporaries(run_dir: Path) -> List[Path]:
    """Delete what interrupted writers left behind (the caller holds the run's lock)."""
    removed = []
    d = checkpoint_dir(run_dir)
    for parent in (Path(run_dir), d):
        if not parent.is_dir() or parent.is_symlink():
            continue
        for p in parent.iterdir():
            if p.name.startswith(TEMP_PREFIX) or is_temporary_name(p.name):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def optimizer_state_by_name(state: Dict[str, Any], names: List[str]) -> Dict[str, Any]:
    """A one-process optimizer state dict (state and groups keyed by position) keyed by parameter name,
    as `get_optimizer_state_dict` writes it."""
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
        for g in state["param_groups"]
    ]
    return {"state": {names[int(i)]: s for i, s in state["state"].items()}, "param_groups": groups}


def optimizer_state_by_position(state: Dict[str, Any], names: List[str]) -> Dict[str, Any]:
    """The inverse of `optimizer_state_by_name`."""
    index = {n: i for i, n in enumerate(names)}
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
        for g in state["param_groups"]
    ]
    return {"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def sharded_optimizer_record(optimizer_state: Dict[str, Any]) -> Dict[str, Any]:
    """What `training.json` keeps of a name-keyed AdamW state dict in the sharded layout: the groups and
    each parameter's step count (the moments go into the shard files)."""
    return {
        "param_groups": optimizer_state["param_groups"],
        "steps": {n: float(s["step"]) for n, s in optimizer_state["state"].items() if "step" in s},
    }


def convert_checkpoint(
    run_dir: Path, path: Path, layout: str, spec: ModelSpec, shards: int = 1, report: Callable[[str], None] = print
) -> Path:
    """Rewrite checkpoint `path` of a run in `layout` ("single" or "sharded" in `shards` files), in place
    and atomically (the old files stay until the new ones are verified). `spec.parameters`: the
    model's parameters in the optimizer's group order, to key a single-layout AdamW state by name."""
    path = Path(path)
    if layout not in (SINGLE, SHARDED):
        raise CheckpointError(f"layout must be {SINGLE} or {SHARDED}, got {layout!r}")
    if layout == SHARDED and not 1 <= shards <= MAX_SHARDS:
        raise CheckpointError(f"--shards must be from 1 to {MAX_SHARDS}, got {shards}")
    ck = read_checkpoint(path, "all", spec)
    model_state, training = ck.model, ck.training
    step = int(training.pop("step"))
    names = spec.parameters
    by_name = training.get("optimizer_keys") == "names"
    opt = training["optimizer"]
    if layout == SINGLE:
        if by_name:  # one-process runs key AdamW by position
            training["optimizer"] = optimizer_state_by_position(opt, names)
            training["optimizer_keys"] = "positions"

        def write_weights(tmp):
            _save_safetensors(model_state, tmp / MODEL_FILE)
    else:
        named = opt if by_name else optimizer_state_by_name(opt, names)
        tensors = {
            **{MODEL_PREFIX + k: v for k, v in model_state.items()},
            **{f"{OPTIM_PREFIX}{n}.{m}": s[m] for n, s in named["state"].items() for m in MOMENTS},
        }
        training["optimizer"], training["optimizer_keys"] = sharded_optimizer_record(named), "names"

        def write_weights(tmp):
            (tmp / SHARD_DIR).mkdir()
            for i, part in enumerate(shard_lib.split_dim0(tensors, shards), start=1):
                shard_lib.write_shard(tmp / SHARD_DIR / shard_lib.shard_file_name(i), part)

    final = _write_checkpoint(run_dir, step, write_weights, training, keep=0, loss=ck.manifest.get("loss"))
    report(f"{final.name}: {ck.layout} -> {layout}" + (f" ({shards} shard files)" if layout == SHARDED else ""))
    return final
