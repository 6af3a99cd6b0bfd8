"""What a checkpoint is on disk: its names, its files, the JSON schema of its manifest and training
state, and the plain-data encoding of the training state. Writing is `checkpoint.py`, reading and
the "usable checkpoint" test `checkpoint_reader.py`.

Layout of one checkpoint, a directory `<run>/checkpoints/step_00001000/`:

    model.safetensors      the model's state dict ("single" layout)
    shards/shard-NNNNN-model-00001-of-00001.safetensors
                           instead of model.safetensors in the "sharded" layout (FSDP runs, `shards.py`):
                           one file per writing process, pieces of the model ("model.<name>") and of
                           the AdamW moments ("optim.<name>.exp_avg", "...exp_avg_sq")
    training.safetensors   every tensor of the training state (AdamW moments, RNG states)
    training.json          the rest of the training state as plain JSON: optimizer hyperparameters,
                           scheduler, step, data position, run config; tensors appear as references
                           {"$tensor": name} into training.safetensors
    manifest.json          format tag, layout, step, byte size and SHA-256 of each file above; written last
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Dict, List

import torch

FORMAT = "moeut-checkpoint-v2"
LEGACY_FORMAT = "moeut-checkpoint-v1"
MODEL_FILE = "model.safetensors"
TRAINING_TENSORS_FILE = "training.safetensors"
TRAINING_JSON_FILE = "training.json"
MANIFEST_FILE = "manifest.json"
TRAINING_FILES = (TRAINING_TENSORS_FILE, TRAINING_JSON_FILE)
CHECKPOINT_FILES = (MODEL_FILE, *TRAINING_FILES)
TRAINING_KEYS = ("optimizer", "scheduler", "rng", "data_position", "config")
OPTIONAL_TRAINING_KEYS = ("optimizer_keys", "clock")  # optimizer_keys: "names" (FSDP runs) or "positions"
# (absent: positions); clock: the trainer's StepClock
SINGLE, SHARDED = "single", "sharded"  # layouts (see the module docstring)
MODEL_PREFIX, OPTIM_PREFIX = "model.", "optim."  # tensor names in the shard files
MOMENTS = ("exp_avg", "exp_avg_sq")
SHARD_DIR = "shards"
SHARD_NAME = re.compile(r"^shard-(\d{5})-model-00001-of-00001\.safetensors$")
MAX_SHARDS = 4096  # shard files in one checkpoint, written or read

MAX_MANIFEST_BYTES = 4 << 20
MAX_TRAINING_JSON_BYTES = 256 << 20
MAX_RUN_JSON_BYTES = 4 << 20

NAME = re.compile(r"^step_(\d{8,12})$")
LEGACY_NAME = re.compile(r"^step_(\d{8,12})\.pt$")
TEMP_PREFIX = ".tmp-"
DAMAGED_SUFFIX = ".damaged"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(RuntimeError):
    """A checkpoint (or run directory) that cannot be used; the message names the file and the fault."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(path: Path) -> int:
    m = NAME.match(Path(path).name)
    if m is None:
        raise CheckpointError(f"{path} is not named like a checkpoint (step_NNNNNNNN)")
    return int(m.group(1))


def list_checkpoints(run_dir: Path) -> List[Path]:
    """Checkpoint directories of a run, oldest first by step (usable or not: see `checkpoint_reader`)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir() or d.is_symlink():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := NAME.match(p.name)) and not p.is_symlink()]
    return [p for _, p in sorted(found)]


def list_legacy_checkpoints(run_dir: Path) -> List[Path]:
    d = checkpoint_dir(run_dir)
    if not d.is_dir() or d.is_symlink():
        return []
    return sorted(p for p in d.iterdir() if LEGACY_NAME.match(p.name))


def legacy_refusal(path: Path, run_dir: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is a checkpoint in moeut's earlier pickle format, which can run arbitrary code when loaded, "
        f"so it is not loaded. If this run is your own, convert its checkpoints once with: "
        f"moeut migrate {run_dir}"
    )


# ------------------------------------------------------------------------------------------------
# Plain-data encoding of nested training state (optimizer and scheduler state dicts, RNG states).
# ------------------------------------------------------------------------------------------------


def encode_tree(obj: Any, tensors: Dict[str, torch.Tensor], path: str = "t") -> Any:
    """JSON-able form of `obj`; its tensors are moved into `tensors` under generated names.

    Dicts with non-string keys (an optimizer's per-parameter state) and tuples are tagged so that
    `decode_tree` gives back exactly the same Python types."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach()
        return {"$tensor": path}
    if isinstance(obj, float) and not math.isfinite(obj):
        raise TypeError(f"cannot store the non-finite number {obj} in a checkpoint ({path})")
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"$tuple": [encode_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: encode_tree(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {
            "$items": [
                [encode_tree(k, tensors, f"{path}.k{i}"), encode_tree(v, tensors, f"{path}.{i}")]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint ({path}): only tensors and plain data")


def decode_tree(obj: Any, tensors: Dict[str, torch.Tensor], where: str = "training.json") -> Any:
    """The inverse of `encode_tree`; CheckpointError naming the field of a malformed tag."""
    if isinstance(obj, list):
        return [decode_tree(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if not isinstance(obj, dict):
        return obj
    tags = [k for k in obj if isinstance(k, str) and k.startswith("$")]
    if tags:
        if len(obj) != 1 or tags[0] not in ("$tensor", "$tuple", "$items"):
            raise CheckpointError(f"{where}: the object {sorted(obj)[:4]} is not one of the encoding's tags")
        tag, value = tags[0], obj[tags[0]]
        if tag == "$tensor":
            if not isinstance(value, str) or value not in tensors:
                raise CheckpointError(f"{where}: tensor {value!r} is referenced but not stored")
            return tensors[value]
        if not isinstance(value, list):
            raise CheckpointError(f"{where}: {tag} must hold a list")
        if tag == "$tuple":
            return tuple(decode_tree(v, tensors, f"{where}[{i}]") for i, v in enumerate(value))
        out = {}
        for i, pair in enumerate(value):
            if not isinstance(pair, list) or len(pair) != 2:
                raise CheckpointError(f"{where}[{i}]: a $items entry must be a [key, value] pair")
            key = decode_tree(pair[0], tensors, f"{where}[{i}][0]")
            if isinstance(key, (dict, list, torch.Tensor)):
                raise CheckpointError(f"{where}[{i}]: a dictionary key of type {type(key).__name__}")
            out[key] = decode_tree(pair[1], tensors, f"{where}[{i}][1]")
        return out
    return {k: decode_tree(v, tensors, f"{where}.{k}") for k, v in obj.items()}


# ------------------------------------------------------------------------------------------------
# Schemas: every field of a manifest and a training state, checked before it is used.
# ------------------------------------------------------------------------------------------------


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _need(ok: bool, where: str, what: str, got: Any) -> None:
    if not ok:
        text = repr(got)
        raise CheckpointError(f"{where} must be {what}, got {text[:80]}{'...' if len(text) > 80 else ''}")


def check_manifest(manifest: Any, source: str) -> Dict[str, Any]:
    """The manifest of checkpoint `source`, every field checked; CheckpointError naming the field."""
    where = f"checkpoint {source}: {MANIFEST_FILE}"
    _need(isinstance(manifest, dict), where, "a JSON object", manifest)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {source} is not a {FORMAT} checkpoint ({MANIFEST_FILE} has no such format tag)"
        )
    layout = manifest.setdefault("layout", SINGLE)
    if layout not in (SINGLE, SHARDED):
        raise CheckpointError(f"checkpoint {source} has the unknown layout {layout!r} (expected {SINGLE} or {SHARDED})")
    _need(
        is_int(manifest.get("step")) and manifest["step"] >= 0,
        f"{where}: step",
        "a non-negative integer",
        manifest.get("step"),
    )
    loss = manifest.get("loss")
    _need(loss is None or is_number(loss), f"{where}: loss", "a finite number or null", loss)
    files = manifest.get("files")
    _need(
        isinstance(files, dict) and 0 < len(files) <= MAX_SHARDS + 2,
        f"{where}: files",
        f"an object of 1 to {MAX_SHARDS + 2} files",
        type(files).__name__ if not isinstance(files, dict) else files,
    )
    for name, rec in files.items():
        _need(
            isinstance(rec, dict) and set(rec) == {"bytes", "sha256"},
            f"{where}: files[{name!r}]",
            "an object of bytes and sha256",
            rec,
        )
        _need(
            is_int(rec["bytes"]) and 0 <= rec["bytes"] < 1 << 50,
            f"{where}: files[{name!r}].bytes",
            "a file size",
            rec["bytes"],
        )
        _need(
            isinstance(rec["sha256"], str) and bool(_HEX64.match(rec["sha256"])),
            f"{where}: files[{name!r}].sha256",
            "64 hexadecimal digits",
            rec["sha256"],
        )
    if layout == SINGLE:
        ok, expected = set(files) == set(CHECKPOINT_FILES), list(CHECKPOINT_FILES)
    else:
        shard_names = [n for n in files if n.startswith(SHARD_DIR + "/")]
        ok = (
            bool(shard_names)
            and set(files) == {*TRAINING_FILES, *shard_names}
            and all(SHARD_NAME.match(n.split("/", 1)[1]) for n in shard_names)
        )
        expected = [*TRAINING_FILES, "shards/shard-NNNNN-model-00001-of-00001.safetensors ..."]
    if not ok:
        raise CheckpointError(
            f"checkpoint {source} is damaged: its manifest lists {sorted(files)[:6]}, expected {expected}"
        )
    return manifest


def shard_names(manifest: Dict[str, Any]) -> List[str]:
    """The shard files a (checked) manifest lists, as names inside `shards/`, in order."""
    return sorted(n.split("/", 1)[1] for n in manifest["files"] if n.startswith(SHARD_DIR + "/"))


def check_training(state: Any, source: str, step: int) -> Dict[str, Any]:
    """The decoded training state of checkpoint `source` (step `step`), its structure checked (the
    optimizer's tensors against the model later, `checkpoint_reader.check_optimizer`)."""
    where = f"checkpoint {source}: {TRAINING_JSON_FILE}"
    _need(isinstance(state, dict), where, "an object", type(state).__name__)
    missing = [k for k in ("step", *TRAINING_KEYS) if k not in state]
    missing += [k for k in ("optimizer", "scheduler", "rng") if k in state and not state[k]]
    if missing:
        raise CheckpointError(f"checkpoint {source} has no {', '.join(missing)} state (it cannot continue training)")
    _need(is_int(state["step"]), f"{where}: step", "an integer", state["step"])
    if state["step"] != step:
        raise CheckpointError(f"{where}: step {state['step']} is not the step of its directory and manifest ({step})")
    _need(
        is_int(state["data_position"]) and state["data_position"] >= 0,
        f"{where}: data_position",
        "a non-negative integer",
        state["data_position"],
    )
    _need(isinstance(state["config"], dict), f"{where}: config", "an object", state["config"])
    _need(isinstance(state["scheduler"], dict), f"{where}: scheduler", "an object", state["scheduler"])
    keys = state.get("optimizer_keys", "positions")
    _need(keys in ("positions", "names"), f"{where}: optimizer_keys", "'positions' or 'names'", keys)
    opt = state["optimizer"]
    _need(
        isinstance(opt, dict) and isinstance(opt.get("param_groups"), list),
        f"{where}: optimizer",
        "an object with param_groups",
        type(opt).__name__,
    )
    for i, g in enumerate(opt["param_groups"]):
        _need(
            isinstance(g, dict) and isinstance(g.get("params"), list),
            f"{where}: optimizer.param_groups[{i}]",
            "an object with a params list",
            g,
        )
        for k in ("lr", "weight_decay", "eps"):
            if k in g:
                _need(
                    is_number(g[k]) and g[k] >= 0,
                    f"{where}: optimizer.param_groups[{i}].{k}",
                    "a non-negative, finite number",
                    g[k],
                )
    if "steps" in opt:  # the sharded layout's record: step counts by name
        _need(
            isinstance(opt["steps"], dict) and all(is_number(v) and v >= 0 for v in opt["steps"].values()),
            f"{where}: optimizer.steps",
            "an object of step counts",
            opt["steps"],
        )
    else:
        _need(isinstance(opt.get("state"), dict), f"{where}: optimizer.state", "an object", opt.get("state"))
    rng = state["rng"]
    _need(
        isinstance(rng, dict) or (isinstance(rng, list) and rng and all(isinstance(r, dict) for r in rng)),
        f"{where}: rng",
        "an object (or a list of them, one per process)",
        type(rng).__name__,
    )
    return state
