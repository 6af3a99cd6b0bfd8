"""The README's Python blocks run as written (on this CPU): the quick start, and loading a trained run
with our classes and with transformers (its run and export paths pointed at a fresh tiny run)."""

import re
from pathlib import Path

import pytest

from moeut.cli import main

from .conftest import train_args

pytestmark = pytest.mark.slow
README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def python_block(after_heading: str) -> str:
    section = README.split(after_heading, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, f"no python block under {after_heading!r}"
    return blocks[0]


def test_quick_start_runs():
    exec(compile(python_block("## Quick start"), "README quick start", "exec"), {})


def test_your_data_then_python_and_transformers_runs(corpus, tmp_path, capsys):
    pytest.importorskip("transformers")
    run, hf = tmp_path / "runs" / "mine", tmp_path / "hf" / "mine"
    assert main(train_args(corpus, run, tmp_path / "cache", steps=2)) == 0
    assert main(["export", str(run), "--out", str(hf)]) == 0
    code = python_block("## Your data, then Python")
    assert '"runs/mine"' in code and '"hf/mine"' in code
    code = code.replace('"runs/mine"', repr(str(run))).replace('"hf/mine"', repr(str(hf)))
    capsys.readouterr()
    exec(compile(code, "README your data", "exec"), {})
    printed = capsys.readouterr().out
    assert "['def main():" in printed and "'import os" in printed  # the batch, prompts included
