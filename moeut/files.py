"""A run's files, read and written so that nothing in a run directory can redirect, enlarge or tear them.

Reading: a file is opened once, without following a symbolic link (`O_NOFOLLOW`), optionally relative
to a directory handle that was itself opened without following links (`open_dir`), and checked to be
a regular file of bounded size before a byte is read; hashing and parsing then use that one handle or
the bytes read through it, so swapping the path for a link or another file between a check and the
use changes nothing (`read_bytes`, `read_json`, `hash_fd`).

JSON from a run is data from anyone: `parse_json` refuses text over a size limit, nesting deeper than a
limit (counted before the parser recurses), numbers with more than 100 digits, and NaN / Infinity.

Writing: `write_file_atomic` writes a temporary file created exclusively under an unpredictable name in
the target's directory, fsyncs it and renames it over the target (a link at the target is replaced,
never followed). `open_append` appends to a log through a handle opened without following links,
and first gives a file with several hard links (a `cp -al` copy of a run) a private copy, so that the
other names keep their bytes.

Nothing here imports the rest of moeut.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Optional

MAX_JSON_DEPTH = 64
MAX_NUMBER_DIGITS = 100
HASH_CHUNK = 1 << 24


class FileProblem(ValueError):
    """A file that cannot be used as it is; the message names the file and the fault."""


def _nofollow_flags(extra: int = 0) -> int:
    return os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | extra


def open_dir(path: str | os.PathLike, dir_fd: Optional[int] = None) -> int:
    """A handle on directory `path` (relative to `dir_fd` when given), refusing a symbolic link."""
    try:
        return os.open(path, _nofollow_flags(os.O_DIRECTORY), dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise FileProblem(f"{path} is not a directory (or is a symbolic link, which is not followed)") from None
        if e.errno == errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, "does not exist", str(path)) from None
        raise


def open_file(
    path: str | os.PathLike, dir_fd: Optional[int] = None, max_bytes: Optional[int] = None, what: Optional[str] = None
) -> int:
    """A read handle on regular file `path` (relative to `dir_fd`), refusing a link, anything that is
    not a regular file, and (with `max_bytes`) a file larger than that."""
    name = what or str(path)
    try:
        fd = os.open(path, _nofollow_flags(os.O_NONBLOCK), dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FileProblem(f"{name} is a symbolic link; links are not followed") from None
        if e.errno == errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, "does not exist", name) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileProblem(f"{name} is not a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise FileProblem(f"{name} has {st.st_size:,} bytes, more than the {max_bytes:,} such a file may have")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_fd(fd: int, size: int, offset: int = 0, what: str = "file") -> bytearray:
    """Exactly `size` bytes at `offset` of `fd` (a file that ends early is named as truncated)."""
    buf = bytearray(size)
    view = memoryview(buf)
    done = 0
    while done < size:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise FileProblem(f"{what} ends after {offset + done} bytes (truncated)")
        done += n
    return buf


def read_bytes(
    path: str | os.PathLike, max_bytes: int, dir_fd: Optional[int] = None, what: Optional[str] = None
) -> bytes:
    """The whole of a regular file of at most `max_bytes`, read through one handle (see `open_file`)."""
    fd = open_file(path, dir_fd, max_bytes, what)
    try:
        return bytes(read_fd(fd, os.fstat(fd).st_size, 0, what or str(path)))
    finally:
        os.close(fd)


def hash_fd(fd: int) -> str:
    """SHA-256 of everything `fd` holds, read through it."""
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, HASH_CHUNK, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def json_depth_ok(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether no array or object in `text` nests deeper than `limit` (strings are skipped)."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _number(kind):
    def parse(text: str):
        if len(text) > MAX_NUMBER_DIGITS:
            raise ValueError(f"a number of {len(text)} characters")
        value = kind(text)
        if kind is float and value in (float("inf"), float("-inf")):
            raise ValueError(f"the number {text[:20]} is out of range")
        return value

    return parse


def _no_constant(text: str):
    raise ValueError(f"{text} is not a number JSON allows")


def parse_json(data: bytes | str, what: str, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON text as Python data, within bounds (see the module docstring); FileProblem naming `what`."""
    if len(data) > max_bytes:
        raise FileProblem(f"{what} has {len(data):,} bytes, more than the {max_bytes:,} it may have")
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError as e:
        raise FileProblem(f"{what} is not UTF-8 text (byte {e.start})") from None
    if not json_depth_ok(text, max_depth):
        raise FileProblem(f"{what} nests deeper than {max_depth} levels")
    try:
        return json.loads(text, parse_int=_number(int), parse_float=_number(float), parse_constant=_no_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as e:
        raise FileProblem(f"{what} is not valid JSON ({e})") from None


def read_json(path: str | os.PathLike, max_bytes: int, dir_fd: Optional[int] = None, what: Optional[str] = None) -> Any:
    """`parse_json` of a file read through `read_bytes`."""
    name = what or str(path)
    return parse_json(read_bytes(path, max_bytes, dir_fd, name), name, max_bytes)


def fsync_path(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """`path` holds all of `data` or its previous content: a temporary file created exclusively with an
    unpredictable name beside it, fsynced, given `mode` (less the umask), then renamed over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), mode & ~umask)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_file_atomic(Path(path), (json.dumps(obj, indent=2) + "\n").encode())


def is_temporary_name(name: str) -> bool:
    """Whether a name is one `write_file_atomic` (or an earlier writer) gives its temporary files."""
    return name.endswith(".tmp") or ".tmp-" in name


def open_append(path: str | os.PathLike, say=None):
    """A text file object appending to `path` (created if absent) through a handle that follows no
    link. A file with other hard links is first replaced by a private copy (`say` hears of it), so the
    other names keep their content."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    for attempt in range(2):
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise FileProblem(f"{path} is a symbolic link; it is not appended to") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise FileProblem(f"{path} is not a regular file")
        if st.st_nlink == 1 or attempt == 1:
            return os.fdopen(fd, "a", encoding="utf-8")
        os.close(fd)
        write_file_atomic(path, read_bytes(path, 1 << 40))
        if say is not None:
            say(f"{path} had {st.st_nlink} hard links (a copy of a run?): this run now writes its own copy")
    raise AssertionError("unreachable")
