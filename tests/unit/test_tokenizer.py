"""The two tokenizer kinds: the lossless code tokenizer, and the paper's, trained exactly as the training
code trains it (`SentencepieceVocabulary`: BPE, split digits, SentencePiece's defaults otherwise)."""

import io
import random

import pytest
import sentencepiece as spm

from moeut.train.tokenizer import DOCUMENT_SEPARATOR_TEXT, Tokenizer, train_paper_tokenizer, train_tokenizer

WORDS = (
    "the cat sat on a mat and then it ran to house where many people were reading books about "
    "history science music art while children played outside in sunny weather every day"
).split()


def english_documents(n: int = 300, seed: int = 0):
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
            for _ in range(rng.randint(2, 6))
        ]
        docs.append(" ".join(sentences) + f" In {rng.randint(1000, 2999)} there were {rng.randint(2, 99)} ﬁsh.")
    return docs


@pytest.fixture(scope="module")
def paper():
    return train_paper_tokenizer(english_documents(), vocab_size=300)


def test_the_paper_tokenizer_is_the_training_codes(paper):
    """The same model bytes as SentencePiece trained with the training code's options and sentences."""
    docs = english_documents()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(d + "<STORY_SEP>" for d in docs),
        model_writer=model,
        vocab_size=300,
        split_digits=True,
        model_type="bpe",
        minloglevel=2,
    )
    assert paper.model_bytes() == model.getvalue()


def test_the_paper_tokenizer_normalises_like_sentencepiece(paper):
    assert paper.kind == "paper" and not paper.lossless
    assert paper.decode(paper.encode("a ﬁne   day")) == "a fine day"  # NFKC, whitespace collapsed
    assert paper.sp.id_to_piece(paper.encode("cat")[0]).startswith("\u2581")  # the dummy prefix
    pieces = [paper.sp.id_to_piece(i) for i in paper.encode("in 2024")]
    assert all(sum(ch.isdigit() for ch in p) <= 1 for p in pieces) and sum(p.isdigit() for p in pieces) >= 3


def test_documents_end_with_the_separator_text_or_end_of_text(paper):
    ids = paper.encode_documents(["the cat sat"])[0]
    assert ids == paper.encode("the cat sat" + DOCUMENT_SEPARATOR_TEXT) and paper.eot_id not in ids
    code = train_tokenizer(english_documents(), vocab_size=400)
    assert code.kind == "code" and code.lossless
    text = "the  cat\n\tsat ﬁne"
    assert code.decode(code.encode(text)) == text
    assert code.encode_documents([text]) == [code.encode(text) + [code.eot_id]]
    # a model read back from its bytes is of the same kind
    assert Tokenizer(model_proto=paper.model_bytes()).kind == "paper"
    assert Tokenizer(model_proto=code.model_bytes()).kind == "code"
