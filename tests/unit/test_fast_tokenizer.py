"""The SentencePiece to tokenizer.json conversion the export writes only when exact: exact for both of
our tokenizer kinds on the probe corpus, and a conversion that differs is caught and described."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from moeut.hf.fast_tokenizer import convert, exact_fast_tokenizer, first_difference, probe_texts
from moeut.train.tokenizer import train_paper_tokenizer, train_tokenizer

DOCS = [
    f"Document {i}: the quick brown fox jumps over the lazy dog {i * 7}.\n  def f(x):\treturn x + {i}\n"
    f"naïve café {i % 3} ünïcødé"
    for i in range(300)
]


@pytest.fixture(scope="module", params=["code", "paper"])
def sentencepiece(request):
    tok = (
        train_tokenizer(DOCS, vocab_size=400)
        if request.param == "code"
        else train_paper_tokenizer(DOCS, vocab_size=180)
    )
    assert tok.kind == request.param
    return tok


def test_both_kinds_convert_exactly(sentencepiece):
    fast, why = exact_fast_tokenizer(sentencepiece.model_bytes(), extra=DOCS[:20])
    assert fast is not None, why
    texts = probe_texts(sentencepiece.model_bytes())
    assert len(texts) > 400 and "<unk> </s> <s> <pad> <STORY_SEP> <|endoftext|>" in texts
    for text in texts[:200]:
        ids = sentencepiece.encode(text)
        assert fast.encode(text, add_special_tokens=False).ids == ids
        assert fast.decode(ids) == sentencepiece.sp.decode(ids)


def test_unknown_pieces_decode_as_sentencepiece_does(sentencepiece):
    if sentencepiece.kind == "code":
        pytest.skip("byte fallback: the code tokenizer has no unknown pieces")
    fast = convert(sentencepiece.model_bytes())
    ids = sentencepiece.encode("東京 🙂")
    assert sentencepiece.sp.unk_id() in ids and fast.decode(ids) == sentencepiece.sp.decode(ids)
    assert "\u2047" in fast.decode(ids)


def test_a_conversion_that_differs_is_caught_and_named(sentencepiece):
    from tokenizers import decoders

    fast = convert(sentencepiece.model_bytes())
    assert first_difference(sentencepiece.model_bytes(), fast, DOCS[:5]) is None
    wrong_decoder = convert(sentencepiece.model_bytes())
    wrong_decoder.decoder = decoders.Sequence([decoders.Replace("o", "0"), wrong_decoder.decoder])
    why = first_difference(sentencepiece.model_bytes(), wrong_decoder, DOCS[:5])
    assert why and why.startswith("decoding the ids of 'Document 0")
    lowered = convert(sentencepiece.model_bytes())
    from tokenizers import normalizers

    lowered.normalizer = normalizers.Lowercase()
    why = first_difference(sentencepiece.model_bytes(), lowered, DOCS[:5])
    assert why and why.startswith("encoding 'Document 0") and "SentencePiece [" in why


def test_a_conversion_transformers_refuses_is_reported(sentencepiece, monkeypatch):
    import transformers.convert_slow_tokenizer as converter

    monkeypatch.setattr(converter.SpmConverter, "build_tokenizer_from_spm_proto", staticmethod(lambda *a, **k: None))
    fast, why = exact_fast_tokenizer(sentencepiece.model_bytes())
    assert fast is None and "cannot rebuild" in why


def test_random_ids_decode_alike_and_the_known_byte_difference_is_as_documented(sentencepiece):
    from moeut.hf.fast_tokenizer import probe_ids

    sp, fast = sentencepiece.sp, convert(sentencepiece.model_bytes())
    sequences = probe_ids(sentencepiece.model_bytes())
    assert first_difference(sentencepiece.model_bytes(), fast, [], sequences) is None
    if sentencepiece.kind == "code":
        assert any(sp.is_byte(i) for s in sequences for i in s)
        invalid = [sp.piece_to_id("<0x48>"), sp.piece_to_id("<0xE5>")]  # "H" then a lone lead byte
        assert sp.decode(invalid) == "H\ufffd" and fast.decode(invalid) == "\ufffd\ufffd"
        why = first_difference(sentencepiece.model_bytes(), fast, [], [invalid])
        assert why and why.startswith("decoding ids")
