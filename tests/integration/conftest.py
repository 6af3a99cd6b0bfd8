import shutil
import sys
from pathlib import Path

import pytest

from moeut.train.data import default_corpus_paths

SMALL_MODEL = [
    "--set",
    "d_model=32",
    "--set",
    "n_layers=2",
    "--set",
    "n_heads=2",
    "--set",
    "d_head=16",
    "--set",
    "ff_n_experts=8",
    "--set",
    "ff_k=2",
    "--set",
    "att_n_experts=2",
    "--set",
    "ff_expert_size=16",
]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small real code corpus: 40 standard-library files."""
    d = tmp_path_factory.mktemp("corpus")
    for p in default_corpus_paths()[:40]:
        shutil.copy(p, d / p.name)
    return d


def train_args(corpus: Path, out: Path, cache: Path, steps: int = 8, extra=()):
    return [
        "train",
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--batch-size",
        "4",
        "--context",
        "32",
        "--vocab-size",
        "400",
        "--log-interval",
        "1",
        "--eval-interval",
        "4",
        "--eval-windows",
        "4",
        "--ckpt-interval",
        "3",
        "--cache-dir",
        str(cache),
        "--no-progress",
        "--no-tensorboard",
        *SMALL_MODEL,
        *extra,
    ]


PY = sys.executable
STEPS = 9


@pytest.fixture(scope="session")
def reference(corpus, tmp_path_factory):
    """An uninterrupted run of STEPS steps (checkpoints at 3, 6, 9), its cache, and its losses by step:
    the run every fault test copies and damages."""
    import json
    from moeut.cli import main

    base = tmp_path_factory.mktemp("reference")
    run, cache = base / "run", base / "cache"
    assert main(train_args(corpus, run, cache, steps=STEPS)) == 0
    losses = {r["step"]: r["loss"] for r in map(json.loads, open(run / "metrics.jsonl")) if "loss" in r}
    return run, cache, losses


@pytest.fixture
def finished(reference, tmp_path):
    """A private copy of the reference run, to damage."""
    run, cache, want = reference
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy, cache, want


def wait_for_logged_steps(run: Path, n: int, proc, timeout: float) -> None:
    """Poll `run`/metrics.jsonl until it holds `n` loss records (or `proc` ends, or `timeout` passes)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.1)
