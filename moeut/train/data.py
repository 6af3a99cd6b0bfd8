"""Training data: find documents, hold out a validation split, tokenize once into memory-mapped arrays
cached by content, and serve batches that depend only on (seed, step), so resuming is exact.

Corpora larger than memory: a `Corpus` is read anew on every pass, one document at a time (JSONL line
by line, Parquet and Arrow a record batch at a time, a long text file in 4 MiB blocks). Preparing a run
takes up to three passes: a scan (the split, the document counts and the content digest that names the
cache), the tokenizer's training sample (when one is trained: see `tokenizer`), and tokenization, which
holds at most `TOKENIZE_BATCH_CHARS` of text (or one longer document) and its ids at a time (as Python
lists, about 40 bytes a token: ~60 MB at the default) and appends the ids to the cache files. What
grows with the corpus is the list of its files and 20 bytes per piece of the split (`Corpus`).

Sources (`--data`, repeatable; `sources.py`): text files (also .gz / .zst), directories, JSONL (also
.gz / .zst), Parquet, Arrow and Hugging Face `save_to_disk` directories. Default: the Python standard
library source of the running interpreter, a real code corpus on every machine.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from moeut.train.sources import (
    VALIDATION_SPLITS,
    Decoding,
    NotText,
    data_format,
    default_corpus_paths,  # noqa: F401
    hf_arrow_files,
    hf_splits,
    is_hf_dataset_dir,
    read_source,
    stdlib_root,
)

VALID_FRACTION = 0.02
PIECE_CHARS = 16384  # the validation split's unit: longer documents are held out in pieces of about this size


def _piece_spans(text: str) -> List[Tuple[int, int]]:
    """[start, end) spans of `text` of at most PIECE_CHARS each (cut after a paragraph break, else after
    a line break, else anywhere), which together are exactly the text."""
    spans, start, n = [], 0, len(text)
    while n - start > PIECE_CHARS:
        window = text[start : start + PIECE_CHARS]
        cut = window.rfind("\n\n")
        cut = cut + 2 if cut > 0 else (window.rfind("\n") + 1 if window.rfind("\n") > 0 else PIECE_CHARS)
        spans.append((start, start + cut))
        start += cut
    spans.append((start, n))
    return spans


def _piece_key(name: str, k: int) -> int:
    """A piece's place in the validation order: a 60-bit hash of its document's name and its index."""
    return int(hashlib.sha1(f"{name}@{k}".encode()).hexdigest()[:15], 16)


@dataclass
class CorpusScan:
    """What one pass over a corpus learns: the validation split (every piece whose key is at most
    `threshold`; -1: none, the validation data are their own sources), the sizes of both sides, how
    the text was decoded, and a digest of everything that decides the tokenized data."""

    n_train: int  # training documents (a document with a piece held out counts per part)
    n_valid: int  # validation documents (held-out pieces, or the --valid-data documents)
    train_chars: int
    valid_chars: int
    threshold: int
    digest: bytes
    replaced: int = 0  # characters that were not UTF-8, replaced by U+FFFD
    replaced_files: int = 0
    skipped_files: int = 0

    def cache_key(self, tokenizer_bytes: bytes) -> str:
        """Names the tokenized data in the cache: the texts, the split and the tokenizer."""
        h = hashlib.sha256(CACHE_FORMAT.encode() + hashlib.sha256(tokenizer_bytes).digest())
        h.update(self.digest + self.threshold.to_bytes(8, "little", signed=True))
        return h.hexdigest()[:24]

    def describe(self) -> str:
        """A line for the start summary: the split and what decoding met."""
        total = self.train_chars + self.valid_chars
        share = 100 * self.valid_chars / max(total, 1)
        how = "held out from the training data in pieces" if self.threshold >= 0 else "from --valid-data"
        line = (
            f"validation: {self.n_valid:,} documents, {share:.1f}% of the characters, {how}; "
            f"training: {self.n_train:,} documents"
        )
        if self.replaced:
            line += (
                f"; {self.replaced:,} characters that were not UTF-8 replaced in {self.replaced_files} "
                f"file(s) (--decode-errors strict refuses them)"
            )
        if self.skipped_files:
            line += f"; {self.skipped_files} file(s) skipped"
        return line


CACHE_FORMAT = "moeut-tokens-3"  # 3: the validation split held out by characters, in pieces (2: by document name)


def _files_of(sources: Sequence[str], what: str, split: Optional[str] = None) -> List[Tuple[Path, str, bool]]:
    """(path, name, given) of every data file of `sources`: a name is the path relative to the directory
    given (a file given by itself: its name), so the split does not depend on where the data lives."""
    files: List[Tuple[Path, str, bool]] = []
    for s in sources:
        p = Path(s)
        if is_hf_dataset_dir(p):
            files += [(q, f"{p.name}/{q.relative_to(p).as_posix()}", True) for q in hf_arrow_files(p, split)]
        elif p.is_dir():
            files += [
                (q, q.relative_to(p).as_posix(), False)
                for q in sorted(q for q in p.rglob("*") if q.is_file() and data_format(q) is not None)
            ]
        elif p.is_file():
            files.append((p, p.name, True))
        else:
            raise FileNotFoundError(f"{what} {s}: no such file or directory")
    return files


class Corpus:
    """The documents of `--data` (and `--valid-data`), read anew, one at a time, on every pass.

    The validation split: with `valid_sources`, those documents, and all of `--data` trains; else the
    validation documents of a Hugging Face DatasetDict's own validation split when `--data` is one; else
    `valid_fraction` of the training text, by characters (tokens are counted once tokenized; the start
    summary gives both). For the last, every document is cut into pieces of at most PIECE_CHARS, each
    piece keyed by a hash of its document's name and its index, and the pieces of smallest key are held
    out until they hold the fraction: a corpus of a few large files loses only the fraction, and the
    split depends on the names and texts alone, not on where the data live. The rest of a document with
    a piece held out trains as separate documents.

    Sources: see `sources.py`; `decode_errors` says what bytes that are not UTF-8 do. Missing sources are
    refused here, before any reading."""

    def __init__(
        self,
        sources: Optional[Sequence[str]],
        strict: bool = False,
        text_field: str = "text",
        valid_sources: Optional[Sequence[str]] = None,
        valid_fraction: float = VALID_FRACTION,
        decode_errors: str = "replace",
    ):
        self.sources, self.text_field = sources, text_field
        self.decoding = Decoding("strict" if strict else decode_errors)
        if not 0 <= valid_fraction < 1:
            raise ValueError(f"--valid-fraction must be from 0 to below 1, got {valid_fraction!r}")
        self.valid_fraction = valid_fraction
        if not sources:
            self.files = [(p, p.relative_to(stdlib_root()).as_posix(), False) for p in default_corpus_paths()]
        else:
            self.files = _files_of(sources, "--data")
        self.valid_files = _files_of(valid_sources, "--valid-data") if valid_sources else []
        if not valid_sources:  # a DatasetDict's own validation split
            for s in sources or []:
                p = Path(s)
                if is_hf_dataset_dir(p) and (named := [v for v in VALIDATION_SPLITS if v in hf_splits(p)]):
                    self.valid_files += _files_of([s], "--data", named[0])
        if self.valid_files == [] and valid_fraction == 0:
            raise ValueError("--valid-fraction 0 needs --valid-data (or a dataset with a validation split)")
        self.skipped = 0

    def _documents(self, files, warn: Optional[Callable[[str], None]]) -> Iterator[Tuple[str, str]]:
        for p, name, given in files:
            j = 0
            try:
                for j, text in enumerate(read_source(p, self.text_field, given, self.decoding)):
                    if text.strip():
                        yield f"{name}#{j}", text
            except NotText as e:
                if self.decoding.errors == "strict" or (given and self.decoding.errors == "replace"):
                    raise ValueError(
                        f"{e}" + (" (--decode-errors strict)" if self.decoding.errors == "strict" else "")
                    ) from None
                if warn is not None:
                    warn(f"warning: skipping {e}" + (f" (after its first {j} documents)" if j else ""))
                self.skipped += 1

    def documents(self, warn: Optional[Callable[[str], None]] = None) -> Iterator[Tuple[str, str]]:
        """(name, text) of every non-empty training-source document, in a stable order."""
        return self._documents(self.files, warn)

    def _no_text(self) -> ValueError:
        where = list(self.sources) if self.sources else "the default corpus"
        return ValueError(f"no text found in {where}" + (f" ({self.skipped} files skipped)" if self.skipped else ""))

    def scan(self, warn: Callable[[str], None] = print) -> CorpusScan:
        """One pass: every piece's key and size, then the split's threshold and a digest."""
        from array import array

        self.decoding.replaced, self.decoding.files_with_replacements, self.skipped = 0, [], 0  # this pass's
        keys, sizes, per_doc, digest = array("Q"), array("Q"), array("I"), hashlib.sha256()
        for name, text in self.documents(warn):
            spans = _piece_spans(text)
            per_doc.append(len(spans))
            for k, (a, b) in enumerate(spans):
                keys.append(_piece_key(name, k))
                sizes.append(b - a)
            digest.update(hashlib.sha256(name.encode() + b"\0" + text.encode("utf-8", "replace")).digest())
        if not keys:
            raise self._no_text()
        total = sum(sizes)
        valid_docs, valid_chars = 0, 0
        if self.valid_files:
            threshold = -1
            for name, text in self._documents(self.valid_files, warn):
                valid_docs += 1
                valid_chars += len(text)
                digest.update(
                    b"valid" + hashlib.sha256(name.encode() + b"\0" + text.encode("utf-8", "replace")).digest()
                )
            if not valid_docs:
                raise ValueError("the validation data hold no text")
        else:
            if len(keys) < 2:
                raise ValueError(
                    "the corpus is too small: need at least two pieces of text (one for validation); "
                    "add data or give --valid-data"
                )
            order = np.frombuffer(keys, dtype=np.uint64).argsort(kind="stable")
            want, threshold = self.valid_fraction * total, -1
            for i in order[:-1].tolist():  # at least one piece held out, never all of them
                threshold = keys[i]
                valid_chars += sizes[i]
                valid_docs += 1
                if valid_chars >= want:
                    break
        n_train = _training_parts(keys, per_doc, threshold)
        return CorpusScan(
            n_train,
            valid_docs,
            total - (0 if self.valid_files else valid_chars),
            valid_chars,
            threshold,
            digest.digest(),
            self.decoding.replaced,
            len(self.decoding.files_with_replacements),
            self.skipped,
        )

    def split(self, scan: CorpusScan) -> Iterator[Tuple[bool, str]]:
        """(held out for validation?, text) of every document after the split, in reading order: the
        training sources' documents (a held-out piece as its own validation document, the runs of
        pieces around it as training documents), then the --valid-data documents."""
        for name, text in self.documents():
            run_start = None
            spans = _piece_spans(text)
            for k, (a, b) in enumerate(spans):
                if _piece_key(name, k) <= scan.threshold:
                    if run_start is not None:
                        yield False, text[run_start:a]
                        run_start = None
                    yield True, text[a:b]
                elif run_start is None:
                    run_start = a
            if run_start is not None:
                yield False, text[run_start:]
        for _, text in self._documents(self.valid_files, None):
            yield True, text

    def train_texts(self, scan: CorpusScan) -> Iterator[str]:
        return (text for valid, text in self.split(scan) if not valid)


def _training_parts(keys, per_doc, threshold: int) -> int:
    """Training documents after the split: each run of a document's pieces that are not held out is one."""
    parts, at = 0, 0
    for n in per_doc:
        held = [keys[at + k] <= threshold for k in range(n)]
        parts += sum(1 for k, h in enumerate(held) if not h and (k == 0 or held[k - 1]))
        at += n
    return parts


def collect_documents(
    sources: Optional[Sequence[str]],
    strict: bool = False,
    warn: Callable[[str], None] = print,
    text_field: str = "text",
) -> List[Tuple[str, str]]:
    """Every (name, text) of `Corpus(sources)` in a list (small corpora: analysis, tests)."""
    corpus = Corpus(sources, strict, text_field)
    docs = list(corpus.documents(warn))
    if not docs:
        raise corpus._no_text()
    return docs


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


TOKENIZE_BATCH_CHARS = 4 << 20  # text tokenized at once (the memory bound of tokenization, with its ids)
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
            raise ValueError(
                f"the training data has {len(self.tokens)} tokens, fewer than one context of {self.context}"
            )

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
        rows = [
            np.asarray(self.tokens[i * self.context : i * self.context + self.context + 1], dtype=np.int64) for i in ids
        ]
        x = torch.from_numpy(np.stack(rows))
        return x.view(micro_batches, per_rank // micro_batches, self.context + 1)
