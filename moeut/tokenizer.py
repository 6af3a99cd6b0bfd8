"""SentencePiece BPE tokenizer as in the paper (8000 pieces, digits split), made lossless for code:
no normalisation, no dummy prefix, whitespace kept, newline a piece of its own, byte fallback for
anything unseen, so `decode(encode(text)) == text` for any text.
"""
from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Iterable, List, Sequence

import sentencepiece as spm

NEWLINE = "\n"


class Tokenizer:
    """Thin wrapper over a SentencePiece model. `eot_id` separates documents (SentencePiece's eos)."""

    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.path}")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self.sp.get_piece_size()
        self.eot_id = self.sp.eos_id()

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) != self.eot_id])

    def model_bytes(self) -> bytes:
        return self.path.read_bytes()


def train_tokenizer(documents: Iterable[str], out_path: str | Path, vocab_size: int = 8000,
                    max_lines: int = 300_000, seed: int = 0) -> Tokenizer:
    """Train a BPE model on (a random sample of up to `max_lines` lines of) the documents."""
    lines = [line for doc in documents for line in doc.split(NEWLINE) if line.strip()]
    if not lines:
        raise ValueError("cannot train a tokenizer: the training data has no text")
    random.Random(seed).shuffle(lines)
    lines = lines[:max_lines]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        split_digits=True, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
        split_by_whitespace=True, user_defined_symbols=[NEWLINE], character_coverage=0.9999,
        max_sentence_length=1 << 16, bos_id=-1, eos_id=1, unk_id=0, pad_id=-1,
        train_extremely_large_corpus=False, num_threads=2, minloglevel=2,
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(out_path)
    return Tokenizer(out_path)
