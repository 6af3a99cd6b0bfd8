"""Ctrl-C anywhere: during training it checkpoints and says how to continue; while data are prepared,
a run is exported or scores are written, the command exits with status 130 and leaves nothing
half-written (no run directory, no cache file, no partial export)."""

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from moeut.cli import main

from .conftest import PY, train_args, wait_for_logged_steps

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def test_ctrl_c_while_training_checkpoints_and_the_run_resumes(corpus, tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    args = train_args(corpus, run, cache, steps=100_000)
    proc = subprocess.Popen(
        [PY, "-m", "moeut", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV
    )
    wait_for_logged_steps(run, 2, proc, timeout=120)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out  # 128 + SIGINT, after the checkpoint
    assert "stopped by signal at step" in out and f"moeut train --resume {run}" in out
    step = int(out.split("stopped by signal at step ")[1].split(";")[0])
    assert (run / "checkpoints" / f"step_{step:08d}").is_dir()
    assert (
        main(["train", "--resume", str(run), "--steps", str(step + 2), "--cache-dir", str(cache), "--no-progress"]) == 0
    )
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps[-1] == step + 2


def _interrupt_on_call(monkeypatch, target, name, after: int = 0):
    """Make target.name raise KeyboardInterrupt on its (after + 1)-th call, as Ctrl-C would there."""
    original = getattr(target, name)
    calls = [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] > after:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, interrupted)


@pytest.mark.parametrize("where", ["tokenizer training", "tokenization"])
def test_ctrl_c_while_preparing_data_leaves_nothing(corpus, tmp_path, monkeypatch, capsys, where):
    from moeut.train import data, tokenizer, trainer

    if where == "tokenizer training":
        _interrupt_on_call(monkeypatch, trainer, "train_tokenizer")
    else:
        _interrupt_on_call(monkeypatch, tokenizer.Tokenizer, "encode_documents", after=1)
    monkeypatch.setattr(data, "TOKENIZE_BATCH_CHARS", 4096)  # several batches: interrupted between them
    run, cache = tmp_path / "run", tmp_path / "cache"
    assert main(train_args(corpus, run, cache)) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not run.exists()
    assert not [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else True


def test_ctrl_c_during_export_leaves_no_directory(corpus, tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    run, cache = tmp_path / "run", tmp_path / "cache"
    assert main(train_args(corpus, run, cache, steps=2)) == 0
    from moeut.hf import tokenization

    _interrupt_on_call(monkeypatch, tokenization.MoEUTTokenizer, "save_pretrained")
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 130
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.export-*"))
    capsys.readouterr()
    monkeypatch.undo()
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0  # and a second try works
