"""A run directory and who may write it.

    <run>/run.json          model name, constructor arguments, training config (plain JSON)
    <run>/tokenizer.model   SentencePiece model (or tokenizer.json and tokenizer_config.json: a Hugging
                            Face tokenizer, `hf_tokenizer`)
    <run>/data.json         content key of the tokenized data in the cache
    <run>/metrics.jsonl     one JSON record per logged step or evaluation
    <run>/checkpoints/      step_NNNNNNNN/ directories (see `checkpoint`)
    <run>/tensorboard/
    <run>/.lock             held (flock) by the one trainer writing the run

One writer per run: a trainer takes an exclusive `flock` on `.lock` before it writes anything and
keeps it to the end; the kernel releases it when the process dies, so a crash never leaves a stale
lock. A lock counts only while `.lock` is still the file that was locked (a start that fails removes
the `.lock` it created, and a process that locked the removed file tries again). A process deletes
only files it created itself. A run directory may come from someone else: nothing in it is followed as a path, and the
entries above must be plain files and directories, not symbolic links that would send our writes
elsewhere.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from moeut.files import FileProblem, parse_json, read_bytes, read_json, write_file_atomic
from moeut.train.checkpoint_format import MAX_RUN_JSON_BYTES, CheckpointError

RUN_ENTRIES = (
    "run.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "data.json",
    "metrics.jsonl",
    "checkpoints",
    "tensorboard",
    ".lock",
)
LOCK_FILE = ".lock"


class RunInUse(CheckpointError):
    """Another live process holds the run's lock."""


class RunLock:
    """Exclusive lock of a run directory, held until `release` or process exit. `created`: whether this
    process created the `.lock` file (then only it may remove it, `remove_and_release`)."""

    def __init__(self, run_dir: Path, record: bool = True):
        self.run_dir = Path(run_dir)
        path = self.run_dir / LOCK_FILE
        if path.is_symlink():
            raise CheckpointError(f"{path} is a symbolic link; refusing to use this run directory")
        for _ in range(10):
            self.created = True
            try:
                self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                self.created = False
                try:
                    self.fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue  # removed between the two opens: try again
                except OSError as e:
                    if e.errno == errno.ELOOP:
                        raise CheckpointError(
                            f"{path} is a symbolic link; refusing to use this run directory"
                        ) from None
                    raise
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "unknown"
                os.close(self.fd)
                self.fd = None
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunInUse(
                        f"run directory {self.run_dir} is in use by another trainer ({holder}); "
                        "wait for it to finish or stop it first"
                    ) from None
                raise
            if os.fstat(self.fd).st_nlink > 1:  # shared with another run (a `cp -al` copy): make our own
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                os.close(self.fd)
                self.fd = None
                path.unlink(missing_ok=True)
                continue
            if self._still_the_lock_file(path):
                break
            os.close(self.fd)  # we locked a file a failed start had removed: lock the current one
            self.fd = None
        else:
            raise CheckpointError(f"{path} keeps being replaced; another process is interfering with this run")
        if record:
            self.record_holder()

    def record_holder(self) -> None:
        """Write this process's id into the held lock file (others name it when they find the run busy)."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"PID {os.getpid()}\n".encode(), 0)

    def _still_the_lock_file(self, path: Path) -> bool:
        try:
            now = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        held = os.fstat(self.fd)
        return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def remove_and_release(self) -> None:
        """Remove `.lock` if this process created it (while still holding it), then release it."""
        if self.fd is not None and self.created and self._still_the_lock_file(self.run_dir / LOCK_FILE):
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
        self.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _probe_writable(directory: Path, what: str) -> None:
    """Create and delete a file: the only test that also holds for root and read-only mounts."""
    probe = directory / f".moeut-write-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CheckpointError(f"{what} {directory} is not writable ({e.strerror})") from None


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists():
        p = p.parent
    return p


def is_fresh(run_dir: Path) -> bool:
    """Absent, empty, or holding only what an interrupted start of ours leaves before run.json."""
    if not run_dir.exists():
        return True
    return all(p.name == LOCK_FILE or ".tmp" in p.name for p in run_dir.iterdir())


def check_new_run_dir(run_dir: Path) -> None:
    """`--out` of a new run: a directory that is absent or empty (or an interrupted start's), in a
    writable place. Refuses a file, a run (that is --resume's), and a directory of other files."""
    run_dir = Path(run_dir)
    if run_dir.is_symlink() and not run_dir.exists():
        raise CheckpointError(f"--out {run_dir} is a broken symbolic link")
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"--out {run_dir} is a file, not a directory")
    if (run_dir / "run.json").exists():
        raise CheckpointError(
            f"--out {run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out"
        )
    if not is_fresh(run_dir):
        raise CheckpointError(
            f"--out {run_dir} is a directory with other files in it (not a moeut run); "
            "refusing to write into it: choose a new or empty directory"
        )
    _probe_writable(_nearest_existing(run_dir), "--out: the directory")


def check_existing_run_dir(run_dir: Path, writable: bool) -> None:
    """A run directory to read (generate, eval) or continue (--resume): run.json present, our
    entries neither symbolic links nor of the wrong kind; writable when it will be written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a directory")
    for name in RUN_ENTRIES:
        p = run_dir / name
        if p.is_symlink():
            raise CheckpointError(
                f"{p} is a symbolic link; a run directory's own files must be real files, "
                "so that nothing is read or written outside it"
            )
    for name in (
        "run.json",
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "data.json",
        "metrics.jsonl",
        LOCK_FILE,
    ):
        p = run_dir / name
        if p.exists() and not p.is_file():
            raise CheckpointError(f"{p} is not a regular file")
    if not (run_dir / "run.json").is_file():
        raise CheckpointError(f"{run_dir} is not a moeut run directory (no run.json)")
    if writable:
        _probe_writable(run_dir, "run directory")


def read_run_json(run_dir: Path) -> dict:
    """run.json, read once without following a link, within bounds; its top-level fields checked (the
    model's arguments by `models.model_kwargs`, the config by `config.validate_config`)."""
    path = Path(run_dir) / "run.json"
    try:
        meta = read_json(path, MAX_RUN_JSON_BYTES)
    except FileProblem as e:
        raise CheckpointError(str(e)) from None
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("model"), str)
        or not isinstance(meta.get("model_kwargs"), dict)
        or not isinstance(meta.get("config", {}), dict)
    ):
        raise CheckpointError(f"{path} lacks its model name, model_kwargs or config")
    vocab = meta.get("vocab_size")
    if vocab is not None and (isinstance(vocab, bool) or not isinstance(vocab, int) or not 2 <= vocab <= 65535):
        raise CheckpointError(f"{path}: vocab_size must be an integer from 2 to 65535, got {vocab!r}")
    return meta


def read_json_record(path: Path, max_bytes: int = 1 << 20):
    """A small JSON file of a run (data.json), read within bounds; CheckpointError naming it."""
    try:
        return read_json(path, max_bytes)
    except FileProblem as e:
        raise CheckpointError(str(e)) from None


MAX_METRICS_LINE = 1 << 20


def metric_records(run_dir: Path):
    """The records of a run's metrics.jsonl, in order, each a JSON object with an integer step (a line
    that is not, or is longer than MAX_METRICS_LINE, is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        data = read_bytes(path, 1 << 36)
    except FileNotFoundError:
        return []
    except FileProblem as e:
        raise CheckpointError(str(e)) from None
    out = []
    for line in data.split(b"\n"):
        if not line.strip() or len(line) > MAX_METRICS_LINE:
            continue
        try:
            rec = parse_json(line, "metrics.jsonl", MAX_METRICS_LINE, max_depth=4)
        except FileProblem:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and not isinstance(rec["step"], bool):
            out.append(rec)
    return out


def truncate_metrics(run_dir: Path, step: int) -> int:
    """Keep the records of steps <= `step` (a resumed run logs the later ones again) and drop a line
    cut short by a crash; returns how many records were dropped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists() and not path.is_symlink():
        return 0
    try:
        data = read_bytes(path, 1 << 36)
    except FileProblem as e:
        raise CheckpointError(str(e)) from None
    kept, dropped = [], 0
    for line in data.split(b"\n"):
        ok = False
        if line.strip() and len(line) <= MAX_METRICS_LINE:
            try:
                rec = parse_json(line, "metrics.jsonl", MAX_METRICS_LINE, max_depth=4)
                ok = isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step
            except FileProblem:
                ok = False
        if ok:
            kept.append(line)
        elif line.strip():
            dropped += 1
    if dropped:
        write_file_atomic(path, b"".join(l + b"\n" for l in kept))
    return dropped
