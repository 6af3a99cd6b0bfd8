"""The trainer end to end on CPU: metrics, checkpoints, resume after SIGTERM, bad checkpoints, DDP."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moeut.train import checkpoint as ckpt_lib
from moeut.cli import main
from moeut.runs import load_run

from .conftest import PY, train_args

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def losses(run: Path):
    recs = [json.loads(l) for l in open(run / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def test_train_writes_metrics_checkpoints_and_run(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(corpus, out, tmp_path / "cache", steps=8)) == 0
    text = capsys.readouterr().out
    assert "validation perplexity" in text and "unigram" in text and "greedy sample" in text
    recs = [json.loads(l) for l in open(out / "metrics.jsonl")]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert any("val_ppl" in r for r in recs)
    assert any(k.startswith("router/") for k in steps[-1])
    names = [p.name for p in ckpt_lib.list_checkpoints(out)]
    assert names == ["step_00000003", "step_00000006", "step_00000008"]
    model, tok, meta = load_run(out)
    assert meta["model"] == "moeut-tiny" and tok.vocab_size == 400
    # a second run into the same directory is refused rather than overwriting it
    assert main(train_args(corpus, out, tmp_path / "cache", steps=8)) == 2


def test_tensorboard_logs_are_written(corpus, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    args = [a for a in train_args(corpus, out, tmp_path / "cache", steps=2) if a != "--no-tensorboard"]
    assert main(args) == 0
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard")).Reload()
    assert "ffn_expert_usage" in acc.Tags()["images"] and "expert_usage_entropy" in acc.Tags()["scalars"]


def test_wandb_without_the_package_fails_before_the_run_exists(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    out = tmp_path / "run"
    assert main(train_args(corpus, out, tmp_path / "cache", steps=2) + ["--wandb"]) == 2
    assert "--wandb needs the wandb package" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_wandb_offline_run_holds_the_metrics(corpus, tmp_path, monkeypatch):
    """--wandb with WANDB_MODE=offline and no network: the W&B run lives under the run directory, its log
    (the .wandb file `wandb sync` uploads; wandb >= 0.19 ships no Python reader for it, so its bytes are
    searched) holds the logged loss and validation perplexity, and a resume continues the same W&B run."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        pytest.skip("wandb is not installed (an optional dependency: pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    args = train_args(corpus, out, tmp_path / "cache", steps=4) + ["--wandb", "--wandb-project", "moeut-test"]
    assert main(args) == 0
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    log = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss = [r for r in records if "loss" in r][-1]["loss"]
    ppl = [r for r in records if "val_ppl" in r][-1]["val_ppl"]
    assert b"val_ppl" in log and json.dumps(loss).encode() in log and json.dumps(ppl).encode() in log
    assert b"moeut-tiny" in log  # the configuration
    run_id = runs[0].name.rsplit("-", 1)[-1]
    assert (
        main(
            [
                "train",
                "--resume",
                str(out),
                "--steps",
                "6",
                "--wandb",
                "--no-progress",
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    assert {p.name.rsplit("-", 1)[-1] for p in (out / "wandb").glob("offline-run-*")} == {run_id}


def test_sigterm_then_resume_logs_the_same_losses(corpus, tmp_path):
    cache = tmp_path / "cache"
    full = tmp_path / "full"
    assert main(train_args(corpus, full, cache, steps=10)) == 0

    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        [PY, "-m", "moeut", *train_args(corpus, cut, cache, steps=10)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        if (cut / "metrics.jsonl").exists() and len(losses(cut)) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, output  # after its checkpoint
    assert "stopped by signal" in output
    stopped_at = max(losses(cut))
    assert stopped_at < 10
    assert main(["train", "--resume", str(cut), "--no-progress", "--cache-dir", str(cache)]) == 0
    assert losses(cut) == losses(full)


def test_resume_reads_the_data_the_run_started_on(corpus, tmp_path, capsys):
    """Files changed under --data after a run started do not change it when resumed (the tokenized
    data it started on are still cached). With that cache gone, the run's recorded paths are not
    followed: --data must be given again, and the trainer says when it gives other data."""
    import shutil

    data, cache, run = tmp_path / "data", tmp_path / "cache", tmp_path / "run"
    shutil.copytree(corpus, data)
    args = train_args(data, run, cache, steps=6)
    assert main(args) == 0
    want = losses(run)
    for path in (data / sorted(p.name for p in data.iterdir())[0], data / "extra.py"):
        path.write_text("changed = True\n" * 200)
    shutil.rmtree(run / "checkpoints" / "step_00000006")  # resume from step 3
    capsys.readouterr()
    resume = ["train", "--resume", str(run), "--no-progress", "--cache-dir", str(cache)]
    assert main(resume) == 0
    assert losses(run) == want
    assert "warning" not in capsys.readouterr().out
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    shutil.rmtree(cache)
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert "--data" in err and str(data) in err and not cache.exists()
    assert main(resume + ["--data", str(data)]) == 0
    assert "are not those this run started on" in capsys.readouterr().out
    assert losses(run)[6] != want[6]


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    training = {
        "optimizer": {"state": {}, "param_groups": [{"params": []}]},
        "scheduler": {"last_epoch": 1},
        "rng": {"torch": torch.ones(2)},
        "data_position": 4,
        "config": {},
    }
    good = ckpt_lib.save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, training)
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def disk_full(tensors, filename, *a, **k):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError):
        ckpt_lib.save_checkpoint(tmp_path, 2, {"w": torch.zeros(2)}, training, keep=1)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [good.name]  # no temp directory left
    assert ckpt_lib.load_training_state(good)["step"] == 1
    assert torch.equal(ckpt_lib.load_model_state(good)["w"], torch.ones(2))


def assert_same_training(got, want, rtol, atol, steps=3, lr=1e-3, max_off=0.01):
    """Weights after a few AdamW steps of two runs whose gradients should differ only in summation
    order. AdamW divides by the root of the squared gradients' average, so a near-zero gradient whose
    last bits differ can move its element by a sizeable part of the learning rate: a few elements may
    be off. (One full-suite run found 46 of 2048 elements of one expert tensor off by up to 1.1e-4.
    The validation split then hashed absolute paths, so each session's temporary corpus directory
    gave other training data, and some of it such gradients; see
    `test_split_does_not_depend_on_where_the_data_lives`.) A real difference in the gradients moves most elements:
    training on half the batch instead put 76% of all elements, and at least 20% of each tensor of 16
    or more elements, outside these bounds."""
    off = total = 0
    for k in want:
        diff = (got[k].float() - want[k].float()).abs()
        off += int((diff > atol + rtol * want[k].float().abs()).sum())
        total += diff.numel()
        assert diff.max() <= 2 * steps * lr, (k, diff.max().item())
    assert off <= max_off * total, f"{off} of {total} elements differ"


def test_gradient_accumulation_matches_full_batch(corpus, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(train_args(corpus, a, tmp_path / "cache", steps=3)) == 0
    assert main(train_args(corpus, b, tmp_path / "cache", steps=3, extra=["--micro-batch-size", "2"])) == 0
    assert_same_training(load_run(b)[0].state_dict(), load_run(a)[0].state_dict(), rtol=1e-4, atol=1e-5)
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys() and all(abs(la[s] - lb[s]) < 1e-4 for s in la)


def test_same_training_check_catches_half_the_batch(corpus, tmp_path):
    """The bounds above are loose enough for Adam's amplified rounding, and still fail a run whose
    gradient misses half of the batch (what a lost micro-batch or a skipped all-reduce would do)."""
    full, half = tmp_path / "full", tmp_path / "half"
    assert main(train_args(corpus, full, tmp_path / "cache", steps=3)) == 0
    args = train_args(corpus, half, tmp_path / "cache", steps=3)
    args[args.index("--batch-size") + 1] = "2"
    assert main(args) == 0
    with pytest.raises(AssertionError, match="elements differ"):
        assert_same_training(load_run(half)[0].state_dict(), load_run(full)[0].state_dict(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision,tol,loss_tol", [("fp32", 1e-4, 1e-4), ("bf16", 3e-3, 1e-2)])
def test_two_process_ddp_matches_single_process(corpus, tmp_path, precision, tol, loss_tol):
    """bf16 runs autocast on CPU (shared expert weights on). Adam turns the last-bit differences of
    near-zero bf16 gradients into whole steps of the learning rate (1e-3) on a few elements, with or
    without shared weights, hence the looser bounds (the step-3 loss, about 6.0, once differed by
    3.0e-3); `test_ddp.py` compares the gradients themselves."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    cache = tmp_path / "cache"
    args = lambda out: train_args(corpus, out, cache, steps=3, extra=["--precision", precision])
    assert main(args(single)) == 0
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    port = {"fp32": "29631", "bf16": "29632"}[precision]
    r = subprocess.run(
        [PY, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "-m", "moeut", *args(ddp)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ws = load_run(single)[0].state_dict()
    wd = load_run(ddp)[0].state_dict()
    assert_same_training(wd, ws, rtol=tol, atol=tol if precision == "bf16" else tol / 10)
    ls, ld = losses(single), losses(ddp)
    assert ls.keys() == ld.keys()
    for s in ls:
        assert abs(ls[s] - ld[s]) < loss_tol


def test_step_mode_is_stated_and_cuda_graph_insists(corpus, tmp_path, capsys):
    """By default the trainer replays CUDA graphs whenever they apply and says which mode it runs and
    why; --cuda-graph where they cannot apply is an error naming what is missing."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU (tests/gpu covers the graphed trainer there)")
    assert main(train_args(corpus, tmp_path / "run", tmp_path / "cache", steps=1)) == 0
    assert "step mode: eager (CUDA graphs need a CUDA device" in capsys.readouterr().out
    assert main(train_args(corpus, tmp_path / "off", tmp_path / "cache", steps=1) + ["--no-cuda-graph"]) == 0
    assert "step mode: eager (--no-cuda-graph)" in capsys.readouterr().out
    assert main(train_args(corpus, tmp_path / "on", tmp_path / "cache", steps=2) + ["--cuda-graph"]) == 2
    assert "--cuda-graph needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "on").exists()


def test_paper_tokenizer_on_a_c4_style_jsonl_corpus_end_to_end(tmp_path, capsys):
    """`--tokenizer paper` on JSONL documents ({"text": ...}, as C4 ships them): trained, saved with the
    run, the documents separated by the text <STORY_SEP>, then generate and eval read the run."""
    import json
    from moeut.train.tokenizer import Tokenizer
    from tests.unit.test_tokenizer import english_documents

    data = tmp_path / "c4"
    data.mkdir()
    with open(data / "c4-train.00000-of-01024.jsonl", "w") as f:
        for doc in english_documents(400):
            f.write(json.dumps({"text": doc, "url": "https://example.com", "timestamp": "2019-04-25"}) + "\n")
    out = tmp_path / "run"
    args = train_args(data, out, tmp_path / "cache", steps=2, extra=["--tokenizer", "paper"])
    args[args.index("--vocab-size") + 1] = "300"
    assert main(args) == 0
    assert "300-piece paper tokenizer" in capsys.readouterr().out
    tok = Tokenizer(out / "tokenizer.model")
    assert tok.kind == "paper" and tok.vocab_size == 300
    tokens = np.fromfile(next((tmp_path / "cache").glob("*/train.bin")), dtype=np.uint16).tolist()
    assert tok.eot_id not in tokens and "fish.<STORY_SEP>" in tok.decode(tokens[:400])
    assert main(["generate", "--checkpoint", str(out), "--prompt", "The cat", "--max-new-tokens", "4"]) == 0


def test_the_dense_baseline_trains_through_the_trainer(corpus, tmp_path, capsys):
    out = tmp_path / "dense"
    args = train_args(corpus, out, tmp_path / "cache", steps=4)
    small = args.index("--set")
    args = args[:small] + ["--model", "dense-tiny", "--set", "d_model=32", "--set", "n_layers=2", "--set", "d_ff=48"]
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["model"] == "dense-tiny" and run["model_kwargs"]["scale_embedding"] is False
    losses = [json.loads(line)["loss"] for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    printed = capsys.readouterr().out
    n_params = sum(v.numel() for v in load_run(out)[0].parameters()) / 1e6
    assert f"model: dense-tiny, {n_params:.1f}M parameters" in printed
    assert "budget: 4 steps x 4 x 32 = 512 tokens (" in printed and "epochs of the training split" in printed
    assert "device: cpu, precision fp32" in printed


def test_samples_at_every_evaluation(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            train_args(
                corpus, out, tmp_path / "cache", steps=8, extra=["--sample-tokens", "5", "--sample-prompt", "def main("]
            )
        )
        == 0
    )
    samples = [json.loads(line) for line in open(out / "metrics.jsonl") if '"sample"' in line]
    assert [s["step"] for s in samples] == [4, 8]  # --eval-interval 4
    # and the expert statistics of `moeut analyze`, at the same evaluations
    stats = [json.loads(line) for line in open(out / "metrics.jsonl") if "expert_usage_entropy" in line]
    assert [s["step"] for s in stats] == [4, 8]
    assert all(0 < s["expert_usage_entropy"] <= 1 and s["experts_never_selected"] >= 0 for s in stats)
    assert all(s["sample"].startswith("def main(") for s in samples)
    assert f"step {samples[-1]['step']} sample: " in capsys.readouterr().out


def test_one_text_file_and_a_parquet_file_train_end_to_end(corpus, tmp_path):
    """The nanoGPT habit (`--data input.txt`) and a Parquet file with its own column name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [p.read_text() for p in sorted(corpus.iterdir())]
    single = tmp_path / "input.txt"
    single.write_text("\n\n".join(texts))
    assert main(train_args(single, tmp_path / "txt", tmp_path / "cache", steps=2)) == 0
    pq.write_table(pa.table({"content": texts}), tmp_path / "code.parquet")
    args = train_args(
        tmp_path / "code.parquet", tmp_path / "pq", tmp_path / "cache", steps=2, extra=["--text-field", "content"]
    )
    assert main(args) == 0
    data = json.loads((tmp_path / "pq" / "data.json").read_text())
    # documents with a piece held out train as their parts around it: at least as many documents as texts
    assert data["valid_documents"] >= 1 and data["train_documents"] + data["valid_documents"] >= len(texts)
