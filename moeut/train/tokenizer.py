"""SentencePiece BPE tokenizers, two kinds:

* "code" (the default): 8000 pieces with digits split, as in the paper, but lossless: no normalisation,
  no dummy prefix, whitespace kept, newline a piece of its own, byte fallback for anything unseen, so
  `decode(encode(text)) == text` for any text. Documents end with the end-of-text id.
* "paper": exactly what the training code trains (`SentencepieceVocabulary` in its
  framework/dataset/text/tokenizers/sentencepiece.py): BPE with split digits and every other option at
  SentencePiece's default (NFKC normalisation, runs of whitespace collapsed, a dummy-prefix space,
  sentences over 4192 bytes left out of training). Each document is followed by the literal text
  "<STORY_SEP>", tokenized with it (`ChunkedSentencepieceLMDataset.parse_with_sep`); it has no
  end-of-text id in the data.
A model loaded from a file is of the kind its behaviour shows: lossless means "code".
"""

from __future__ import annotations

import io
import random
import re
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import sentencepiece as spm

NEWLINE = "\n"
DOCUMENT_SEPARATOR_TEXT = "<STORY_SEP>"  # what the training code appends to every document
KINDS = ("code", "paper")
MAX_MODEL_BYTES = 64 << 20
_LOSSLESS_PROBE = " a  b\n\tc 12 \ufb01"


class Tokenizer:
    """Thin wrapper over a SentencePiece model. `eot_id` separates documents (SentencePiece's eos)."""

    def __init__(self, model_path: Optional[str | Path] = None, model_proto: Optional[bytes] = None):
        if (model_path is None) == (model_proto is None):
            raise ValueError("give exactly one of model_path and model_proto")
        if model_path is not None:
            from moeut.files import read_bytes

            path = Path(model_path)
            if not path.exists() and not path.is_symlink():
                raise FileNotFoundError(f"tokenizer model not found: {path}")
            model_proto = read_bytes(path, MAX_MODEL_BYTES, what=f"tokenizer {path}")  # once, no link followed
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # a parse error of the protobuf: data, never code
            raise ValueError(f"{model_path or 'tokenizer'} is not a SentencePiece model ({e})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.eot_id = self.sp.eos_id()
        self.lossless = self.sp.decode(self.sp.encode(_LOSSLESS_PROBE)) == _LOSSLESS_PROBE
        self.kind = "code" if self.lossless else "paper"

    def encode_documents(self, texts: Sequence[str]) -> List[List[int]]:
        """Each document's ids with its separator: the end-of-text id (code) or the tokens of
        "<STORY_SEP>" appended to its text before encoding (paper)."""
        if self.lossless:
            return [ids + [self.eot_id] for ids in self.encode_batch(texts)]
        return self.encode_batch([t + DOCUMENT_SEPARATOR_TEXT for t in texts])

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) != self.eot_id])

    def model_bytes(self) -> bytes:
        return self.proto


TOKENIZER_MAX_LINES = 300_000  # the code tokenizer learns from a random sample of this many lines
PAPER_TOKENIZER_MAX_CHARS = 1 << 30  # the paper tokenizer learns from the corpus's first GiB of text


def sample_lines(documents: Iterable[str], max_lines: int, seed: int) -> List[str]:
    """The non-blank lines of the documents, shuffled, at most `max_lines` of them: every line when
    there are that few, else a uniform sample (reservoir sampling: memory for `max_lines` lines only)."""
    rng = random.Random(seed)
    lines: List[str] = []
    seen = 0
    for doc in documents:
        for line in doc.split(NEWLINE):
            if not line.strip():
                continue
            seen += 1
            if len(lines) < max_lines:
                lines.append(line)
            else:
                j = rng.randrange(seen)
                if j < max_lines:
                    lines[j] = line
    random.Random(seed).shuffle(lines)
    return lines


def train_tokenizer(
    documents: Iterable[str], vocab_size: int = 8000, max_lines: int = TOKENIZER_MAX_LINES, seed: int = 0
) -> Tokenizer:
    """Train a BPE model, in memory, on (a random sample of up to `max_lines` lines of) the documents,
    which may be a stream. A vocabulary the corpus cannot fill, or too small for its characters, is a
    ValueError naming --vocab-size and the bound."""
    lines = sample_lines(documents, max_lines, seed)
    if not lines:
        raise ValueError("cannot train a tokenizer: the training data has no text")
    return _train(
        iter(lines),
        model_type="bpe",
        vocab_size=vocab_size,
        split_digits=True,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        user_defined_symbols=[NEWLINE],
        character_coverage=0.9999,
        max_sentence_length=1 << 16,
        bos_id=-1,
        eos_id=1,
        unk_id=0,
        pad_id=-1,
        train_extremely_large_corpus=False,
        num_threads=2,
    )


def train_paper_tokenizer(
    documents: Iterable[str], vocab_size: int = 8000, max_chars: int = PAPER_TOKENIZER_MAX_CHARS
) -> Tokenizer:
    """The training code's tokenizer: every document + "<STORY_SEP>" is one training sentence; BPE,
    split digits, the rest SentencePiece's defaults. Like the training code, which trains it on the
    first shards of the corpus (`ChunkedSentencepieceLMDataset.get_tokenizer_train_sentences`, 10 of
    C4's), it reads only the first documents, up to `max_chars` of text."""
    docs, chars = [], 0
    for d in documents:
        if chars >= max_chars:
            break
        if d:
            docs.append(d)
            chars += len(d)
    if not docs:
        raise ValueError("cannot train a tokenizer: the training data has no text")
    return _train(
        iter(d + DOCUMENT_SEPARATOR_TEXT for d in docs), vocab_size=vocab_size, split_digits=True, model_type="bpe"
    )


def _train(sentences: Iterable[str], **options) -> Tokenizer:
    """SentencePiece trained in memory; its errors about the vocabulary size name --vocab-size."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences, model_writer=model, minloglevel=2, **options)
    except RuntimeError as e:
        msg = str(e)
        if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg):
            raise ValueError(
                f"--vocab-size {m.group(1)} is too large for this corpus: SentencePiece can make at "
                f"most {m.group(2)} pieces from it"
            ) from None
        if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg):
            raise ValueError(
                f"--vocab-size {m.group(1)} is too small for this corpus: it needs at least "
                f"{m.group(2)} pieces (its characters and the special pieces)"
            ) from None
        raise ValueError(f"SentencePiece could not train a tokenizer: {msg[:300]}") from None
    return Tokenizer(model_proto=model.getvalue())


_MODEL_TYPES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}


def _protobuf_fields(data: bytes):
    """(field number, value) of one protobuf message: ints for varints, bytes for length-delimited
    fields (the wire format; fixed-width fields are skipped). ValueError on malformed data."""
    i, n = 0, len(data)

    def varint():
        nonlocal i
        shift = value = 0
        while True:
            if i >= n or shift > 63:
                raise ValueError("a malformed SentencePiece model")
            b = data[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value

    while i < n:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, varint()
        elif wire == 2:
            size = varint()
            if i + size > n:
                raise ValueError("a malformed SentencePiece model")
            yield field, data[i : i + size]
            i += size
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError("a malformed SentencePiece model")


def trainer_record(model_bytes: bytes) -> dict:
    """What a SentencePiece model file records of its training (its TrainerSpec, field numbers of
    sentencepiece_model.proto): model_prefix (2), model_type (3), vocab_size (4), split_digits (25)."""
    spec = next((v for f, v in _protobuf_fields(model_bytes) if f == 2 and isinstance(v, bytes)), b"")
    fields = dict(_protobuf_fields(spec))
    prefix = fields.get(2, b"")
    return {
        "model_prefix": prefix.decode("utf-8", errors="replace") if isinstance(prefix, bytes) else "",
        "model_type": _MODEL_TYPES.get(fields.get(3, 1), str(fields.get(3))),
        "vocab_size": fields.get(4, 8000),
        "split_digits": bool(fields.get(25, 0)),
    }


RUN_FILE = "tokenizer.model"  # a run's SentencePiece model; a Hugging Face tokenizer is kept as tokenizer.json


def load_tokenizer(path: str | Path):
    """--tokenizer PATH: a SentencePiece model file, or a Hugging Face tokenizer.json or a directory
    holding one (`hf_tokenizer`)."""
    from moeut.train.hf_tokenizer import HFTokenizer, is_hf_tokenizer

    return HFTokenizer(path) if is_hf_tokenizer(path) else Tokenizer(path)


def run_tokenizer(run_dir: str | Path):
    """The tokenizer a run (or an exported model directory) keeps: tokenizer.json (with its
    tokenizer_config.json) when it has one, else its SentencePiece tokenizer.model."""
    from moeut.train.hf_tokenizer import JSON_FILE, HFTokenizer

    run_dir = Path(run_dir)
    if (run_dir / JSON_FILE).exists() and not (run_dir / RUN_FILE).exists():
        return HFTokenizer(run_dir)
    return Tokenizer(run_dir / RUN_FILE)


def save_tokenizer(tok, target: str | Path) -> None:
    """Keep `tok` in a run directory `target` (see `run_tokenizer`), or, when `target` is not a directory,
    write a SentencePiece model to that file."""
    from moeut.files import write_file_atomic

    target = Path(target)
    if not target.is_dir():
        if getattr(tok, "kind", None) == "hf":
            raise ValueError(f"{target}: a Hugging Face tokenizer is saved into a directory")
        write_file_atomic(target, tok.model_bytes())
    elif getattr(tok, "kind", None) == "hf":
        tok.save(target)
    else:
        write_file_atomic(target / RUN_FILE, tok.model_bytes())
