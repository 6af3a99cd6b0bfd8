"""The files of a sharded checkpoint: each process's pieces of each tensor in one safetensors file.

A sharded checkpoint keeps its tensors in `shards/shard-NNNNN-model-00001-of-00001.safetensors`, one
file per writing process (NNNNN from 00001). This is the layout that PyTorch Distributed Checkpoint
writes through `HuggingFaceStorageWriter(save_distributed=True)`: every file holds, under a tensor's
full name, the process's piece of it, and the file's safetensors metadata maps each name to the
piece's offsets in the whole tensor (`{"DCP_SHARDING_INFO": json {name: {"saved_offsets": [...]}}}`).
A tensor's whole shape is therefore known from the headers alone, and any number of processes can
read back the parts they need (`HuggingFaceStorageReader`); this module reads them without a process
group: whole tensors for one process, evaluation and conversion, and the shapes for checks.

Only tensors go into these files. Safetensors headers are JSON, so reading them runs no code.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Tuple

import torch

SHARD_DIR = "shards"
SHARDING_INFO_KEY = "DCP_SHARDING_INFO"     # the key DCP's safetensors writer and reader use
SHARD_NAME = re.compile(r"^shard-(\d{5})-model-00001-of-00001\.safetensors$")


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class ShardError(ValueError):
    """Shard files that do not fit together; the message names the file or tensor."""


def shard_file_name(index: int) -> str:
    """The name of the `index`-th shard file (from 1), as DCP names it."""
    return f"shard-{index:05d}-model-00001-of-00001.safetensors"


def shard_files(directory: Path) -> List[Path]:
    """The shard files of a `shards/` directory, in order."""
    found = sorted(p for p in Path(directory).iterdir() if SHARD_NAME.match(p.name) and not p.is_symlink())
    if not found:
        raise ShardError(f"{directory} holds no shard files (shard-NNNNN-model-00001-of-00001.safetensors)")
    return found


def write_shard(path: Path, pieces: Dict[str, Tuple[torch.Tensor, List[int]]]) -> None:
    """One shard file: {name: (piece, its offsets in the whole tensor)}."""
    from safetensors.torch import save_file
    tensors = {k: t.detach().to("cpu").contiguous() for k, (t, _) in pieces.items()}
    info = {k: {"saved_offsets": [int(o) for o in offsets]} for k, (_, offsets) in pieces.items()}
    save_file(tensors, str(path), metadata={SHARDING_INFO_KEY: json.dumps(info), "format": "pt"})


def split_dim0(state: Dict[str, torch.Tensor], n: int) -> List[Dict[str, Tuple[torch.Tensor, List[int]]]]:
    """`state` cut into `n` shards along the first dimension (FSDP2's `Shard(0)` pieces, `torch.chunk`
    sizes); a 0-dimensional tensor goes whole into the first shard, an empty piece nowhere."""
    out: List[Dict[str, Tuple[torch.Tensor, List[int]]]] = [{} for _ in range(n)]
    for name, t in state.items():
        if t.dim() == 0:
            out[0][name] = (t, [])
            continue
        start = 0
        for i, piece in enumerate(torch.chunk(t, n, dim=0)):
            if piece.shape[0]:
                out[i][name] = (piece, [start] + [0] * (t.dim() - 1))
            start += piece.shape[0]
    return out


def _pieces(files: List[Path]) -> Dict[str, List[Tuple[Path, List[int], Tuple[int, ...], str]]]:
    """{name: [(file, offsets, piece shape, dtype)]} from the headers of `files`."""
    from safetensors import safe_open
    found: Dict[str, List[Tuple[Path, List[int], Tuple[int, ...], str]]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                info = json.loads((sf.metadata() or {}).get(SHARDING_INFO_KEY, "{}"))
                for name in sf.keys():
                    sl = sf.get_slice(name)
                    shape = tuple(sl.get_shape())
                    offsets = info.get(name, {}).get("saved_offsets", [0] * len(shape))
                    if len(offsets) != len(shape) or any(not isinstance(o, int) or o < 0 for o in offsets):
                        raise ShardError(f"{f}: the offsets of {name} ({offsets}) do not fit its shape {shape}")
                    found.setdefault(name, []).append((f, offsets, shape, sl.get_dtype()))
        except ShardError:
            raise
        except Exception as e:   # safetensors' own errors for a malformed header, or bad JSON
            raise ShardError(f"{f} is not a valid shard file ({e})") from None
    return found


def _whole_shape(name: str, pieces) -> Tuple[int, ...]:
    dims = len(pieces[0][2])
    shape = tuple(max(off[d] + shp[d] for _, off, shp, _ in pieces) for d in range(dims))
    covered = sum(int(torch.Size(shp).numel()) for _, _, shp, _ in pieces)
    if covered != int(torch.Size(shape).numel()) or len({p[3] for p in pieces}) != 1:
        raise ShardError(f"the pieces of {name} do not tile one tensor of shape {shape} "
                         f"({covered} of {int(torch.Size(shape).numel())} elements, dtypes {sorted({p[3] for p in pieces})})")
    return shape


def whole_shapes(files: List[Path], prefix: str = "") -> Dict[str, Tuple[int, ...]]:
    """{name without `prefix`: whole shape} of the tensors named `prefix...`, from headers only."""
    return {name[len(prefix):]: _whole_shape(name, p) for name, p in _pieces(files).items() if name.startswith(prefix)}


def assemble(files: List[Path], prefix: str = "") -> Dict[str, torch.Tensor]:
    """{name without `prefix`: whole tensor on the CPU} of the tensors named `prefix...`."""
    from safetensors import safe_open
    pieces = {n: p for n, p in _pieces(files).items() if n.startswith(prefix)}
    out: Dict[str, torch.Tensor] = {}
    by_file: Dict[Path, List[Tuple[str, List[int], Tuple[int, ...]]]] = {}
    for name, p in pieces.items():
        shape = _whole_shape(name, p)
        if p[0][3] not in _DTYPES:
            raise ShardError(f"{p[0][0]}: {name} has the unsupported dtype {p[0][3]}")
        out[name[len(prefix):]] = torch.empty(shape, dtype=_DTYPES[p[0][3]])
        for f, off, shp, _ in p:
            by_file.setdefault(f, []).append((name, off, shp))
    for f, items in by_file.items():
        with safe_open(str(f), framework="pt") as sf:
            for name, off, shp in items:
                target = out[name[len(prefix):]]
                index = tuple(slice(o, o + s) for o, s in zip(off, shp))
                target[index] = sf.get_tensor(name)
    return out
