"""Safetensors files read through one open handle, every header field checked before a byte of data.

The format: an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}), then the data,
each tensor's bytes at [begin, end) of it, row-major. `read_header` checks that N fits the file, that
every dtype is known, every shape a list of non-negative integers whose size matches its byte range,
every range inside the data, and no two ranges overlap; `read_tensor` and `read_rows` then read
exactly those bytes through the same handle (see `moeut.files`), into fresh memory: nothing a file
says can make a read go elsewhere, or hand out memory that no file byte filled.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from moeut.files import FileProblem, parse_json, read_fd

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20  # the limit the safetensors library itself sets


@dataclass(frozen=True)
class Entry:
    dtype: torch.dtype
    shape: Tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


@dataclass
class Header:
    entries: Dict[str, Entry]
    metadata: Dict[str, str]


def read_header(fd: int, what: str) -> Header:
    """The checked header of the safetensors file open as `fd` (FileProblem naming `what`)."""
    size = os.fstat(fd).st_size
    if size < 8:
        raise FileProblem(f"{what} is not a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", bytes(read_fd(fd, 8, 0, what)))
    if n > min(MAX_HEADER_BYTES, size - 8):
        raise FileProblem(f"{what} is not a valid safetensors file (its header claims {n:,} bytes of {size:,})")
    header = parse_json(bytes(read_fd(fd, n, 8, what)), f"{what} (header)", MAX_HEADER_BYTES, max_depth=4)
    if not isinstance(header, dict):
        raise FileProblem(f"{what}: its safetensors header is not a JSON object")
    data_start, data_size = 8 + n, size - 8 - n
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FileProblem(f"{what}: its __metadata__ is not a map of strings")
    entries: Dict[str, Entry] = {}
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise FileProblem(f"{what}: tensor {name!r} needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if dtype not in DTYPES:
            raise FileProblem(f"{what}: tensor {name!r} has the unsupported dtype {dtype!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > 8
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
        ):
            raise FileProblem(f"{what}: tensor {name!r} has the shape {shape!r}, not a list of sizes")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise FileProblem(f"{what}: tensor {name!r} has the data_offsets {offsets!r}")
        begin, end = offsets
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise FileProblem(
                f"{what}: tensor {name!r} ({dtype} {shape}) has the data range [{begin}, {end}) "
                f"in {data_size} bytes of data; it needs {nbytes} bytes inside them"
            )
        entries[name] = Entry(DTYPES[dtype], tuple(shape), data_start + begin, data_start + end)
    spans = sorted((e.begin, e.end, n) for n, e in entries.items() if e.end > e.begin)
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise FileProblem(f"{what}: the data of tensors {a!r} and {b!r} overlap")
    return Header(entries, metadata)


def _tensor(buf: bytearray, entry: Entry, shape) -> torch.Tensor:
    if not buf:
        return torch.empty(shape, dtype=entry.dtype)
    return torch.frombuffer(buf, dtype=entry.dtype).view(shape)


def read_tensor(fd: int, entry: Entry, what: str) -> torch.Tensor:
    """The whole tensor of `entry`, in fresh CPU memory."""
    return _tensor(read_fd(fd, entry.end - entry.begin, entry.begin, what), entry, entry.shape)


def read_rows(fd: int, entry: Entry, start: int, stop: int, what: str) -> torch.Tensor:
    """Rows [start, stop) of the tensor of `entry` (its first dimension), in fresh CPU memory."""
    if not entry.shape or not 0 <= start <= stop <= entry.shape[0]:
        raise FileProblem(f"{what}: rows [{start}, {stop}) of a tensor of shape {entry.shape}")
    row = math.prod(entry.shape[1:]) * entry.dtype.itemsize
    buf = read_fd(fd, (stop - start) * row, entry.begin + start * row, what)
    return _tensor(buf, entry, (stop - start, *entry.shape[1:]))
