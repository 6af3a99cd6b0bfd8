"""`moeut train --init-from`: a new run from a trained run, from an export, and from an imported authors'
checkpoint, with its own data and learning rate; shapes that do not fit are refused before anything is
written."""

import json

import pytest
import torch

from moeut.cli import main
from moeut.runs import load_run


pytestmark = pytest.mark.slow


def finetune_args(source, corpus, out, cache, extra=()):
    return [
        "train",
        "--init-from",
        str(source),
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--context",
        "32",
        "--lr",
        "1e-12",
        "--weight-decay",
        "0",
        "--eval-interval",
        "2",
        "--eval-windows",
        "2",
        "--log-interval",
        "1",
        "--cache-dir",
        str(cache),
        "--no-progress",
        "--no-tensorboard",
        *extra,
    ]


def assert_starts_from(run, source_state):
    """After two steps at a learning rate of 1e-12 the weights are the source's to float precision."""
    got = load_run(run)[0].state_dict()
    assert got.keys() == source_state.keys()
    for k, v in source_state.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-8, msg=k)


def test_from_a_run_and_from_its_export(reference, corpus, tmp_path, capsys):
    src, cache, _ = reference
    want = load_run(src)[0].state_dict()
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(f"A new domain, paragraph {i}: " + "words " * 40 for i in range(200)))
    out = tmp_path / "ft"
    assert main(finetune_args(src, other, out, cache)) == 0
    assert_starts_from(out, want)
    meta = json.loads((out / "run.json").read_text())
    assert meta["init_from"]["kind"] == "run" and meta["init_from"]["step"] == 9
    assert meta["model_kwargs"] == json.loads((src / "run.json").read_text())["model_kwargs"]
    assert (out / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    assert "initialised from" in capsys.readouterr().out
    pytest.importorskip("transformers")
    assert main(["export", str(src), "--out", str(tmp_path / "hf")]) == 0
    out2 = tmp_path / "ft-hf"
    assert main(finetune_args(tmp_path / "hf", other, out2, cache)) == 0
    assert_starts_from(out2, want)
    assert json.loads((out2 / "run.json").read_text())["init_from"]["kind"] == "hf"


def test_from_an_imported_authors_checkpoint(corpus, tmp_path):
    from tests.unit.test_official_import import MOEUT_ARGS, moeut_state, training_code_tokenizer, write_checkpoint
    from moeut.train.official import import_official

    tok = training_code_tokenizer(tmp_path)
    imported = import_official(
        write_checkpoint(tmp_path / "c.ckpt", moeut_state(MOEUT_ARGS), MOEUT_ARGS),
        tok,
        tmp_path / "imported",
        say=lambda m: None,
    )
    want = load_run(imported)[0].state_dict()
    out = tmp_path / "ft"
    assert main(finetune_args(imported, corpus, out, tmp_path / "cache")) == 0
    assert_starts_from(out, want)


def test_shapes_that_do_not_fit_are_refused_before_anything_is_written(reference, corpus, tmp_path, capsys):
    src, cache, _ = reference
    out = tmp_path / "ft"
    assert main(finetune_args(src, corpus, out, cache, ["--set", "ff_n_experts=6"])) == 2
    err = capsys.readouterr().err
    assert "shape mismatch" in err and "ffn" in err and not out.exists()
    assert main(finetune_args(src, corpus, out, cache, ["--tokenizer", "paper"])) == 2
    assert "--tokenizer paper" in capsys.readouterr().err and not out.exists()
    assert main(finetune_args(src, corpus, out, cache, ["--model", "moeut-tiny"])) == 2
    assert "leave out --model" in capsys.readouterr().err and not out.exists()
    assert main(finetune_args(tmp_path / "nothing", corpus, out, cache)) == 2
    assert "no such run" in capsys.readouterr().err and not out.exists()


def test_a_new_learning_rate_for_continued_pretraining_is_just_a_new_run(reference, corpus, tmp_path):
    """Continued pre-training on the same data with another learning rate: the new run's schedule is its
    own, and the source run is untouched."""
    src, cache, _ = reference
    before = {p.name: p.stat().st_mtime_ns for p in src.rglob("*")}
    out = tmp_path / "more"
    args = finetune_args(src, corpus, out, cache)
    args[args.index("--lr") + 1] = "3e-4"
    assert main(args) == 0
    lrs = [json.loads(line)["lr"] for line in open(out / "metrics.jsonl") if '"lr"' in line]
    assert lrs == pytest.approx([3e-4 * 0.55, 3e-4 * 0.1])  # its own cosine over its 2 steps, no warmup (tiny)
    assert {p.name: p.stat().st_mtime_ns for p in src.rglob("*")} == before
