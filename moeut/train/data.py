"""Training data: find documents, hold out a validation split, tokenize once into memory-mapped arrays
cached by content, and serve batches that depend only on (seed, step), so resuming is exact.

Sources (`--data`, repeatable): text files, directories, JSONL (also .gz / .zst), Parquet, Arrow and
Hugging Face `save_to_disk` directories (see `collect_documents`). Default: the Python standard library
source of the running interpreter, a real code corpus on every machine.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".js", ".ts",
                 ".go", ".rs", ".sh", ".toml", ".cfg", ".ini", ".yaml", ".yml", ".html", ".css", ".tex", ".json"}
VALID_FRACTION = 0.02


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_paths() -> List[Path]:
    """The .py files of the running Python's standard library (site-packages excluded)."""
    root = _stdlib_root()
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.parts) and p.is_file())


class NotText(ValueError):
    """A data file that is not UTF-8 text (binary, or another encoding)."""


def _decode_text(path: Path, raw: bytes) -> str:
    if b"\0" in raw:
        raise NotText(f"{path} is a binary file (it contains NUL bytes), not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NotText(f"{path} is not valid UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None


CHUNK_CHARS = 8192   # a text file given by itself is cut at paragraph breaks into documents of about this size
DATA_FORMATS = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".arrow")


def data_format(path: Path) -> Optional[str]:
    """The format a file's name says: one of DATA_FORMATS, "text" (TEXT_SUFFIXES), or None (unknown)."""
    name = path.name.lower()
    for fmt in DATA_FORMATS:
        if name.endswith(fmt):
            return fmt
    return "text" if path.suffix.lower() in TEXT_SUFFIXES else None


def is_hf_dataset_dir(path: Path) -> bool:
    """A directory written by `datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`)."""
    return path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_info.json", "dataset_dict.json"))


def _optional(module: str, what: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"reading {what} needs the {module.split('.')[0]} package: pip install 'moeut[data]'") from None


def _field_values(values: list, where: str, field: str) -> List[str]:
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
        raise ValueError(f"{where}: row {bad} has no string field {field!r} (--text-field names the column)")
    return values


def _arrow_table(path: Path):
    pa = _optional("pyarrow", "Arrow files")
    ipc = _optional("pyarrow.ipc", "Arrow files")
    try:
        with pa.memory_map(str(path)) as source:
            return ipc.open_stream(source).read_all()   # datasets writes the streaming format
    except pa.ArrowInvalid:
        with pa.memory_map(str(path)) as source:
            return ipc.open_file(source).read_all()


def _column(table, path: Path, field: str) -> List[str]:
    if field not in table.column_names:
        raise ValueError(f"{path}: no column {field!r}; it has {', '.join(table.column_names)} (--text-field)")
    return _field_values(table.column(field).to_pylist(), str(path), field)


def _jsonl_lines(path: Path, fmt: str) -> Iterator[bytes]:
    if fmt == ".jsonl.gz":
        import gzip
        with gzip.open(path, "rb") as f:
            yield from f
    elif fmt == ".jsonl.zst":
        zstd = _optional("zstandard", ".zst files")
        with open(path, "rb") as raw, zstd.ZstdDecompressor().stream_reader(raw) as f:
            import io
            yield from io.BufferedReader(f)
    else:
        with open(path, "rb") as f:
            yield from f


def _read_jsonl(path: Path, fmt: str, field: str) -> List[str]:
    docs = []
    for i, raw in enumerate(_jsonl_lines(path, fmt), 1):
        line = _decode_text(path, raw)
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise ValueError(f"{path}:{i}: each JSONL line needs a string field {field!r} (--text-field)")
        docs.append(obj[field])
    return docs


def split_text(text: str, chunk: int = CHUNK_CHARS) -> List[str]:
    """One long text as documents: paragraphs (blank-line separated) gathered up to `chunk` characters;
    a paragraph longer than that is cut at line breaks, and a line longer than that every `chunk`
    characters."""
    pieces = []
    for para in text.split("\n\n"):
        while len(para) > chunk:
            cut = para.rfind("\n", 0, chunk)
            cut = cut if cut > 0 else chunk
            pieces.append(para[:cut])
            para = para[cut:].lstrip("\n")
        pieces.append(para)
    docs, current = [], ""
    for para in pieces:
        if current and len(current) + 2 + len(para) > chunk:
            docs.append(current)
            current = para
        else:
            current = f"{current}\n\n{para}" if current else para
    if current:
        docs.append(current)
    return docs


def _read_source(path: Path, text_field: str = "text", given: bool = False) -> List[str]:
    """The documents of one file. `given`: named by itself on the command line (a plain text file is then
    cut into documents; an unknown format is refused rather than skipped)."""
    fmt = data_format(path)
    if fmt in (".jsonl", ".jsonl.gz", ".jsonl.zst"):
        return _read_jsonl(path, fmt, text_field)
    if fmt == ".parquet":
        pq = _optional("pyarrow.parquet", "Parquet files")
        return _column(pq.read_table(path), path, text_field)
    if fmt == ".arrow":
        return _column(_arrow_table(path), path, text_field)
    if fmt is None and path.suffix:
        raise NotText(f"{path}: unknown data format {path.suffix!r} (text files, .jsonl[.gz|.zst], .parquet, "
                      f".arrow and Hugging Face dataset directories are read)")
    text = _decode_text(path, path.read_bytes())
    return split_text(text) if given else [text]


def _hf_arrow_files(root: Path) -> List[Path]:
    """The Arrow files of a save_to_disk directory, in the dataset's order (its state.json), or of its
    "train" split (all splits without one) for a DatasetDict."""
    if (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
        chosen = ["train"] if "train" in splits else splits
        return [f for s in chosen for f in _hf_arrow_files(root / s)]
    state = root / "state.json"
    if state.is_file():
        files = [root / d["filename"] for d in json.loads(state.read_text()).get("_data_files", [])]
        if files:
            return files
    return sorted(root.glob("*.arrow"))


def collect_documents(sources: Optional[Sequence[str]], strict: bool = False,
                      warn: Callable[[str], None] = print, text_field: str = "text") -> List[Tuple[str, str]]:
    """[(name, text)] for every document of the given sources, in a stable order. A document's name is
    its path relative to the directory given (a file given by itself: its file name; the default
    corpus: relative to the standard library), with "#j" for the j-th document of a file. The names
    decide the validation split, so it does not change when the data moves to another path or machine.

    Sources: text files (given by itself, a text file is cut into documents at paragraph breaks, about
    8 KB each), directories (their text and data files), JSONL (optionally .gz or .zst), Parquet and
    Arrow files (the `text_field` column) and Hugging Face `save_to_disk` directories. A file that is
    not UTF-8 text is skipped with a warning naming it (`strict`: refused), never read with
    replacement characters."""
    named: List[Tuple[Path, str, bool]] = []
    if not sources:
        named = [(p, p.relative_to(_stdlib_root()).as_posix(), False) for p in default_corpus_paths()]
    else:
        for s in sources:
            p = Path(s)
            if is_hf_dataset_dir(p):
                named += [(q, f"{p.name}/{q.relative_to(p).as_posix()}", True) for q in _hf_arrow_files(p)]
            elif p.is_dir():
                named += [(q, q.relative_to(p).as_posix(), False) for q in
                          sorted(q for q in p.rglob("*") if q.is_file() and data_format(q) is not None)]
            elif p.is_file():
                named.append((p, p.name, True))
            else:
                raise FileNotFoundError(f"--data {s}: no such file or directory")
    docs, skipped = [], 0
    for p, name, given in named:
        try:
            texts = _read_source(p, text_field, given)
        except NotText as e:
            if strict or given:
                raise ValueError(f"{e}" + (" (--strict-data)" if strict and not given else "")) from None
            warn(f"warning: skipping {e}")
            skipped += 1
            continue
        for j, text in enumerate(texts):
            if text.strip():
                docs.append((f"{name}#{j}", text))
    if not docs:
        where = list(sources) if sources else "the default corpus"
        raise ValueError(f"no text found in {where}" + (f" ({skipped} files skipped as not UTF-8 text)" if skipped else ""))
    return docs


def split_documents(docs: List[Tuple[str, str]]) -> Tuple[List[str], List[str]]:
    """Deterministic train/validation split by a hash of each document's name (~2% validation)."""
    train, valid = [], []
    for name, text in docs:
        h = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (valid if h < VALID_FRACTION else train).append(text)
    if not valid:  # tiny corpora: hold out the last document
        valid.append(train.pop())
    if not train:
        raise ValueError("the corpus is too small: need at least two documents (one for validation)")
    return train, valid


def content_key(texts: Sequence[str], tokenizer_bytes: bytes) -> str:
    h = hashlib.sha256(tokenizer_bytes)
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8", errors="replace")).digest())
    return h.hexdigest()[:24]


def _remove_dead_writers_files(path: Path) -> None:
    """Temporary files `<name>.tmp-<pid>` beside `path` whose writer no longer runs (killed mid-write)."""
    if not path.parent.is_dir():
        return
    for p in path.parent.glob(f"{path.name}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tokenize_to_file(texts: Sequence[str], tokenizer, path: Path, progress: bool = True) -> np.ndarray:
    """Token ids of all texts, each followed by its separator (`Tokenizer.encode_documents`), as a
    uint16 memmap at `path` (cached)."""
    if path.exists():
        return np.memmap(path, dtype=np.uint16, mode="r")
    _remove_dead_writers_files(path)
    if tokenizer.vocab_size > 65535:
        raise ValueError("vocabularies above 65535 pieces are not supported by the uint16 token cache")
    from tqdm import tqdm
    chunks = []
    for i in tqdm(range(0, len(texts), 256), desc=f"tokenizing {path.name}", disable=not progress, unit="x256 docs"):
        for ids in tokenizer.encode_documents(texts[i:i + 256]):
            chunks.append(np.asarray(ids, dtype=np.uint16))
    arr = np.concatenate(chunks) if chunks else np.zeros(0, np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")   # caches are shared between runs
    try:
        arr.tofile(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return np.memmap(path, dtype=np.uint16, mode="r")


@dataclass
class Batches:
    """Non-overlapping windows of `context + 1` tokens, reshuffled every epoch by (seed, epoch).

    `batch(step, rank, world)` returns this rank's share of the global batch of optimizer step
    `step`, as [micro_batches, micro_batch_size, context + 1]; it depends on nothing else, so a run
    resumed at step s sees exactly the data the uninterrupted run saw.
    """
    tokens: np.ndarray
    context: int
    global_batch: int
    seed: int

    def __post_init__(self):
        self.n_windows = (len(self.tokens) - 1) // self.context
        if self.n_windows < 1:
            raise ValueError(f"the training data has {len(self.tokens)} tokens, fewer than one context of {self.context}")

    def _permutation(self, epoch: int) -> np.ndarray:
        if getattr(self, "_perm_epoch", None) != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    def _window_ids(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            epoch, pos = divmod(start + i, self.n_windows)
            out[i] = self._permutation(epoch)[pos]
        return out

    def batch(self, step: int, rank: int = 0, world: int = 1, micro_batches: int = 1) -> torch.Tensor:
        per_rank = self.global_batch // world
        ids = self._window_ids(step * self.global_batch + rank * per_rank, per_rank)
        rows = [np.asarray(self.tokens[i * self.context: i * self.context + self.context + 1], dtype=np.int64) for i in ids]
        x = torch.from_numpy(np.stack(rows))
        return x.view(micro_batches, per_rank // micro_batches, self.context + 1)


def eval_windows(tokens: np.ndarray, context: int, max_windows: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Non-overlapping `context + 1` windows of held-out text (the last partial one included)."""
    n = len(tokens)
    starts = list(range(0, max(n - 1, 0), context))
    if max_windows is not None:
        starts = starts[:max_windows]
    for s in starts:
        w = np.asarray(tokens[s: s + context + 1], dtype=np.int64)
        if len(w) >= 2:
            yield torch.from_numpy(w)
