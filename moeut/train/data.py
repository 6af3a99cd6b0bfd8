"""Training data: find documents, hold out a validation split, tokenize once into memory-mapped arrays
cached by content, and serve batches that depend only on (seed, step), so resuming is exact.

Corpora larger than memory: a `Corpus` is read anew on every pass, one document at a time (JSONL line
by line, Parquet and Arrow a record batch at a time, a long text file in 4 MiB blocks). Preparing a run
takes up to three passes: a scan (the split, the document counts and the content digest that names the
cache), the tokenizer's training sample (when one is trained: see `tokenizer`), and tokenization, which
holds at most `TOKENIZE_BATCH_CHARS` of text (or one longer document) and its ids at a time (as Python
lists, about 40 bytes a token: ~60 MB at the default) and appends the ids to the cache files. Nothing
grows with the corpus but the list of its files.

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
    long = next((i for i, v in enumerate(values) if len(v) > MAX_DOCUMENT_BYTES), None)
    if long is not None:
        raise ValueError(f"{where}: row {long} holds more than {MAX_DOCUMENT_BYTES >> 20} MiB of text (one document)")
    return values


def _arrow_batches(path: Path):
    """The record batches of an Arrow file (datasets writes the streaming format), memory-mapped."""
    pa = _optional("pyarrow", "Arrow files")
    ipc = _optional("pyarrow.ipc", "Arrow files")
    with pa.memory_map(str(path)) as source:
        try:
            reader = ipc.open_stream(source)
            yield from reader
        except pa.ArrowInvalid:
            reader = ipc.open_file(source)
            yield from (reader.get_batch(i) for i in range(reader.num_record_batches))


def _column_values(batches, path: Path, field: str) -> Iterator[str]:
    for batch in batches:
        names = batch.schema.names
        if field not in names:
            raise ValueError(f"{path}: no column {field!r}; it has {', '.join(names)} (--text-field)")
        yield from _field_values(batch.column(names.index(field)).to_pylist(), str(path), field)


def _parquet_batches(path: Path, field: str):
    pq = _optional("pyarrow.parquet", "Parquet files")
    f = pq.ParquetFile(path)
    names = f.schema_arrow.names
    if field not in names:
        raise ValueError(f"{path}: no column {field!r}; it has {', '.join(names)} (--text-field)")
    yield from f.iter_batches(batch_size=64, columns=[field])


MAX_DOCUMENT_BYTES = 64 << 20   # one JSONL line or table cell: a book is a few MB; more is refused, unread


def _bounded_lines(f, path: Path) -> Iterator[bytes]:
    """The lines of binary stream `f`, each read with a limit: a line (or a decompressed one) longer than
    MAX_DOCUMENT_BYTES is refused after that many bytes, never held whole."""
    i = 0
    while True:
        line = f.readline(MAX_DOCUMENT_BYTES + 1)
        if not line:
            return
        i += 1
        if len(line) > MAX_DOCUMENT_BYTES:
            raise ValueError(f"{path}:{i}: a line longer than {MAX_DOCUMENT_BYTES >> 20} MiB (one document); "
                             "split it, or check that the file is what you meant")
        yield line


def _jsonl_lines(path: Path, fmt: str) -> Iterator[bytes]:
    if fmt == ".jsonl.gz":
        import gzip
        with gzip.open(path, "rb") as f:
            yield from _bounded_lines(f, path)
    elif fmt == ".jsonl.zst":
        zstd = _optional("zstandard", ".zst files")
        with open(path, "rb") as raw, zstd.ZstdDecompressor().stream_reader(raw) as f:
            import io
            yield from _bounded_lines(io.BufferedReader(f), path)
    else:
        with open(path, "rb") as f:
            yield from _bounded_lines(f, path)


def _read_jsonl(path: Path, fmt: str, field: str) -> Iterator[str]:
    for i, raw in enumerate(_jsonl_lines(path, fmt), 1):
        line = _decode_text(path, raw)
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError, ValueError) as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise ValueError(f"{path}:{i}: each JSONL line needs a string field {field!r} (--text-field)")
        yield obj[field]


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


TEXT_BLOCK_BYTES = 4 << 20   # a text file given by itself is read and cut in blocks of this size


def _split_text_file(path: Path) -> Iterator[str]:
    """`split_text` over a text file of any size: blocks of TEXT_BLOCK_BYTES, each cut at its last
    paragraph break (the rest carried into the next block). A file within one block gives exactly
    `split_text` of its text."""
    import codecs
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, offset = "", 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(TEXT_BLOCK_BYTES)
            last = len(raw) < TEXT_BLOCK_BYTES
            if b"\0" in raw:
                raise NotText(f"{path} is a binary file (it contains NUL bytes), not text")
            try:
                text = carry + decoder.decode(raw, final=last)
            except UnicodeDecodeError as e:
                raise NotText(f"{path} is not valid UTF-8 text (byte {offset + e.start})") from None
            offset += len(raw)
            if last:
                break
            cut = text.rfind("\n\n")
            if cut < 0 and len(text) < 4 * TEXT_BLOCK_BYTES:
                carry = text   # no paragraph break yet: read on (up to four blocks)
                continue
            cut = cut if cut >= 0 else len(text)
            yield from split_text(text[:cut])
            carry = text[cut + 2:]
    if text:
        yield from split_text(text)


def _read_source(path: Path, text_field: str = "text", given: bool = False) -> Iterator[str]:
    """The documents of one file, one at a time. `given`: named by itself on the command line (a plain
    text file is then cut into documents; an unknown format is refused rather than skipped)."""
    fmt = data_format(path)
    if fmt in (".jsonl", ".jsonl.gz", ".jsonl.zst"):
        yield from _read_jsonl(path, fmt, text_field)
    elif fmt == ".parquet":
        yield from _column_values(_parquet_batches(path, text_field), path, text_field)
    elif fmt == ".arrow":
        yield from _column_values(_arrow_batches(path), path, text_field)
    elif fmt is None and path.suffix:
        raise NotText(f"{path}: unknown data format {path.suffix!r} (text files, .jsonl[.gz|.zst], .parquet, "
                      f".arrow and Hugging Face dataset directories are read)")
    elif given:
        yield from _split_text_file(path)
    else:
        yield _decode_text(path, path.read_bytes())


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


def _is_valid(name: str) -> bool:
    """The split: a hash of the document's name, ~VALID_FRACTION of documents held out."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < VALID_FRACTION


@dataclass
class CorpusScan:
    """What one pass over a corpus learns: document counts per split, the document held out because
    none hashed to validation (tiny corpora: the last one), and a digest of the texts per split."""
    n_train: int
    n_valid: int
    fallback: Optional[int]   # ordinal (in reading order) of the document moved to validation, if any
    train_digest: bytes
    valid_digest: bytes

    def cache_key(self, tokenizer_bytes: bytes) -> str:
        """Names the tokenized data in the cache: the texts of both splits and the tokenizer."""
        h = hashlib.sha256(CACHE_FORMAT.encode() + hashlib.sha256(tokenizer_bytes).digest())
        h.update(self.train_digest + self.valid_digest)
        return h.hexdigest()[:24]


CACHE_FORMAT = "moeut-tokens-2"   # (format 1 hashed the documents in one sequence and needed them all in memory)


class Corpus:
    """The documents of `--data`, read anew, one at a time, on every pass.

    A document's name is its path relative to the directory given (a file given by itself: its file
    name; the default corpus: relative to the standard library), with "#j" for the j-th document of a
    file. The names decide the validation split, so it does not change when the data moves to another
    path or machine.

    Sources: text files (given by itself, a text file is cut into documents at paragraph breaks, about
    8 KB each), directories (their text and data files), JSONL (optionally .gz or .zst), Parquet and
    Arrow files (the `text_field` column) and Hugging Face `save_to_disk` directories. A file that is
    not UTF-8 text is skipped with a warning naming it (`strict`: refused), never read with replacement
    characters. Missing sources are refused here, before any reading."""

    def __init__(self, sources: Optional[Sequence[str]], strict: bool = False, text_field: str = "text"):
        self.sources, self.strict, self.text_field = sources, strict, text_field
        self.files: List[Tuple[Path, str, bool]] = []
        if not sources:
            self.files = [(p, p.relative_to(_stdlib_root()).as_posix(), False) for p in default_corpus_paths()]
        for s in sources or []:
            p = Path(s)
            if is_hf_dataset_dir(p):
                self.files += [(q, f"{p.name}/{q.relative_to(p).as_posix()}", True) for q in _hf_arrow_files(p)]
            elif p.is_dir():
                self.files += [(q, q.relative_to(p).as_posix(), False) for q in
                               sorted(q for q in p.rglob("*") if q.is_file() and data_format(q) is not None)]
            elif p.is_file():
                self.files.append((p, p.name, True))
            else:
                raise FileNotFoundError(f"--data {s}: no such file or directory")

    def documents(self, warn: Optional[Callable[[str], None]] = None) -> Iterator[Tuple[str, str]]:
        """(name, text) of every non-empty document, in a stable order. `warn` hears of skipped files."""
        skipped = 0
        for p, name, given in self.files:
            j = 0
            try:
                for j, text in enumerate(_read_source(p, self.text_field, given)):
                    if text.strip():
                        yield f"{name}#{j}", text
            except NotText as e:
                if self.strict or given:
                    raise ValueError(f"{e}" + (" (--strict-data)" if self.strict and not given else "")) from None
                if warn is not None:
                    warn(f"warning: skipping {e}" + (f" (after its first {j} documents)" if j else ""))
                skipped += 1
        self.skipped = skipped

    def _no_text(self) -> ValueError:
        where = list(self.sources) if self.sources else "the default corpus"
        skipped = getattr(self, "skipped", 0)
        return ValueError(f"no text found in {where}" + (f" ({skipped} files skipped as not UTF-8 text)" if skipped else ""))

    def scan(self, warn: Callable[[str], None] = print) -> CorpusScan:
        """One pass: the split and a digest of each split's texts (in order)."""
        train_h, valid_h = hashlib.sha256(), hashlib.sha256()
        n_train = n_valid = 0
        pending = None   # the last training document's (ordinal, digest): held out if no document is
        i = -1
        for i, (name, text) in enumerate(self.documents(warn)):
            digest = hashlib.sha256(text.encode("utf-8", errors="replace")).digest()
            if _is_valid(name):
                valid_h.update(digest)
                n_valid += 1
                continue
            if pending is not None:
                train_h.update(pending[1])
            pending = (i, digest)
            n_train += 1
        if i < 0:
            raise self._no_text()
        fallback = None
        if n_valid == 0 and pending is not None:
            fallback, n_train, n_valid = pending[0], n_train - 1, 1
            valid_h.update(pending[1])
        elif pending is not None:
            train_h.update(pending[1])
        if n_train == 0:
            raise ValueError("the corpus is too small: need at least two documents (one for validation)")
        return CorpusScan(n_train, n_valid, fallback, train_h.digest(), valid_h.digest())

    def split(self, scan: CorpusScan) -> Iterator[Tuple[bool, str]]:
        """(held out for validation?, text) of every document, in reading order."""
        for i, (name, text) in enumerate(self.documents()):
            yield i == scan.fallback or _is_valid(name), text

    def train_texts(self, scan: CorpusScan) -> Iterator[str]:
        return (text for valid, text in self.split(scan) if not valid)


def collect_documents(sources: Optional[Sequence[str]], strict: bool = False,
                      warn: Callable[[str], None] = print, text_field: str = "text") -> List[Tuple[str, str]]:
    """Every (name, text) of `Corpus(sources)` in a list (small corpora: analysis, tests)."""
    corpus = Corpus(sources, strict, text_field)
    docs = list(corpus.documents(warn))
    if not docs:
        raise corpus._no_text()
    return docs


def split_documents(docs: List[Tuple[str, str]]) -> Tuple[List[str], List[str]]:
    """Deterministic train/validation split of listed documents, as `Corpus.scan` and `split` make it."""
    train, valid = [], []
    for name, text in docs:
        (valid if _is_valid(name) else train).append(text)
    if not valid:  # tiny corpora: hold out the last document
        valid.append(train.pop())
    if not train:
        raise ValueError("the corpus is too small: need at least two documents (one for validation)")
    return train, valid


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


TOKENIZE_BATCH_CHARS = 4 << 20   # text tokenized at once (the memory bound of tokenization, with its ids)
TOKEN_FILES = ("train.bin", "valid.bin")


def tokenize_corpus(corpus: Corpus, scan: CorpusScan, tokenizer, cache: Path, progress: bool = True) -> None:
    """The token ids of every document, each followed by its separator (`Tokenizer.encode_documents`),
    appended as uint16 to `cache`/train.bin and valid.bin (kept if both are there already: caches are
    shared between runs). Written under temporary names and renamed when complete."""
    paths = [cache / name for name in TOKEN_FILES]
    if all(p.is_file() for p in paths):
        return
    if tokenizer.vocab_size > 65535:
        raise ValueError("vocabularies above 65535 pieces are not supported by the uint16 token cache")
    cache.mkdir(parents=True, exist_ok=True)
    for p in paths:
        _remove_dead_writers_files(p)
    from tqdm import tqdm
    tmps = [p.with_name(f"{p.name}.tmp-{os.getpid()}") for p in paths]
    bar = tqdm(total=scan.n_train + scan.n_valid, desc=f"tokenizing {cache.name}", disable=not progress, unit="doc")
    try:
        with open(tmps[0], "wb") as train_f, open(tmps[1], "wb") as valid_f:
            batch: List[Tuple[bool, str]] = []
            chars = 0

            def flush():
                for (valid, _), ids in zip(batch, tokenizer.encode_documents([t for _, t in batch])):
                    np.asarray(ids, dtype=np.uint16).tofile(valid_f if valid else train_f)
                bar.update(len(batch))
                batch.clear()
            for valid, text in corpus.split(scan):
                batch.append((valid, text))
                chars += len(text)
                if chars >= TOKENIZE_BATCH_CHARS:
                    flush()
                    chars = 0
            flush()
        for tmp, p in zip(tmps, paths):
            tmp.replace(p)
    finally:
        bar.close()
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


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
