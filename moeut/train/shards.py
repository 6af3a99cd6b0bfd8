"""The files of a sharded checkpoint: each process's pieces of each tensor in one safetensors file.

A sharded checkpoint keeps its tensors in `shards/shard-NNNNN-model-00001-of-00001.safetensors`, one
file per writing process (NNNNN from 00001). This is the layout that PyTorch Distributed Checkpoint
writes through `HuggingFaceStorageWriter(save_distributed=True)`: every file holds, under a tensor's
full name, the process's piece of it, and the file's safetensors metadata maps each name to the
piece's offsets in the whole tensor (`{"DCP_SHARDING_INFO": json {name: {"saved_offsets": [...]}}}`).

`ShardSet` opens the files once each (no links followed) and checks, from the headers alone and
before any tensor byte is read, that the pieces of every tensor tile it exactly: one dtype, slabs of
whole rows (FSDP2 shards along the first dimension), no overlap, no gap. Then it hands out whole
tensors (one process, evaluation, conversion) or any range of rows (an FSDP process reading its own
part), always read from the files into fresh memory.

Only tensors go into these files. Safetensors headers are JSON, so reading them runs no code.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from moeut.files import FileProblem, hash_fd, open_file
from moeut.train.checkpoint_format import MAX_SHARDS, SHARD_DIR, SHARD_NAME
from moeut.train.tensor_file import Entry, read_header, read_rows, read_tensor

SHARDING_INFO_KEY = "DCP_SHARDING_INFO"  # the key DCP's safetensors writer and reader use


class ShardError(ValueError):
    """Shard files that do not fit together; the message names the file or tensor."""


def shard_file_name(index: int) -> str:
    """The name of the `index`-th shard file (from 1), as DCP names it."""
    return f"shard-{index:05d}-model-00001-of-00001.safetensors"


def write_shard(path: Path, pieces: Dict[str, Tuple[torch.Tensor, List[int]]]) -> None:
    """One shard file: {name: (piece, its offsets in the whole tensor)}."""
    from safetensors.torch import save_file

    tensors = {k: t.detach().to("cpu").contiguous() for k, (t, _) in pieces.items()}
    info = {k: {"saved_offsets": [int(o) for o in offsets]} for k, (_, offsets) in pieces.items()}
    save_file(tensors, str(path), metadata={SHARDING_INFO_KEY: json.dumps(info), "format": "pt"})


def split_dim0(state: Dict[str, torch.Tensor], n: int) -> List[Dict[str, Tuple[torch.Tensor, List[int]]]]:
    """`state` cut into `n` shards along the first dimension (FSDP2's `Shard(0)` pieces, `torch.chunk`
    sizes); a 0-dimensional tensor goes whole into the first shard, an empty piece nowhere."""
    if not 1 <= n <= MAX_SHARDS:
        raise ShardError(f"the number of shards must be from 1 to {MAX_SHARDS}, got {n}")
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


def dim0_chunk(rows: int, world: int, rank: int) -> Tuple[int, int]:
    """Rows [start, stop) of `rank`'s piece when `rows` are cut into `world` pieces as `torch.chunk`
    cuts them (FSDP2's `Shard(0)`): pieces of ceil(rows / world), the last ones shorter or empty."""
    size = -(-rows // world) if rows else 0
    start = min(rank * size, rows)
    return start, min(start + size, rows)


class Piece:
    __slots__ = ("file", "entry", "start")

    def __init__(self, file: str, entry: Entry, start: int):
        self.file, self.entry, self.start = file, entry, start


class ShardSet:
    """The shard files `names` of the directory open as `dir_fd`, each opened once; the pieces of every
    tensor checked to tile it (see the module docstring). Close it (or use `with`)."""

    def __init__(self, names: List[str], dir_fd: int, what: str):
        if not names or len(names) > MAX_SHARDS:
            raise ShardError(f"{what}: {len(names)} shard files (a sharded checkpoint has 1 to {MAX_SHARDS})")
        self.what = what
        self.fds: Dict[str, int] = {}
        try:
            pieces: Dict[str, List[Piece]] = {}
            for name in names:
                if not SHARD_NAME.match(name):
                    raise ShardError(f"{what}/{name} is not named like a shard file")
                label = f"{what}/{name}"
                fd = self.fds[name] = open_file(name, dir_fd, what=label)
                header = read_header(fd, label)
                info = _sharding_info(header.metadata, label)
                for tensor, entry in header.entries.items():
                    offsets = info.get(tensor, {}).get("saved_offsets", [0] * len(entry.shape))
                    if (
                        not isinstance(offsets, list)
                        or len(offsets) != len(entry.shape)
                        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
                    ):
                        raise ShardError(
                            f"{label}: the offsets of {tensor} ({offsets}) do not fit its shape {entry.shape}"
                        )
                    if any(offsets[1:]):
                        raise ShardError(f"{label}: the piece of {tensor} at {offsets} is not a slab of whole rows")
                    pieces.setdefault(tensor, []).append(Piece(name, entry, offsets[0] if offsets else 0))
            self.pieces = pieces
            self.shapes = {t: _tiled_shape(t, p) for t, p in pieces.items()}
        except (FileProblem, OSError) as e:
            self.close()
            raise ShardError(str(e)) from None
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def sha256(self, name: str) -> str:
        return hash_fd(self.fds[name])

    def dtype(self, tensor: str) -> torch.dtype:
        return self.pieces[tensor][0].entry.dtype

    def names(self, prefix: str = "") -> List[str]:
        return [t for t in self.pieces if t.startswith(prefix)]

    def rows(self, tensor: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the whole tensor (all of a 0-d one), read from the pieces that hold them."""
        shape = self.shapes[tensor]
        if not shape:
            p = self.pieces[tensor][0]
            return read_tensor(self.fds[p.file], p.entry, f"{self.what}/{p.file}")
        out = torch.empty((stop - start, *shape[1:]), dtype=self.dtype(tensor))
        filled = 0
        for p in sorted(self.pieces[tensor], key=lambda p: p.start):
            lo, hi = max(start, p.start), min(stop, p.start + p.entry.shape[0])
            if lo < hi:
                out[lo - start : hi - start] = read_rows(
                    self.fds[p.file], p.entry, lo - p.start, hi - p.start, f"{self.what}/{p.file}"
                )
                filled += hi - lo
        if filled != stop - start:  # the tiling check makes this impossible; never hand out unfilled memory
            raise ShardError(f"{self.what}: rows [{start}, {stop}) of {tensor} are not all in the shard files")
        return out

    def whole(self, prefix: str = "") -> Dict[str, torch.Tensor]:
        """{name without `prefix`: whole tensor on the CPU} of the tensors named `prefix...`."""
        return {
            t[len(prefix) :]: self.rows(t, 0, self.shapes[t][0] if self.shapes[t] else 0) for t in self.names(prefix)
        }

    def whole_shapes(self, prefix: str = "") -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
        """{name without `prefix`: (whole shape, dtype)} of the tensors named `prefix...`, from headers."""
        return {t[len(prefix) :]: (self.shapes[t], self.dtype(t)) for t in self.names(prefix)}


def _sharding_info(metadata: Dict[str, str], what: str) -> dict:
    raw = metadata.get(SHARDING_INFO_KEY)
    if raw is None:
        return {}
    try:
        info = json.loads(raw) if len(raw) < 64 << 20 else None
    except (json.JSONDecodeError, ValueError, RecursionError):
        info = None
    if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
        raise ShardError(f"{what}: its {SHARDING_INFO_KEY} metadata is not a map of tensor offsets")
    return info


def _tiled_shape(tensor: str, pieces: List[Piece]) -> Tuple[int, ...]:
    """The whole shape the row slabs `pieces` make up; ShardError unless they tile it exactly."""
    first = pieces[0].entry
    if any(
        p.entry.dtype != first.dtype or len(p.entry.shape) != len(first.shape) or p.entry.shape[1:] != first.shape[1:]
        for p in pieces
    ):
        kinds = sorted({(str(p.entry.dtype), p.entry.shape[1:]) for p in pieces})
        raise ShardError(f"the pieces of {tensor} disagree in dtype or row shape: {kinds[:4]}")
    if not first.shape:
        if len(pieces) != 1:
            raise ShardError(f"the 0-dimensional tensor {tensor} has {len(pieces)} pieces")
        return ()
    spans = sorted((p.start, p.start + p.entry.shape[0], p.file) for p in pieces if p.entry.shape[0])
    at = 0
    for start, stop, file in spans:
        if start != at:
            raise ShardError(
                f"the pieces of {tensor} do not tile one tensor: "
                + (
                    f"rows [{at}, {start}) are in no shard file"
                    if start > at
                    else f"rows [{start}, {min(stop, at)}) of {file} overlap another piece"
                )
            )
        at = stop
    rows = at  # (a piece of no rows, as a process with nothing of a tensor may write, adds nothing)
    if math.prod((rows, *first.shape[1:])) > 1 << 40:
        raise ShardError(f"the pieces of {tensor} claim a tensor of {rows} rows")
    return (rows, *first.shape[1:])


def open_shard_set(checkpoint_dir_fd: int, names: List[str], what: str) -> ShardSet:
    """`ShardSet` of `names` in the `shards/` directory of the checkpoint open as `checkpoint_dir_fd`."""
    from moeut.files import open_dir

    try:
        fd = open_dir(SHARD_DIR, checkpoint_dir_fd)
    except (FileProblem, OSError) as e:
        raise ShardError(f"{what}/{SHARD_DIR}: {e}") from None
    try:
        return ShardSet(names, fd, f"{what}/{SHARD_DIR}")
    finally:
        os.close(fd)


def open_directory(directory: Path) -> ShardSet:
    """A `ShardSet` of every shard file in `directory` (tools and tests; a checkpoint is read through
    `checkpoint_reader`, which also checks each file against its manifest)."""
    from moeut.files import open_dir

    fd = open_dir(directory)
    try:
        return ShardSet(sorted(n for n in os.listdir(fd) if SHARD_NAME.match(n)), fd, str(directory))
    finally:
        os.close(fd)


def listed_files(checkpoint_dir_fd: int) -> Optional[List[str]]:
    """The entries of the checkpoint's `shards/` directory (None when it has none)."""
    try:
        fd = os.open(SHARD_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=checkpoint_dir_fd)
    except OSError:
        return None
    try:
        return sorted(os.listdir(fd))
    finally:
        os.close(fd)
