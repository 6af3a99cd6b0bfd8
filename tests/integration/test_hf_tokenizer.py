"""A Hugging Face tokenizer (tokenizer.json) as the run's tokenizer, end to end: training, the cache,
generate, the export, and transformers' AutoTokenizer giving the same ids as the run's tokenizer."""

import json

import pytest

from moeut.cli import main
from moeut.runs import load_run
from moeut.train.data import default_corpus_paths

from .conftest import train_args

pytestmark = pytest.mark.slow
VARIED = [
    "def f(x):\n\treturn x ** 2  # squares\n",
    "  leading spaces\r\nand CRLF",
    "ünïcødé 😀 ∑ 中文 \ufb01",
    "numbers 12345 and 3.14159",
    "",
    "trailing   \n\n\n",
    "<|endoftext|> in the text",
]


def byte_level_tokenizer(path, texts, vocab=400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok.save(str(path))
    return path


def test_a_tokenizer_json_trains_generates_and_exports_to_a_fast_auto_tokenizer(corpus, tmp_path, capsys):
    pytest.importorskip("tokenizers")
    texts = [p.read_text() for p in default_corpus_paths()[:30]]
    tok_file = byte_level_tokenizer(tmp_path / "tokenizer.json", texts)
    run = tmp_path / "run"
    args = train_args(corpus, run, tmp_path / "cache", steps=3)
    args = args[: args.index("--vocab-size")] + args[args.index("--vocab-size") + 2 :] + ["--tokenizer", str(tok_file)]
    assert main(args) == 0
    assert (run / "tokenizer.json").is_file() and not (run / "tokenizer.model").exists()
    assert json.loads((run / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    model, tok, meta = load_run(run)
    assert tok.kind == "hf" and meta["vocab_size"] == tok.vocab_size == 400 and tok.lossless
    for t in VARIED:
        assert tok.decode(tok.encode(t)) == t
    assert main(["generate", str(run), "--prompt", "def ", "--max-new-tokens", "3"]) == 0
    pytest.importorskip("transformers")
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf_tok.is_fast and hf_tok.eos_token == "<|endoftext|>" and hf_tok.padding_side == "left"
    for t in VARIED + texts[:5]:
        assert hf_tok(t, add_special_tokens=False)["input_ids"] == tok.encode(t), t[:40]
        assert hf_tok.decode(tok.encode(t)) == tok.decode(tok.encode(t))
    # fine-tuning from the export keeps the same tokenizer
    out = tmp_path / "ft"
    assert (
        main(
            [
                "train",
                "--init-from",
                str(tmp_path / "hf"),
                "--data",
                str(corpus),
                "--out",
                str(out),
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--context",
                "32",
                "--cache-dir",
                str(tmp_path / "cache"),
                "--no-progress",
                "--no-tensorboard",
            ]
        )
        == 0
    )
    assert (out / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()


def test_tokenizers_that_cannot_serve_are_refused_by_name(corpus, tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models

    no_eos = tmp_path / "no_eos.json"
    Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")).save(str(no_eos))
    big = tmp_path / "big.json"
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(70000)} | {"</s>": 70000}, unk_token="w0")).save(str(big))
    (tmp_path / "broken.json").write_text('{"model": 3}')
    for f, named in (
        (no_eos, "no end-of-text token"),
        (big, "at most 65535"),
        (tmp_path / "broken.json", "not a Hugging Face tokenizer"),
    ):
        args = train_args(corpus, tmp_path / "run", tmp_path / "cache", steps=1)
        args = args[: args.index("--vocab-size")] + args[args.index("--vocab-size") + 2 :] + ["--tokenizer", str(f)]
        assert main(args) == 2
        assert named in capsys.readouterr().err and not (tmp_path / "run").exists()
