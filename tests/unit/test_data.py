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


# ---- data as users have it --------------------------------------------------------------------------

DOCS = [f"document {i}: " + " ".join(f"word{j}" for j in range(i + 3)) for i in range(7)]


def test_a_single_text_file_is_cut_into_documents_at_paragraphs(tmp_path):
    from moeut.train.data import split_text
    paras = [f"paragraph {i} " + "x" * 3000 for i in range(10)]
    f = tmp_path / "input.txt"
    f.write_text("\n\n".join(paras))
    docs = [t for _, t in collect_documents([str(f)])]
    assert len(docs) == 5 and all(len(d) <= 8192 for d in docs)
    assert "\n\n".join(docs) == f.read_text()                        # nothing lost, nothing added
    train, valid = split_documents(collect_documents([str(f)]))       # and a validation split exists
    assert train and valid
    long_line = split_text("y" * 20000, chunk=8192)
    assert [len(d) for d in long_line] == [8192, 8192, 3616]


def test_jsonl_gz_and_zst_with_a_text_field(tmp_path):
    import gzip
    import zstandard
    lines = "".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    for name in ("a.jsonl.gz", "b.jsonl.zst"):
        assert [t for _, t in collect_documents([str(tmp_path / name)], text_field="body")] == DOCS
    with pytest.raises(ValueError, match="string field 'text'"):
        collect_documents([str(tmp_path / "a.jsonl.gz")])


def test_parquet_and_arrow_and_a_hugging_face_dataset_directory(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({"text": DOCS, "n": list(range(len(DOCS)))})
    pq.write_table(table, tmp_path / "c.parquet")
    assert [t for _, t in collect_documents([str(tmp_path / "c.parquet")])] == DOCS
    with pytest.raises(ValueError, match="no column 'content'.*--text-field"):
        collect_documents([str(tmp_path / "c.parquet")], text_field="content")
    # datasets' save_to_disk: Arrow streaming-format shards listed in state.json, beside dataset_info.json
    ds = tmp_path / "hf"
    ds.mkdir()
    for k, part in enumerate((DOCS[:3], DOCS[3:])):
        with pa.OSFile(str(ds / f"data-0000{k}-of-00002.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, pa.schema([("text", pa.string())])) as w:
                w.write_table(pa.table({"text": part}))
    (ds / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00002.arrow"},
                                                               {"filename": "data-00001-of-00002.arrow"}]}))
    (ds / "dataset_info.json").write_text("{}")
    got = collect_documents([str(ds)])
    assert [t for _, t in got] == DOCS and not any("json" in n for n, _ in got)
    # a DatasetDict: its train split
    dd = tmp_path / "dd"
    (dd / "train").mkdir(parents=True)
    for f in ds.iterdir():
        (dd / "train" / f.name).write_bytes(f.read_bytes())
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert [t for _, t in collect_documents([str(dd)])] == DOCS
    # a single Arrow file
    assert [t for _, t in collect_documents([str(ds / "data-00000-of-00002.arrow")])] == DOCS[:3]


def test_binary_and_unknown_formats_are_refused_by_name(tmp_path):
    (tmp_path / "model.bin").write_bytes(bytes(range(256)))
    (tmp_path / "paper.pdf").write_bytes(b"%PDF-1.4 \x00\x01")
    for name in ("model.bin", "paper.pdf"):
        with pytest.raises(ValueError, match=f"{name}: unknown data format"):
            collect_documents([str(tmp_path / name)])
    (tmp_path / "notes").write_bytes(b"\x00\x01binary")     # no suffix: read only if it is text
    with pytest.raises(ValueError, match="binary file"):
        collect_documents([str(tmp_path / "notes")])
    # in a directory, files of unknown formats are not data: ignored, the text is read
    (tmp_path / "a.txt").write_text("hello there")
    assert [t for _, t in collect_documents([str(tmp_path)])] == ["hello there"]


# ---- corpora larger than memory ---------------------------------------------------------------------

def _streaming_corpus(tmp_path, n_docs: int):
    import gzip
    import random
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "kernel", "memory", "stream", "token", "data", "file", "42", "é"]
    path = tmp_path / "big.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
        for i in range(n_docs):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(300, 1500)))
            f.write(json.dumps({"text": f"doc {i}\n{text}"}) + "\n")
    return path


def test_tokenization_streams_in_bounded_memory(tmp_path, monkeypatch):
    """Preparing a corpus four times larger takes no more memory (Python allocations, numpy's included):
    the peak is set by the tokenization batch, not the corpus, and stays under the size of its text.
    The tokens are exactly those of tokenizing the listed documents at once."""
    import tracemalloc
    import numpy as np
    from moeut.train import data
    from moeut.train.tokenizer import train_tokenizer
    monkeypatch.setattr(data, "TOKENIZE_BATCH_CHARS", 128 << 10)
    peaks, sizes = [], []
    for n_docs in (300, 1200):
        root = tmp_path / str(n_docs)
        root.mkdir()
        path = _streaming_corpus(root, n_docs)
        corpus = data.Corpus([str(path)])
        tok = train_tokenizer((t for _, (_, t) in zip(range(40), corpus.documents())), 300)
        tracemalloc.start()
        scan = corpus.scan()
        data.tokenize_corpus(corpus, scan, tok, root / "cache", progress=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        docs = collect_documents([str(path)])
        sizes.append(sum(len(t) for _, t in docs))
    assert sizes[1] > 3.5 * sizes[0] and sizes[1] > 32 * (128 << 10)
    assert peaks[1] < 1.25 * peaks[0] + (256 << 10), (peaks, sizes)
    assert peaks[1] < sizes[1], (peaks, sizes)   # less than the text itself would take
    train, valid = split_documents(docs)
    assert (scan.n_train, scan.n_valid) == (len(train), len(valid))
    for name, texts in (("train.bin", train), ("valid.bin", valid)):
        want = np.concatenate([np.asarray(ids, np.uint16) for ids in tok.encode_documents(texts)])
        np.testing.assert_array_equal(np.fromfile(root / "cache" / name, dtype=np.uint16), want)
    assert sorted(p.name for p in (root / "cache").iterdir()) == ["train.bin", "valid.bin"]


def test_the_cache_key_follows_the_texts_and_the_held_out_fallback(tmp_path):
    from moeut.train.data import Corpus
    for i, text in enumerate(["first", "second", "third"]):
        (tmp_path / f"{i}.txt").write_text(text)
    scan = Corpus([str(tmp_path)]).scan()
    train, valid = split_documents(collect_documents([str(tmp_path)]))
    assert (scan.n_train, scan.n_valid) == (len(train), len(valid))
    if scan.fallback is not None:   # no document hashed to validation: the last one is held out
        assert valid == ["third"]
        assert [t for v, t in Corpus([str(tmp_path)]).split(scan) if v] == ["third"]
    key = scan.cache_key(b"tok")
    assert key != scan.cache_key(b"other tokenizer")
    (tmp_path / "1.txt").write_text("changed")
    assert Corpus([str(tmp_path)]).scan().cache_key(b"tok") != key


def test_tokenizer_samples_lines_in_bounded_memory():
    import random
    from moeut.train.tokenizer import sample_lines
    few = [f"line {i}" for i in range(50)]
    expected = list(few)
    random.Random(3).shuffle(expected)
    assert sample_lines(["\n".join(few)], 100, seed=3) == expected      # all lines, shuffled by the seed
    stream = (f"doc {i}\nline {i}\n\n" for i in range(100_000))
    got = sample_lines(stream, 1000, seed=3)
    assert len(got) == 1000 and len(set(got)) == 1000 and all(g.startswith(("doc ", "line ")) for g in got)
    late = sum(int(g.split()[1]) >= 50_000 for g in got)
    assert 400 < late < 600   # a uniform sample, not the first lines


def test_a_text_file_larger_than_a_block_is_cut_the_same_way(tmp_path, monkeypatch):
    from moeut.train import data
    monkeypatch.setattr(data, "TEXT_BLOCK_BYTES", 4096)
    paras = [f"paragraph {i} " + "word " * (i % 50) + "é" * (i % 7) for i in range(400)]
    f = tmp_path / "book.txt"
    f.write_text("\n\n".join(paras))
    docs = [t for _, t in collect_documents([str(f)])]
    assert "\n\n".join(docs) == f.read_text() and len(docs) > 1
    assert all(len(d) <= data.CHUNK_CHARS for d in docs)
