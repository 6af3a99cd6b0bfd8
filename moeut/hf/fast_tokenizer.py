"""A SentencePiece run's tokenizer as a `tokenizers` fast tokenizer (tokenizer.json), kept only when exact.

How the conversion works: transformers' `SpmConverter.build_tokenizer_from_spm_proto` rebuilds the
SentencePiece BPE model from its protobuf: the vocabulary, merges ranked by piece score, byte fallback,
user-defined pieces kept whole, and the normalizer spec (the precompiled NFKC map, collapsed spaces and
the dummy prefix of the paper's tokenizer; nothing for the code tokenizer). Two things can still
differ from SentencePiece itself:

- merges: SentencePiece merges by score in its own loop; a score-ranked merge list usually, not
  provably, splits every word the same way;
- the unknown piece: SentencePiece decodes it as its surface (" ⁇ "), `tokenizers` as its name
  ("<unk>"). A decoder step that maps the one to the other fixes this;
- byte pieces (<0xE6>) whose run is not valid UTF-8, which no text encodes to but a sampled sequence
  can hold: SentencePiece writes one U+FFFD per invalid sequence and keeps the valid bytes around it,
  `tokenizers`' byte-fallback decoder one U+FFFD per byte piece of the run. This is the known,
  accepted difference of every SentencePiece-derived tokenizer.json (Llama's included); the model card
  states it.

So nothing else is trusted: `exact_fast_tokenizer` converts, then encodes and decodes a varied corpus
with both (scripts, whitespace runs, control characters, the special pieces' names, every piece's
surface alone and in seeded random concatenations, and any texts the caller adds), decodes seeded
random id sequences (normal pieces mixed with byte-piece runs of valid UTF-8), and returns the fast
tokenizer only when every id and every decoded string is the same. Control ids (end-of-text) never
come out of encoding; decoding them follows transformers' convention (their name unless
`skip_special_tokens`), which is not SentencePiece's empty string.
"""

from __future__ import annotations

import random
from typing import Iterable, Optional, Tuple

VARIED_TEXTS = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n\n",
    "\t",
    "\r\n",
    " leading",
    "trailing ",
    "two  spaces",
    "   three\tand tab",
    "def f(x):\n    return x ** 2  # squares\n",
    "if (a<b && c>=d) { return a->b; }\r\n",
    "naïve café façade Ærøskøbing",
    "Straße ǅ ß ﬁ ﬀ ①②③ ＡＢＣ ｶﾀｶﾅ",
    "東京 中文 한국어 日本語のテキスト",
    "Привет, мир! Ελληνικά עברית العربية हिन्दी",
    "🙂👍🏽 🇩🇪 👨‍👩‍👧 ∑x² ≤ ∞ → ∂",
    "numbers 12345 3.14159 -0.5e10 1,000,000",
    "\x00\x07\x1b[0m control \u200b zero width \u00a0 nbsp \ufeff",
    "<unk> </s> <s> <pad> <STORY_SEP> <|endoftext|>",
    "ALL CAPS. MiXeD cAsE. lower.",
    "a" * 300,
    "ab" * 150,
    " ".join(str(i) for i in range(60)),
    "URL https://example.org/a_b?c=d&e=f#g, e-mail a.b@c.de",
    "“Quotes” ‘single’ «guillemets» — dash … ellipsis",
]


def _proto(model_bytes: bytes):
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model_bytes)
    return proto


def convert(model_bytes: bytes):
    """The `tokenizers.Tokenizer` transformers builds from a SentencePiece model, with the unknown
    piece decoding as SentencePiece decodes it. Unchecked: see `exact_fast_tokenizer`."""
    from tokenizers import decoders
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = _proto(model_bytes)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    fast = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    if fast is None:
        raise ValueError("transformers cannot rebuild this SentencePiece model type")
    spec = proto.trainer_spec
    unknown = decoders.Replace(spec.unk_piece, spec.unk_surface)
    fast.decoder = decoders.Sequence([unknown, fast.decoder]) if fast.decoder is not None else unknown
    return fast


def probe_texts(model_bytes: bytes, extra: Iterable[str] = (), seed: int = 0, concatenations: int = 400) -> list:
    """The corpus the check runs on: VARIED_TEXTS, every normal piece's surface, seeded random
    concatenations of 2-12 surfaces (with and without spaces), and `extra`."""
    proto = _proto(model_bytes)
    surfaces = [p.piece.replace("\u2581", " ") for p in proto.pieces if p.type in (1, 4)]  # normal, user-defined
    rng = random.Random(seed)
    joined = [
        ("" if rng.random() < 0.5 else " ").join(rng.choices(surfaces, k=rng.randint(2, 12)))
        for _ in range(concatenations)
    ]
    return [*VARIED_TEXTS, *surfaces, *joined, *extra]


def probe_ids(model_bytes: bytes, seed: int = 0, sequences: int = 400) -> list:
    """Seeded random id sequences of normal and user-defined pieces, with runs of byte pieces that
    spell whole UTF-8 characters (every byte piece appears)."""
    proto = _proto(model_bytes)
    words = [i for i, p in enumerate(proto.pieces) if p.type in (1, 4)]
    byte_of = {int(p.piece[3:5], 16): i for i, p in enumerate(proto.pieces) if p.type == 6}  # <0xNN>
    if not words:
        return []
    rng = random.Random(seed)
    chars = [
        chr(c)
        for c in (
            *range(0x20, 0x7F),
            *range(0xA0, 0x800, 7),
            *range(0x3040, 0x30FF, 5),
            *range(0x4E00, 0x4F00, 9),
            *range(0x1F600, 0x1F650, 3),
        )
    ]
    out = [[byte_of[b]] for b in range(0x80) if b in byte_of]  # lone bytes: only ASCII is valid UTF-8
    for _ in range(sequences):
        seq = []
        for _ in range(rng.randint(1, 10)):
            if byte_of and rng.random() < 0.3:
                raw = "".join(rng.choices(chars, k=rng.randint(1, 3))).encode()
                if all(b in byte_of for b in raw):
                    seq += [byte_of[b] for b in raw]
            else:
                seq.append(rng.choice(words))
        out.append(seq)
    return out


def first_difference(
    model_bytes: bytes, fast, texts: Iterable[str], id_sequences: Iterable[list] = ()
) -> Optional[str]:
    """None when `fast` encodes and decodes every text, and decodes every id sequence, as
    SentencePiece does; else the first difference, described."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model_bytes)
    for text in texts:
        ids = sp.encode(text)
        got = fast.encode(text, add_special_tokens=False).ids
        if got != ids:
            return f"encoding {text[:40]!r}: SentencePiece {ids[:12]}, fast {got[:12]}"
        if fast.decode(ids, skip_special_tokens=False) != sp.decode(ids):
            return f"decoding the ids of {text[:40]!r}: {sp.decode(ids)[:40]!r} against {fast.decode(ids)[:40]!r}"
    for ids in id_sequences:
        if fast.decode(ids, skip_special_tokens=False) != sp.decode(ids):
            return f"decoding ids {ids[:12]}: {sp.decode(ids)[:40]!r} against {fast.decode(ids)[:40]!r}"
    return None


def exact_fast_tokenizer(model_bytes: bytes, extra: Iterable[str] = ()) -> Tuple[Optional[object], str]:
    """(the fast tokenizer, "") when the conversion is exact on `probe_texts`, else (None, why not)."""
    try:
        fast = convert(model_bytes)
    except ImportError as e:
        return None, f"the conversion needs transformers, tokenizers and protobuf ({e})"
    except Exception as e:  # the converter's own refusal of a model it does not handle
        return None, f"transformers could not convert it ({type(e).__name__}: {e})"
    why = first_difference(model_bytes, fast, probe_texts(model_bytes, extra), probe_ids(model_bytes))
    return (None, why) if why else (fast, "")
