"""Tokenizer, corpus reading and batching."""
import json

import numpy as np
import pytest

from moeut.train.data import Batches, collect_documents, default_corpus_paths, split_documents
from moeut.train.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    docs = [p.read_text(errors="replace") for p in default_corpus_paths()[:30]]
    return train_tokenizer(docs, vocab_size=500)


@pytest.mark.parametrize("text", ["def f(x):\n\tif x:\n        return 12345\n\n\n", "  leading spaces\r\nand CRLF",
                                  "ünïcødé 😀 ∑ 中文", "", "trailing   \n"])
def test_tokenizer_is_lossless(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_digits_are_split(tokenizer):
    pieces = tokenizer.sp.id_to_piece(tokenizer.encode("x = 2026"))
    assert [p for p in pieces if any(c.isdigit() for c in p)] == ["2", "0", "2", "6"]


def test_default_corpus_is_the_stdlib_without_site_packages():
    paths = default_corpus_paths()
    assert len(paths) > 500 and all("site-packages" not in p.parts for p in paths)


def test_jsonl_and_errors(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"text": "world"}) + "\n")
    assert [t for _, t in collect_documents([str(good)])] == ["hello", "world"]
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="b.jsonl:1.*'text'"):
        collect_documents([str(bad)])
    with pytest.raises(FileNotFoundError, match="nope"):
        collect_documents([str(tmp_path / "nope")])


def test_split_is_deterministic_and_nonempty():
    docs = [(f"d{i}", f"text {i}") for i in range(300)]
    a, b = split_documents(docs), split_documents(docs)
    assert a == b and a[1] and len(a[0]) + len(a[1]) == 300
    with pytest.raises(ValueError):
        split_documents([("only", "x")])


def test_split_does_not_depend_on_where_the_data_lives(tmp_path):
    """The split hashes names relative to the source: the same corpus at two paths (another machine,
    a moved directory) gives the same training and validation documents. (With absolute paths it did
    not, and the trainer's tokenizer, data and weights changed with the directory.)"""
    texts = {f"pkg/m{i}.py": f"def f{i}():\n    return {i}\n" for i in range(120)}
    splits = []
    for where in ("a", "b/deeper"):
        root = tmp_path / where / "corpus"
        for rel, text in texts.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        docs = collect_documents([str(root)])
        assert [name for name, _ in docs] == [f"{rel}#0" for rel in sorted(texts)]
        splits.append(split_documents(docs))
    assert splits[0] == splits[1] and splits[0][1]
    single = tmp_path / "a" / "corpus" / "pkg" / "m7.py"
    assert collect_documents([str(single)]) == [("m7.py#0", texts["pkg/m7.py"])]


def test_batches_depend_only_on_step_and_cover_windows():
    tokens = np.arange(1000, dtype=np.uint16)
    b = Batches(tokens, context=9, global_batch=4, seed=3)
    x = b.batch(5)
    assert x.shape == (1, 4, 10)
    assert (Batches(tokens, 9, 4, 3).batch(5) == x).all()
    # rank shares partition the global batch
    r0, r1 = b.batch(5, rank=0, world=2), b.batch(5, rank=1, world=2)
    assert (np.concatenate([r0[0], r1[0]]) == x[0].numpy()).all()
    # one epoch visits every window exactly once
    starts = sorted(int(b.batch(s)[0, i, 0]) for s in range(b.n_windows // 4) for i in range(4))
    assert len(set(starts)) == len(starts)
