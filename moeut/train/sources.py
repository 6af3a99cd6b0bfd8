"""A training corpus's files, read one document at a time whatever their format.

Formats (`data_format`): text files (`TEXT_SUFFIXES`, also compressed as .gz or .zst: `notes.md.gz`),
JSONL (.jsonl, .jsonl.gz, .jsonl.zst; one JSON object a line, the text under `text_field`), Parquet and
Arrow files (the `text_field` column), and Hugging Face `save_to_disk` directories (`hf_arrow_files`).
A text file named by itself is cut into documents of about CHUNK_CHARS at paragraph breaks
(`split_text`), read in blocks of TEXT_BLOCK_BYTES; inside a directory a text file is one document.
One document (a JSONL line, a table cell) may hold at most MAX_DOCUMENT_BYTES: a line longer than that
is refused after that many bytes, never held whole.

Bytes that are not UTF-8 (`Decoding`): "replace" (the default) reads the file with U+FFFD in their
place and counts them for the start summary; "strict" refuses the file by name; "skip" leaves the file
out with a warning. A NUL byte makes a file binary, never text.
"""

from __future__ import annotations

import codecs
import io
import json
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional

TEXT_SUFFIXES = {
    ".txt",
    ".md",
    ".rst",
    ".py",
    ".pyi",
    ".c",
    ".h",
    ".cc",
    ".cpp",
    ".hpp",
    ".java",
    ".js",
    ".ts",
    ".go",
    ".rs",
    ".sh",
    ".toml",
    ".cfg",
    ".ini",
    ".yaml",
    ".yml",
    ".html",
    ".css",
    ".tex",
    ".json",
}
COMPRESSED = (".gz", ".zst")
DATA_FORMATS = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".arrow")
DECODE_ERRORS = ("replace", "strict", "skip")
CHUNK_CHARS = 8192  # a text file named by itself is cut at paragraph breaks into documents of about this size
TEXT_BLOCK_BYTES = 4 << 20  # ... and read in blocks of this size
MAX_DOCUMENT_BYTES = 64 << 20  # one JSONL line or table cell: a book is a few MB; more is refused, unread


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_paths() -> List[Path]:
    """The .py files of the running Python's standard library (site-packages excluded)."""
    root = stdlib_root()
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.parts) and p.is_file())


class NotText(ValueError):
    """A data file that is not UTF-8 text (binary, or another encoding where that is refused)."""


@dataclass
class Decoding:
    """How bytes that are not UTF-8 are met (see the module docstring), and what was met."""

    errors: str = "replace"
    replaced: int = 0  # characters replaced by U+FFFD
    files_with_replacements: List[str] = field(default_factory=list)

    def __post_init__(self):
        if self.errors not in DECODE_ERRORS:
            raise ValueError(f"--decode-errors must be one of {', '.join(DECODE_ERRORS)}, got {self.errors!r}")

    def decoder(self, path: Path) -> "_CountingDecoder":
        return _CountingDecoder(self, path)

    def text(self, path: Path, raw: bytes, where: str = "") -> str:
        """`raw` decoded, whole."""
        return self.decoder(path).decode(raw, final=True, offset=0, where=where)


class _CountingDecoder:
    """An incremental UTF-8 decoder that applies a `Decoding`'s rule and counts its replacements."""

    def __init__(self, decoding: Decoding, path: Path):
        self.decoding, self.path = decoding, path
        self.strict = codecs.getincrementaldecoder("utf-8")()
        self.lenient = codecs.getincrementaldecoder("utf-8")("replace")

    def decode(self, raw: bytes, final: bool, offset: int, where: str = "") -> str:
        nul = raw.find(b"\0")
        if nul >= 0:
            raise NotText(f"{self.path}{where} is a binary file (a NUL byte at {offset + nul}), not text")
        state = self.strict.getstate()
        try:
            text = self.strict.decode(raw, final=final)
            self.lenient.setstate(self.strict.getstate())
            return text
        except UnicodeDecodeError as e:
            if self.decoding.errors != "replace":
                raise NotText(
                    f"{self.path}{where} is not valid UTF-8 text (byte {offset + e.start}: "
                    f"{raw[e.start : e.start + 1]!r})"
                ) from None
        self.lenient.setstate(state)
        text = self.lenient.decode(raw, final=final)
        self.strict.setstate(self.lenient.getstate())
        before = codecs.decode(raw, "utf-8", "ignore").count("\ufffd")  # U+FFFD the file itself holds
        added = max(text.count("\ufffd") - before, 1)
        self.decoding.replaced += added
        name = str(self.path)
        if not self.decoding.files_with_replacements or self.decoding.files_with_replacements[-1] != name:
            self.decoding.files_with_replacements.append(name)
        return text


def data_format(path: Path) -> Optional[str]:
    """The format a file's name says: one of DATA_FORMATS, "text", "text.gz", "text.zst" (TEXT_SUFFIXES,
    maybe compressed), or None (unknown)."""
    name = path.name.lower()
    for fmt in DATA_FORMATS:
        if name.endswith(fmt):
            return fmt
    for c in COMPRESSED:
        if name.endswith(c) and Path(name[: -len(c)]).suffix in TEXT_SUFFIXES:
            return "text" + c
    return "text" if path.suffix.lower() in TEXT_SUFFIXES else None


def is_hf_dataset_dir(path: Path) -> bool:
    """A directory written by `datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`)."""
    return path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_info.json", "dataset_dict.json"))


VALIDATION_SPLITS = ("validation", "valid", "dev")


def hf_splits(root: Path) -> List[str]:
    """The splits of a DatasetDict directory (empty for a single Dataset)."""
    record = root / "dataset_dict.json"
    if not record.is_file():
        return []
    from moeut.files import read_json

    splits = read_json(record, 1 << 20).get("splits", [])
    return [s for s in splits if isinstance(s, str) and "/" not in s and not s.startswith(".")]


def hf_arrow_files(root: Path, split: Optional[str] = None) -> List[Path]:
    """The Arrow files of a save_to_disk directory, in the dataset's order (its state.json); of a
    DatasetDict, those of `split` (default: "train", or every split that is not validation)."""
    splits = hf_splits(root)
    if splits:
        if split is not None:
            chosen = [split]
        elif "train" in splits:
            chosen = ["train"]
        else:
            chosen = [s for s in splits if s not in VALIDATION_SPLITS]
        return [f for s in chosen for f in hf_arrow_files(root / s)]
    state = root / "state.json"
    if state.is_file():
        from moeut.files import read_json

        entries = read_json(state, 1 << 24).get("_data_files", [])
        files = [
            root / d["filename"]
            for d in entries
            if isinstance(d, dict) and isinstance(d.get("filename"), str) and "/" not in d["filename"]
        ]
        if files:
            return files
    return sorted(root.glob("*.arrow"))


def _optional(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(
            f"reading {what} needs the {module.split('.')[0]} package: pip install 'moeut[data]'"
        ) from None


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


def _open_binary(path: Path, compression: str):
    """A binary stream of the file's content, decompressed (".gz", ".zst") or as it is ("")."""
    if compression == ".gz":
        import gzip

        return gzip.open(path, "rb")
    if compression == ".zst":
        zstd = _optional("zstandard", ".zst files")
        raw = open(path, "rb")
        return io.BufferedReader(zstd.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


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
            raise ValueError(
                f"{path}:{i}: a line longer than {MAX_DOCUMENT_BYTES >> 20} MiB (one document); "
                "split it, or check that the file is what you meant"
            )
        yield line


def _read_jsonl(path: Path, fmt: str, text_field: str, decoding: Decoding) -> Iterator[str]:
    with _open_binary(path, fmt[len(".jsonl") :]) as f:
        for i, raw in enumerate(_bounded_lines(f, path), 1):
            line = decoding.text(path, raw, where=f":{i}")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError, ValueError) as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({getattr(e, 'msg', e)})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise ValueError(f"{path}:{i}: each JSONL line needs a string field {text_field!r} (--text-field)")
            yield obj[text_field]


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


def _text_blocks(path: Path, compression: str, decoding: Decoding) -> Iterator[str]:
    """A text file's content in pieces ending at a paragraph break, each from one or a few blocks of
    TEXT_BLOCK_BYTES (up to four without a break, then cut where it is)."""
    decoder = decoding.decoder(path)
    carry, offset = "", 0
    with _open_binary(path, compression) as f:
        while True:
            raw = f.read(TEXT_BLOCK_BYTES)
            last = len(raw) < TEXT_BLOCK_BYTES
            text = carry + decoder.decode(raw, final=last, offset=offset)
            offset += len(raw)
            if last:
                break
            cut = text.rfind("\n\n")
            if cut < 0 and len(text) < 4 * TEXT_BLOCK_BYTES:
                carry = text  # no paragraph break yet: read on
                continue
            cut = cut if cut >= 0 else len(text)
            yield text[:cut]
            carry = text[cut + 2 :]
    if text:
        yield text


def read_source(
    path: Path, text_field: str = "text", given: bool = False, decoding: Optional[Decoding] = None
) -> Iterator[str]:
    """The documents of one file, one at a time. `given`: named by itself on the command line (a text
    file is then cut into documents; an unknown format is refused rather than skipped)."""
    decoding = decoding or Decoding()
    fmt = data_format(path)
    if fmt in (".jsonl", ".jsonl.gz", ".jsonl.zst"):
        yield from _read_jsonl(path, fmt, text_field, decoding)
    elif fmt == ".parquet":
        yield from _column_values(_parquet_batches(path, text_field), path, text_field)
    elif fmt == ".arrow":
        yield from _column_values(_arrow_batches(path), path, text_field)
    elif fmt is None and path.suffix:
        raise NotText(
            f"{path}: unknown data format {path.suffix!r} (text files, also .gz or .zst, "
            f".jsonl[.gz|.zst], .parquet, .arrow and Hugging Face dataset directories are read)"
        )
    else:
        compression = fmt[len("text") :] if fmt else ""
        if given:
            for block in _text_blocks(path, compression, decoding):
                yield from split_text(block)
        else:  # one document: the whole file (bounded like a JSONL line)
            with _open_binary(path, compression) as f:
                raw = f.read(MAX_DOCUMENT_BYTES + 1)
            if len(raw) > MAX_DOCUMENT_BYTES:
                raise ValueError(
                    f"{path}: more than {MAX_DOCUMENT_BYTES >> 20} MiB of text in one file of a "
                    "directory; name it by itself to have it cut into documents"
                )
            yield decoding.text(path, raw)
