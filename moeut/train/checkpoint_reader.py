"""Reading checkpoints: one test of whether a checkpoint is usable, shared by every reader (resume,
eval, generate, export, analyze, conversion).

`read_checkpoint` opens a checkpoint and returns what was asked of it only if all of this holds, in
this order, the cheap checks first:
  1. the directory and each file are opened once, following no link (`moeut.files`); the manifest
     parses within bounds and fits its schema (`checkpoint_format.check_manifest`), and its step is
     the directory's;
  2. every file read has the manifest's size and SHA-256, hashed through the handle it is then read
     from (a file swapped between the check and the read cannot be read);
  3. the tensor headers give exactly the model's names, shapes and dtypes (`ModelSpec`); in the
     sharded layout the pieces of every tensor tile it (`shards.ShardSet`), before any tensor byte;
  4. `training.json` fits its schema, its step is the directory's, and the AdamW moments have their
     parameters' names and shapes;
  5. every floating-point tensor read is finite.
`newest_usable_checkpoint` walks from the newest checkpoint down, names each one it skips and why,
and lists the run again when a checkpoint vanishes while it reads (another process rotating).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from moeut.files import FileProblem, hash_fd, open_dir, open_file, parse_json, read_fd
from moeut.train.checkpoint_format import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    MAX_TRAINING_JSON_BYTES,
    MODEL_FILE,
    MODEL_PREFIX,
    MOMENTS,
    OPTIM_PREFIX,
    SHARD_DIR,
    SHARDED,
    TRAINING_JSON_FILE,
    TRAINING_TENSORS_FILE,
    CheckpointError,
    check_manifest,
    check_training,
    checkpoint_step,
    decode_tree,
    is_int,
    is_number,
    legacy_refusal,
    list_checkpoints,
    list_legacy_checkpoints,
    shard_names,
)
from moeut.train.shards import ShardError, ShardSet, listed_files, open_shard_set
from moeut.train.tensor_file import read_header, read_tensor

Shapes = Dict[str, Tuple[Tuple[int, ...], torch.dtype]]
PARTS = ("model", "all", "training", "verify")
# model:    the model's whole tensors
# all:      the model and the training state, the AdamW moments whole (one process resuming, conversion)
# training: the training state without the sharded layout's moments, the shard headers checked (an
#           FSDP process then reads its own rows, `fsdp.load_sharded_state`)
# verify:   sizes, hashes and headers only


class CheckpointVanished(CheckpointError):
    """The checkpoint's directory or one of its files disappeared while it was read (rotation)."""


@dataclass
class ModelSpec:
    """What a checkpoint must hold for a model: its state dict's names, shapes and dtypes, and (to check
    an optimizer state) the parameter names in the optimizer's order."""

    tensors: Shapes
    parameters: Optional[List[str]] = None

    @classmethod
    def of(cls, model: torch.nn.Module, parameters: Optional[List[str]] = None) -> "ModelSpec":
        return cls({k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}, parameters)


@dataclass
class Checkpoint:
    path: Path
    step: int
    manifest: Dict[str, Any]
    shapes: Optional[Shapes] = None  # the model tensors' names, shapes and dtypes (headers)
    model: Optional[Dict[str, torch.Tensor]] = None
    training: Optional[Dict[str, Any]] = None

    @property
    def layout(self) -> str:
        return self.manifest["layout"]


def check_compatible(own: Shapes, saved: Shapes, source: str) -> None:
    """Refuse saved tensors whose names, shapes or dtypes differ from the model's, before anything is read."""
    missing = sorted(set(own) - set(saved))
    extra = sorted(set(saved) - set(own))
    bad = sorted(k for k in set(own) & set(saved) if tuple(own[k][0]) != tuple(saved[k][0]))
    cast = sorted(k for k in set(own) & set(saved) if k not in bad and own[k][1] != saved[k][1])
    if missing or extra or bad or cast:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if extra:
            parts.append(f"unexpected {extra[:3]}")
        if bad:
            parts.append(f"shape mismatch {[(k, tuple(saved[k][0]), tuple(own[k][0])) for k in bad[:3]]}")
        if cast:
            parts.append(f"dtype mismatch {[(k, str(saved[k][1]), str(own[k][1])) for k in cast[:3]]}")
        raise CheckpointError(f"checkpoint {source} does not fit this model: " + "; ".join(parts))


def check_finite(state: Dict[str, Any], source: str) -> None:
    bad = [k for k, t in _tensors(state) if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"checkpoint {source} holds non-finite values in {bad[:3]}")


def _tensors(obj: Any, prefix: str = "") -> List[Tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    if isinstance(obj, dict):
        return [t for k, v in obj.items() for t in _tensors(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (list, tuple)):
        return [t for i, v in enumerate(obj) for t in _tensors(v, f"{prefix}[{i}]")]
    return []


def check_optimizer(training: Dict[str, Any], spec: ModelSpec, source: str) -> None:
    """The AdamW state of `training` against the model: every entry names a parameter (by position or
    by name), and its moments have that parameter's shape and dtype."""
    if spec.parameters is None:
        return
    names = spec.parameters
    opt = training["optimizer"]
    by_name = training.get("optimizer_keys") == "names"
    where = f"checkpoint {source}: {TRAINING_JSON_FILE}: optimizer"
    grouped = [p for g in opt["param_groups"] for p in g["params"]]
    want = list(names) if by_name else list(range(len(names)))
    if sorted(grouped, key=str) != sorted(want, key=str):
        raise CheckpointError(
            f"{where}: its parameter groups list {len(grouped)} parameters, not this model's {len(names)} (each once)"
        )
    if "steps" in opt:  # sharded record: the moments are in the shard files, checked with their headers
        unknown = sorted(set(opt["steps"]) - set(names))
        if unknown:
            raise CheckpointError(f"{where}: step counts for parameters this model does not have: {unknown[:3]}")
        return
    index = {n: i for i, n in enumerate(names)}
    for key, entry in opt["state"].items():
        name = key if by_name else (names[key] if is_int(key) and 0 <= key < len(names) else None)
        if name is None or name not in index:
            raise CheckpointError(f"{where}: state for {key!r}, which is no parameter of this model")
        if not isinstance(entry, dict) or not all(isinstance(entry.get(m), torch.Tensor) for m in MOMENTS):
            raise CheckpointError(f"{where}: the state of {name} lacks its moments {MOMENTS}")
        shape, dtype = spec.tensors[name]
        for m in MOMENTS:
            t = entry[m]
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise CheckpointError(
                    f"{where}: {name}.{m} is {str(t.dtype)} {tuple(t.shape)}, the parameter is "
                    f"{str(dtype)} {tuple(shape)}"
                )
        step = entry.get("step")
        value = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step
        if not is_number(value) or value < 0:
            raise CheckpointError(f"{where}: the step count of {name} is {step!r}")


class _Reader:
    """One checkpoint directory held open; files opened once each and verified through their handle."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_symlink():
            raise CheckpointError(f"checkpoint {path} is a symbolic link; links in a run are not followed")
        try:
            self.fd = open_dir(path)
        except FileNotFoundError:
            raise CheckpointVanished(f"checkpoint {path} does not exist") from None
        except (FileProblem, OSError) as e:
            raise CheckpointError(f"checkpoint {path}: {e}") from None
        self.fds: List[int] = []
        self.shards: Optional[ShardSet] = None

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        if self.shards is not None:
            self.shards.close()
        os.close(self.fd)

    def _open(self, name: str) -> int:
        try:
            fd = open_file(name, self.fd, what=f"{self.path}/{name}")
        except FileNotFoundError:
            if not os.path.isdir(self.path):
                raise CheckpointVanished(f"checkpoint {self.path} does not exist") from None
            raise CheckpointError(f"checkpoint {self.path} is damaged: {name} is missing") from None
        except (FileProblem, OSError) as e:
            raise CheckpointError(f"checkpoint {self.path} is damaged: {e}") from None
        self.fds.append(fd)
        return fd

    def manifest(self) -> Dict[str, Any]:
        try:
            fd = open_file(MANIFEST_FILE, self.fd, MAX_MANIFEST_BYTES, f"{self.path}/{MANIFEST_FILE}")
        except FileNotFoundError:
            if not os.path.isdir(self.path):
                raise CheckpointVanished(f"checkpoint {self.path} does not exist") from None
            raise CheckpointError(f"checkpoint {self.path} is incomplete: it has no {MANIFEST_FILE}") from None
        except (FileProblem, OSError) as e:
            raise CheckpointError(f"checkpoint {self.path} is damaged: {e}") from None
        try:
            data = bytes(read_fd(fd, os.fstat(fd).st_size, 0, MANIFEST_FILE))
        finally:
            os.close(fd)
        try:
            manifest = check_manifest(parse_json(data, MANIFEST_FILE, MAX_MANIFEST_BYTES), str(self.path))
        except FileProblem as e:
            raise CheckpointError(f"checkpoint {self.path} is damaged: {e}") from None
        step = checkpoint_step(self.path)
        if manifest["step"] != step:
            raise CheckpointError(f"checkpoint {self.path}: its manifest says step {manifest['step']}")
        self.recorded = manifest["files"]
        return manifest

    def check(self, name: str, fd: int) -> None:
        rec = self.recorded[name]
        size = os.fstat(fd).st_size
        if size != rec["bytes"]:
            raise CheckpointError(
                f"checkpoint {self.path} is damaged: {name} has {size} bytes, its manifest says "
                f"{rec['bytes']} (truncated or overwritten)"
            )
        if hash_fd(fd) != rec["sha256"]:
            raise CheckpointError(
                f"checkpoint {self.path} is damaged: {name} does not match its SHA-256 in the manifest"
            )

    def verified(self, name: str) -> int:
        fd = self._open(name)
        self.check(name, fd)
        return fd

    def tensors(
        self, name: str, read: bool = True, spec: Optional[ModelSpec] = None
    ) -> Tuple[Shapes, Dict[str, torch.Tensor]]:
        """(names, shapes and dtypes; the tensors if `read`) of verified safetensors file `name`, its
        header checked against `spec` before a tensor is read."""
        fd = self.verified(name)
        what = f"{self.path}/{name}"
        try:
            header = read_header(fd, what)
            shapes = {k: (e.shape, e.dtype) for k, e in header.entries.items()}
            if spec is not None:
                check_compatible(spec.tensors, shapes, str(self.path))
            return shapes, ({k: read_tensor(fd, e, what) for k, e in header.entries.items()} if read else {})
        except FileProblem as e:
            raise CheckpointError(f"checkpoint {self.path} is damaged: {e}") from None

    def shard_set(self, manifest: Dict[str, Any]) -> ShardSet:
        names = shard_names(manifest)
        found = listed_files(self.fd)
        if found != names:  # nothing in shards/ but the manifest's files (DCP's reader would take any)
            extra, lacking = sorted(set(found or []) - set(names)), sorted(set(names) - set(found or []))
            raise CheckpointError(
                f"checkpoint {self.path} is damaged: {SHARD_DIR}/ holds {extra or 'no'} files beyond "
                f"its manifest and lacks {lacking or 'none'}"
            )
        try:
            self.shards = open_shard_set(self.fd, names, str(self.path))
        except ShardError as e:
            raise CheckpointError(f"checkpoint {self.path}: {e}") from None
        for n in names:
            self.check(f"{SHARD_DIR}/{n}", self.shards.fds[n])
        return self.shards

    def training(self, manifest: Dict[str, Any]) -> Dict[str, Any]:
        _, tensors = self.tensors(TRAINING_TENSORS_FILE)
        fd = self.verified(TRAINING_JSON_FILE)
        if os.fstat(fd).st_size > MAX_TRAINING_JSON_BYTES:
            raise CheckpointError(
                f"checkpoint {self.path}: {TRAINING_JSON_FILE} is larger than {MAX_TRAINING_JSON_BYTES:,} bytes"
            )
        try:
            tree = parse_json(
                bytes(read_fd(fd, os.fstat(fd).st_size, 0, TRAINING_JSON_FILE)),
                f"checkpoint {self.path}: {TRAINING_JSON_FILE}",
                MAX_TRAINING_JSON_BYTES,
            )
        except FileProblem as e:
            raise CheckpointError(str(e)) from None
        where = f"checkpoint {self.path}: {TRAINING_JSON_FILE}"
        return check_training(decode_tree(tree, tensors, where), str(self.path), manifest["step"])


def read_checkpoint(path: Path, part: str = "model", spec: Optional[ModelSpec] = None) -> Checkpoint:
    """Checkpoint `path` with `part` read (see PARTS), if it is usable for a model of `spec` (None:
    no shape check); CheckpointError naming the first fault (CheckpointVanished if it disappeared)."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    path = Path(path)
    reader = _Reader(path)
    try:
        manifest = reader.manifest()
        out = Checkpoint(path, manifest["step"], manifest)
        want_model = part in ("model", "all")
        if manifest["layout"] == SHARDED:
            shards = reader.shard_set(manifest)
            shapes = out.shapes = shards.whole_shapes(MODEL_PREFIX)
            if spec is not None:
                check_compatible(spec.tensors, shapes, str(path))
                _check_moment_headers(shards, spec, str(path))
            if want_model:
                out.model = shards.whole(MODEL_PREFIX)
            elif part == "training":  # every piece checked finite, one tensor at a time, none kept
                for name in shards.names():
                    shape = shards.shapes[name]
                    check_finite({name: shards.rows(name, 0, shape[0] if shape else 0)}, str(path))
        else:
            out.shapes, tensors = reader.tensors(MODEL_FILE, read=want_model, spec=spec)
            if want_model:
                out.model = tensors
        if part == "verify":
            reader.verified(TRAINING_TENSORS_FILE)
            reader.verified(TRAINING_JSON_FILE)
        if part in ("all", "training"):
            out.training = reader.training(manifest)
            if manifest["layout"] == SHARDED and part == "all":
                out.training["optimizer"] = whole_optimizer_state(
                    out.training["optimizer"], reader.shards.whole(OPTIM_PREFIX), str(path)
                )
            if spec is not None:
                check_optimizer(out.training, spec, str(path))
            check_finite(out.training, str(path))
        if out.model is not None:
            check_finite(out.model, str(path))
        return out
    except ShardError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    finally:
        reader.close()


def _check_moment_headers(shards: ShardSet, spec: ModelSpec, source: str) -> None:
    moments = shards.whole_shapes(OPTIM_PREFIX)
    for name, (shape, dtype) in moments.items():
        param, _, m = name.rpartition(".")
        if (
            m not in MOMENTS
            or param not in spec.tensors
            or tuple(spec.tensors[param][0]) != tuple(shape)
            or spec.tensors[param][1] != dtype
        ):
            raise CheckpointError(
                f"checkpoint {source}: the shard files' {OPTIM_PREFIX}{name} ({str(dtype)} "
                f"{tuple(shape)}) is no moment of a parameter of this model"
            )


def whole_optimizer_state(record: Dict[str, Any], moments: Dict[str, torch.Tensor], source: str) -> Dict[str, Any]:
    """The name-keyed AdamW state dict from `sharded_optimizer_record` and the assembled moments
    ({"<name>.exp_avg": tensor, ...})."""
    state = {}
    for name, step in record["steps"].items():
        entry = {"step": torch.tensor(float(step))}
        for m in MOMENTS:
            if f"{name}.{m}" not in moments:
                raise CheckpointError(f"checkpoint {source}: the shard files have no {m} for {name}")
            entry[m] = moments[f"{name}.{m}"]
        state[name] = entry
    return {"state": state, "param_groups": record["param_groups"]}


def read_rows(path: Path, requests: Dict[str, Tuple[int, int]]) -> Dict[str, torch.Tensor]:
    """{name: rows [start, stop) of that tensor} from sharded checkpoint `path` (an FSDP process reading
    its own part); the shard files holding them are verified against the manifest through the handles
    they are then read from. CheckpointError naming the first fault."""
    path = Path(path)
    reader = _Reader(path)
    try:
        manifest = reader.manifest()
        if manifest["layout"] != SHARDED:
            raise CheckpointError(f"checkpoint {path} is not sharded")
        names = shard_names(manifest)
        try:
            shards = reader.shards = open_shard_set(reader.fd, names, str(path))
        except ShardError as e:
            raise CheckpointError(f"checkpoint {path}: {e}") from None
        unknown = sorted(set(requests) - set(shards.pieces))
        if unknown:
            raise CheckpointError(f"checkpoint {path}: the shard files hold no {unknown[:3]}")
        touched = {
            p.file
            for t, (a, b) in requests.items()
            for p in shards.pieces[t]
            if not shards.shapes[t] or (p.start < b and a < p.start + p.entry.shape[0])
        }
        for f in sorted(touched):
            reader.check(f"{SHARD_DIR}/{f}", shards.fds[f])
        return {t: shards.rows(t, a, b) for t, (a, b) in requests.items()}
    except ShardError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    finally:
        reader.close()


def newest_usable_checkpoint(
    run_dir: Path, part: str = "model", spec: Optional[ModelSpec] = None, warn: Callable[[str], None] = print
) -> Optional[Checkpoint]:
    """The newest checkpoint of the run that `read_checkpoint` accepts, read; each newer one is named
    through `warn` with the reason it was skipped. None when the run has no checkpoint; CheckpointError
    when none is usable, or when the run has only checkpoints of the refused pickle format."""
    for _ in range(5):
        found = list_checkpoints(run_dir)
        if not found:
            legacy = list_legacy_checkpoints(run_dir)
            if legacy:
                raise legacy_refusal(legacy[-1], run_dir)
            return None
        problems = []
        for path in reversed(found):
            try:
                return read_checkpoint(path, part, spec)
            except CheckpointVanished:
                break  # rotated away while read: list again
            except CheckpointError as e:
                problems.append(f"{path.name}: {e}")
                warn(f"warning: skipping checkpoint {path.name}: {e}; trying an older checkpoint")
        else:
            raise CheckpointError(f"run {run_dir} has no usable checkpoint: " + "; ".join(problems))
    raise CheckpointError(
        f"run {run_dir}: its checkpoints kept disappearing while read (another process is rotating them); try again"
    )
