"""Tokenizer, corpus reading and batching."""

import json

import numpy as np
import pytest

from moeut.train.data import Batches, Corpus, collect_documents, default_corpus_paths
from moeut.train.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    docs = [p.read_text(errors="replace") for p in default_corpus_paths()[:30]]
    return train_tokenizer(docs, vocab_size=500)


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n\tif x:\n        return 12345\n\n\n",
        "  leading spaces\r\nand CRLF",
        "ünïcødé 😀 ∑ 中文",
        "",
        "trailing   \n",
    ],
)
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


def split_of(sources, **kw):
    """(training texts, validation texts) of a corpus after its split."""
    corpus = Corpus([str(s) for s in sources], **kw)
    scan = corpus.scan(warn=lambda m: None)
    pairs = list(corpus.split(scan))
    return [t for v, t in pairs if not v], [t for v, t in pairs if v]


def test_split_is_deterministic_and_nonempty(tmp_path):
    for i in range(300):
        (tmp_path / f"d{i}.txt").write_text(f"text {i}")
    a, b = split_of([tmp_path]), split_of([tmp_path])
    assert a == b and a[1] and len(a[0]) + len(a[1]) == 300
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "only.txt").write_text("x")
    with pytest.raises(ValueError, match="too small"):
        split_of([tmp_path / "one"])


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
        splits.append(split_of([root]))
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
    from moeut.train.sources import split_text

    paras = [f"paragraph {i} " + "x" * 3000 for i in range(10)]
    f = tmp_path / "input.txt"
    f.write_text("\n\n".join(paras))
    docs = [t for _, t in collect_documents([str(f)])]
    assert len(docs) == 5 and all(len(d) <= 8192 for d in docs)
    assert "\n\n".join(docs) == f.read_text()  # nothing lost, nothing added
    train, valid = split_of([f])  # and a validation split exists
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
    (ds / "state.json").write_text(
        json.dumps(
            {"_data_files": [{"filename": "data-00000-of-00002.arrow"}, {"filename": "data-00001-of-00002.arrow"}]}
        )
    )
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
    (tmp_path / "notes").write_bytes(b"\x00\x01binary")  # no suffix: read only if it is text
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
    assert peaks[1] < sizes[1], (peaks, sizes)  # less than the text itself would take
    train, valid = split_of([path])
    assert (scan.n_train, scan.n_valid) == (len(train), len(valid))
    for name, texts in (("train.bin", train), ("valid.bin", valid)):
        want = np.concatenate([np.asarray(ids, np.uint16) for ids in tok.encode_documents(texts)])
        np.testing.assert_array_equal(np.fromfile(root / "cache" / name, dtype=np.uint16), want)
    assert sorted(p.name for p in (root / "cache").iterdir()) == ["train.bin", "valid.bin"]


def test_the_cache_key_follows_the_texts_and_a_tiny_corpus_still_validates(tmp_path):
    for i, text in enumerate(["first", "second", "third"]):
        (tmp_path / f"{i}.txt").write_text(text)
    scan = Corpus([str(tmp_path)]).scan()
    train, valid = split_of([tmp_path])
    assert (scan.n_train, scan.n_valid) == (len(train), len(valid)) == (2, 1)  # one piece held out, never all
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
    assert sample_lines(["\n".join(few)], 100, seed=3) == expected  # all lines, shuffled by the seed
    stream = (f"doc {i}\nline {i}\n\n" for i in range(100_000))
    got = sample_lines(stream, 1000, seed=3)
    assert len(got) == 1000 and len(set(got)) == 1000 and all(g.startswith(("doc ", "line ")) for g in got)
    late = sum(int(g.split()[1]) >= 50_000 for g in got)
    assert 400 < late < 600  # a uniform sample, not the first lines


def test_a_text_file_larger_than_a_block_is_cut_the_same_way(tmp_path, monkeypatch):
    from moeut.train import sources as data

    monkeypatch.setattr(data, "TEXT_BLOCK_BYTES", 4096)
    paras = [f"paragraph {i} " + "word " * (i % 50) + "é" * (i % 7) for i in range(400)]
    f = tmp_path / "book.txt"
    f.write_text("\n\n".join(paras))
    docs = [t for _, t in collect_documents([str(f)])]
    assert "\n\n".join(docs) == f.read_text() and len(docs) > 1
    assert all(len(d) <= data.CHUNK_CHARS for d in docs)


# ---- the validation split, and the user's choice of it --------------------------------------------


def test_a_few_large_files_lose_only_the_validation_fraction_of_their_text(tmp_path):
    """40 Markdown files of ~50 KB each: about 2% of the characters go to validation (by name hash they
    lost 43% of the tokens before), cut from inside the files, and every character is somewhere."""
    import random

    rng = random.Random(0)
    texts = {}
    for i in range(40):
        paras = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(200, 900))) for _ in range(80)]
        texts[f"note{i:02d}.md"] = "\n\n".join(paras)
        (tmp_path / f"note{i:02d}.md").write_text(texts[f"note{i:02d}.md"])
    train, valid = split_of([tmp_path])
    total = sum(len(t) for t in texts.values())
    share = sum(map(len, valid)) / total
    assert 0.02 <= share < 0.02 + 16384 / total + 1e-9, share
    assert sum(map(len, train)) + sum(map(len, valid)) == total
    assert len(train) > 40  # files with a piece held out train as their parts around it
    train10, valid10 = split_of([tmp_path], valid_fraction=0.1)
    assert 0.1 <= sum(map(len, valid10)) / total < 0.1 + 16384 / total + 1e-9
    assert set(valid) <= set(valid10)  # a larger fraction holds out more of the same order


def test_valid_data_and_a_dataset_dicts_own_validation_split(tmp_path):
    import pyarrow as pa

    (tmp_path / "train").mkdir()
    for i in range(5):
        (tmp_path / "train" / f"{i}.txt").write_text(f"training text {i}")
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"text": f"held {i}"}) + "\n" for i in range(3)))
    train, valid = split_of([tmp_path / "train"], valid_sources=[str(tmp_path / "held.jsonl")])
    assert sorted(train) == [f"training text {i}" for i in range(5)] and valid == [f"held {i}" for i in range(3)]
    dd = tmp_path / "dd"
    for split, docs in (("train", DOCS[:5]), ("validation", DOCS[5:])):
        (dd / split).mkdir(parents=True)
        with pa.OSFile(str(dd / split / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, pa.schema([("text", pa.string())])) as w:
                w.write_table(pa.table({"text": docs}))
        (dd / split / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    train, valid = split_of([dd])
    assert train == DOCS[:5] and valid == DOCS[5:]
    with pytest.raises(ValueError, match="--valid-fraction 0 needs --valid-data"):
        Corpus([str(tmp_path / "train")], valid_fraction=0)


def test_decode_errors_replace_strict_and_skip(tmp_path):
    cp1252 = "caf\u00e9 \u2013 ok".encode("cp1252")
    big = tmp_path / "big.txt"
    big.write_bytes(b"fine text\n\n" * 1000 + cp1252 + b"\n\nmore fine text")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.txt").write_bytes(b"plain")
    (tmp_path / "dir" / "b.txt").write_bytes(cp1252)
    corpus = Corpus([str(big), str(tmp_path / "dir")])  # default: replace, and count
    texts = [t for _, t in corpus.documents()]
    scan = corpus.scan(warn=lambda m: None)
    assert any("caf\ufffd \ufffd ok" in t for t in texts) and "plain" in texts
    assert scan.replaced == 4 and scan.replaced_files == 2 and "replaced in 2 file(s)" in scan.describe()
    with pytest.raises(ValueError, match="big.txt is not valid UTF-8 text.*--decode-errors strict"):
        list(Corpus([str(big)], decode_errors="strict").documents())
    warned = []
    skipped = Corpus([str(big), str(tmp_path / "dir")], decode_errors="skip")
    assert [t for _, t in skipped.documents(warned.append)] == ["plain"]
    assert len(warned) == 2 and skipped.skipped == 2
    (tmp_path / "dir" / "c.txt").write_bytes(b"text\x00with a NUL")  # binary: never text, in any mode
    warned = []
    assert "plain" in [t for _, t in Corpus([str(tmp_path / "dir")]).documents(warned.append)]
    assert any("c.txt is a binary file" in w for w in warned)


def test_compressed_text_files(tmp_path):
    import gzip
    import zstandard

    text = "\n\n".join(f"paragraph {i} " + "w" * 500 for i in range(40))
    (tmp_path / "book.txt.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "notes.md.zst").write_bytes(zstandard.ZstdCompressor().compress(b"# notes\n\nhello"))
    (tmp_path / "data.bin.gz").write_bytes(gzip.compress(b"\x00\x01"))
    assert "\n\n".join(t for _, t in collect_documents([str(tmp_path / "book.txt.gz")])) == text  # cut, all kept
    assert [t for _, t in collect_documents([str(tmp_path / "notes.md.zst")])] == ["# notes\n\nhello"]
    in_dir = [n for n, _ in collect_documents([str(tmp_path)])]
    assert in_dir == ["book.txt.gz#0", "notes.md.zst#0"]  # one document each; the .bin.gz is not data
