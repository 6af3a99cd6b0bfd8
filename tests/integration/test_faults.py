"""Fault injection: what an attacker or an unlucky user does to a run, and what must hold afterwards.

Each test asserts three things where they apply: nothing was lost (intact checkpoints stay, a resume
reproduces the uninterrupted losses), nothing ran (a pickle payload leaves no trace), and the
message names the problem (the flag, the file).
"""

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moeut.train import checkpoint as ckpt_lib
from moeut.cli import main
from moeut.train.run_dir import RunLock
from moeut.runs import load_run

from .conftest import PY, STEPS, train_args

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def losses(run: Path):
    return {r["step"]: r["loss"] for r in map(json.loads, open(run / "metrics.jsonl")) if "loss" in r}


def loss_steps(run: Path):
    return [r["step"] for r in map(json.loads, open(run / "metrics.jsonl")) if "loss" in r]


def resume(run: Path, cache: Path, *extra):
    return ["train", "--resume", str(run), "--no-progress", "--cache-dir", str(cache), *extra]


def leftovers(run: Path):
    return [p for p in run.rglob("*") if ".tmp" in p.name]


def payload_checkpoint(path: Path, marker: Path) -> None:
    """A torch.save'd dict whose unpickling would create `marker` (the classic __reduce__ payload)."""

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": "moeut-checkpoint-v1", "step": 3, "model": Payload()}, path)


# ------------------------------------------------------------------------------------------------
# Nothing we load can execute code.
# ------------------------------------------------------------------------------------------------


def test_pickle_payload_is_never_executed(finished, tmp_path, capsys):
    run, cache, _ = finished
    marker = tmp_path / "pwned"
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").mkdir()
    evil = run / "checkpoints" / "step_00000003.pt"
    payload_checkpoint(evil, marker)
    for argv in (
        ["generate", "--checkpoint", str(run), "--prompt", "x", "--max-new-tokens", "2"],
        ["eval", "--checkpoint", str(run), "--text", str(evil.parent.parent / "run.json")],
        ["generate", "--checkpoint", str(evil), "--prompt", "x"],
        resume(run, cache),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert str(evil) in err and "pickle" in err and "moeut migrate" in err, err
    with pytest.raises(ckpt_lib.CheckpointError, match="earlier pickle format"):
        load_run(run)
    # the explicit migration reads through the restricted unpickler: refused, still nothing run
    assert main(["migrate", str(run)]) == 2
    err = capsys.readouterr().err
    assert str(evil) in err and "not converted" in err and "nothing in it was run" in err
    assert evil.exists() and not marker.exists()


def test_legacy_checkpoint_migrates_and_resumes_exactly(reference, tmp_path, capsys):
    """A checkpoint of the earlier format (torch.save'd dict with NumPy RNG state) converts, without
    unpickling code, into one that resumes to the uninterrupted run's losses."""
    run, cache, want = reference
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    step3 = copy / "checkpoints" / "step_00000003"
    training = ckpt_lib.load_training_state(step3)
    name, keys, pos, has_gauss, cached = training["rng"]["numpy"]
    legacy = {
        "format": "moeut-checkpoint-v1",
        "step": 3,
        "model": ckpt_lib.load_model_state(step3),
        "optimizer": training["optimizer"],
        "scheduler": training["scheduler"],
        "rng": {**training["rng"], "numpy": (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)},
        "data_position": training["data_position"],
        "config": training["config"],
    }
    shutil.rmtree(copy / "checkpoints")
    (copy / "checkpoints").mkdir()
    torch.save(legacy, copy / "checkpoints" / "step_00000003.pt")
    data = json.loads((copy / "data.json").read_text())
    (copy / "data.json").write_text(json.dumps({"cache": str(cache / data["key"])}))  # the earlier record
    assert main(resume(copy, cache)) == 2  # refused until migrated
    assert main(["migrate", str(copy)]) == 0
    assert (copy / "checkpoints" / "legacy" / "step_00000003.pt").exists()
    assert [p.name for p in ckpt_lib.list_checkpoints(copy)] == ["step_00000003"]
    assert main(resume(copy, cache)) == 0
    assert losses(copy) == want


# ------------------------------------------------------------------------------------------------
# Verified checkpoints: damage is found, reported, and never spreads.
# ------------------------------------------------------------------------------------------------


def _damage_random_bytes(path: Path, n: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 2 - n // 2
    data[start : start + n] = random.Random(0).randbytes(n)
    path.write_bytes(bytes(data))


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 4] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage,file,expect",
    [
        (_damage_random_bytes, "model.safetensors", "does not match its SHA-256"),
        (_flip_bit, "model.safetensors", "does not match its SHA-256"),
        (_flip_bit, "training.safetensors", "does not match its SHA-256"),
        (_truncate, "training.safetensors", "truncated"),
        (lambda p: p.write_text("{}"), "training.json", "bytes"),
        (lambda p: p.unlink(), "manifest.json", "no manifest.json"),
    ],
)
def test_damaged_latest_checkpoint_falls_back_loudly_and_resumes_exactly(finished, capsys, damage, file, expect):
    run, cache, want = finished
    latest = run / "checkpoints" / "step_00000009"
    damage(latest / file)
    shutil.rmtree(run / "checkpoints" / "step_00000003")  # keep the test short: 6 is the fallback
    assert main(resume(run, cache)) == 0
    out = capsys.readouterr().out
    assert "step_00000009" in out and expect in out and "trying an older checkpoint" in out
    assert "resumed" in out and "step_00000006" in out
    assert (run / "checkpoints" / "step_00000009.damaged").is_dir()  # set aside, not deleted
    assert losses(run) == want and loss_steps(run) == list(range(1, STEPS + 1))
    ckpt_lib.verify_checkpoint(run / "checkpoints" / "step_00000009")  # rewritten, intact


def test_generate_and_eval_report_a_damaged_checkpoint_and_use_an_older_one(finished, capsys):
    run, _, _ = finished
    _damage_random_bytes(run / "checkpoints" / "step_00000009" / "model.safetensors")
    model, _, _ = load_run(run)
    err = capsys.readouterr().err
    assert "step_00000009" in err and "SHA-256" in err
    want = ckpt_lib.load_model_state(run / "checkpoints" / "step_00000006")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in want.items())
    # a checkpoint named explicitly is used or refused, never replaced by another
    assert main(["generate", "--checkpoint", str(run / "checkpoints" / "step_00000009"), "--prompt", "x"]) == 2
    assert "SHA-256" in capsys.readouterr().err


def test_no_intact_checkpoint_is_an_error_that_changes_nothing(finished, capsys):
    run, cache, _ = finished
    for p in ckpt_lib.list_checkpoints(run):
        _flip_bit(p / "model.safetensors")
    before = sorted(str(p) for p in run.rglob("*"))
    assert main(resume(run, cache)) == 2
    assert "no usable checkpoint" in capsys.readouterr().err
    assert sorted(str(p) for p in run.rglob("*")) == before


def test_deleted_latest_checkpoint_resumes_from_the_previous(finished):
    run, cache, want = finished
    shutil.rmtree(run / "checkpoints" / "step_00000009")
    assert main(resume(run, cache)) == 0
    assert losses(run) == want and loss_steps(run) == list(range(1, STEPS + 1))


def test_checkpoint_without_optimizer_state_is_refused_by_name(finished, capsys):
    run, cache, _ = finished
    ckpt = run / "checkpoints" / "step_00000009"
    tree = json.loads((ckpt / "training.json").read_text())
    tree["optimizer"] = None
    (ckpt / "training.json").write_text(json.dumps(tree))
    manifest = json.loads((ckpt / "manifest.json").read_text())  # a consistent manifest: not damage
    manifest["files"]["training.json"] = {
        "bytes": (ckpt / "training.json").stat().st_size,
        "sha256": hashlib.sha256((ckpt / "training.json").read_bytes()).hexdigest(),
    }
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    shutil.rmtree(run / "checkpoints" / "step_00000003")
    assert main(resume(run, cache)) == 2
    assert "has no optimizer state" in capsys.readouterr().err


def test_rotation_keeps_the_newest_intact_checkpoint_when_a_save_fails(finished, tmp_path, monkeypatch):
    """A save that fails verification deletes nothing."""
    run, _, _ = finished
    before = [p.name for p in ckpt_lib.list_checkpoints(run)]
    real = ckpt_lib.read_checkpoint

    def lying_disk(path, part="model", spec=None):
        if Path(path).name == "step_00000010":
            raise ckpt_lib.CheckpointError(f"checkpoint {path} is damaged: simulated")
        return real(path, part, spec)

    monkeypatch.setattr(ckpt_lib, "read_checkpoint", lying_disk)
    state = ckpt_lib.load_model_state(run / "checkpoints" / "step_00000009")
    training = ckpt_lib.load_training_state(run / "checkpoints" / "step_00000009")
    with pytest.raises(ckpt_lib.CheckpointError, match="simulated"):
        ckpt_lib.save_checkpoint(run, 10, state, {k: training[k] for k in ckpt_lib.TRAINING_KEYS}, keep=1)
    # the new step's directory is taken out again (it never verified) and nothing older was rotated out
    assert [p.name for p in ckpt_lib.list_checkpoints(run)] == before
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_non_finite_loss_stops_the_run_and_keeps_every_good_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    import moeut.train.loop as train_mod

    real, calls = train_mod.step_body, []

    def diverging(fwd, model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 8:  # step 8: the weights blow up
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return real(fwd, model, *args, **kwargs)

    monkeypatch.setattr(train_mod, "step_body", diverging)
    run = tmp_path / "run"
    assert (
        main(
            train_args(
                corpus, run, tmp_path / "cache", steps=12, extra=["--ckpt-interval", "2", "--keep-checkpoints", "2"]
            )
        )
        == 3
    )
    err = capsys.readouterr().err
    assert "non-finite at step 8" in err and "step_00000006" in err
    assert [p.name for p in ckpt_lib.list_checkpoints(run)] == ["step_00000004", "step_00000006"]
    for p in ckpt_lib.list_checkpoints(run):
        ckpt_lib.check_finite(ckpt_lib.load_model_state(p), str(p))
    assert max(loss_steps(run)) == 7  # the non-finite step is not logged as a loss


# ------------------------------------------------------------------------------------------------
# Crashes: kill -9 anywhere, a file-size limit mid-write.
# ------------------------------------------------------------------------------------------------


def test_kill_9_at_random_points_then_resume_reproduces_the_losses(corpus, reference, tmp_path):
    """Five kill -9s, each at a random moment after the trainer logged a new step (so inside steps,
    evaluations and checkpoint writes alike), then a resume: the losses of an uninterrupted run,
    each step logged once, and no temporary file left."""
    _, cache, _ = reference
    steps = 90
    extra = ["--ckpt-interval", "1", "--keep-checkpoints", "2", "--log-interval", "1", "--eval-interval", "25"]
    full = tmp_path / "full"
    assert main(train_args(corpus, full, cache, steps=steps, extra=extra)) == 0
    run = tmp_path / "run"
    rng = random.Random(1234)
    kills = 0
    for _ in range(5):
        argv = (
            resume(run, cache)
            if (run / "run.json").exists()
            else train_args(corpus, run, cache, steps=steps, extra=extra)
        )
        logged = len(loss_steps(run)) if (run / "metrics.jsonl").exists() else 0
        proc = subprocess.Popen(
            [PY, "-m", "moeut", *argv], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if (run / "metrics.jsonl").exists() and len(loss_steps(run)) > logged:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait()
    assert kills >= 4
    assert main(resume(run, cache)) == 0
    assert losses(run) == losses(full)
    assert loss_steps(run) == list(range(1, steps + 1))  # each step once
    assert leftovers(run) == []


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE semantics")
def test_file_size_limit_during_a_checkpoint_write_loses_nothing(corpus, reference, tmp_path):
    import resource

    _, cache, want = reference
    run = tmp_path / "run"
    assert main(train_args(corpus, run, cache, steps=STEPS, extra=["--stop-after", "3"])) == 0
    good = {p.name: {f.name: f.read_bytes() for f in p.iterdir()} for p in ckpt_lib.list_checkpoints(run)}
    limit = (run / "checkpoints" / "step_00000003" / "model.safetensors").stat().st_size + 1000

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [PY, "-m", "moeut", *resume(run, cache)],
        env=ENV,
        preexec_fn=small_files,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "File too large" in proc.stderr and "Traceback" not in proc.stderr
    assert {p.name: {f.name: f.read_bytes() for f in p.iterdir()} for p in ckpt_lib.list_checkpoints(run)} == good
    assert leftovers(run / "checkpoints") == []
    assert main(resume(run, cache)) == 0
    assert losses(run) == want


# ------------------------------------------------------------------------------------------------
# One writer per run.
# ------------------------------------------------------------------------------------------------


def test_a_second_trainer_on_a_run_is_refused_naming_the_holder(finished, corpus, tmp_path, capsys):
    run, cache, _ = finished
    with RunLock(run):
        assert main(resume(run, cache)) == 2
        err = capsys.readouterr().err
        assert "in use by another trainer" in err and f"PID {os.getpid()}" in err
    # a live trainer in another process
    proc = subprocess.Popen(
        [PY, "-m", "moeut", *train_args(corpus, tmp_path / "busy", cache, steps=10_000)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (tmp_path / "busy" / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.1)
        assert main(resume(tmp_path / "busy", cache)) == 2
        assert f"PID {proc.pid}" in capsys.readouterr().err
        assert main(train_args(corpus, tmp_path / "busy", cache, steps=5)) == 2  # a second start
        assert "already holds a run" in capsys.readouterr().err
    finally:
        proc.kill()
        proc.wait()
    # the kernel released the dead trainer's lock
    with RunLock(tmp_path / "busy"):
        pass


# ------------------------------------------------------------------------------------------------
# Untrusted run directories.
# ------------------------------------------------------------------------------------------------


def test_paths_recorded_in_a_run_are_not_followed(finished, tmp_path, capsys):
    run, _, _ = finished
    meta = json.loads((run / "run.json").read_text())
    elsewhere = tmp_path / "elsewhere"
    meta["config"]["data"] = ["/etc"]
    meta["config"]["cache_dir"] = str(elsewhere)
    (run / "run.json").write_text(json.dumps(meta))
    assert main(["train", "--resume", str(run), "--no-progress", "--cache-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "/etc" in err
    assert not elsewhere.exists()


def test_symlinks_in_a_run_directory_are_refused(finished, tmp_path, capsys):
    run, cache, _ = finished
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(victim)
    assert main(resume(run, cache)) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert victim.read_text() == "precious\n"


def test_a_huge_model_in_run_json_is_refused_before_allocation(finished, capsys):
    run, cache, _ = finished
    meta = json.loads((run / "run.json").read_text())
    meta["model_kwargs"]["d_model"] = 100_000_000
    (run / "run.json").write_text(json.dumps(meta))
    t0 = time.time()
    assert main(["generate", "--checkpoint", str(run), "--prompt", "x"]) == 2
    assert "d_model must be from 0 to 1048576" in capsys.readouterr().err  # named before anything is built
    meta["model_kwargs"]["d_model"] = 1_000_000  # in range: then the memory bound or the shapes
    (run / "run.json").write_text(json.dumps(meta))
    assert main(["generate", "--checkpoint", str(run), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "GiB" in err or "does not fit this model" in err
    shutil.rmtree(run / "checkpoints")  # no checkpoint: the memory bound catches it
    meta["config"]["overrides"]["d_model"] = 1_000_000
    (run / "run.json").write_text(json.dumps(meta))
    assert main(resume(run, cache)) == 2
    assert "GiB" in capsys.readouterr().err
    assert time.time() - t0 < 60


# ------------------------------------------------------------------------------------------------
# Every input checked before any work and before anything is written.
# ------------------------------------------------------------------------------------------------


def _train_fails(argv, capsys, out: Path, *names, needs_data: bool = False):
    """Exit status 2, the names in the message, no traceback; unless the check `needs_data` (the
    tokenized corpus), it came before any work (no tokenizer trained)."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    for name in names:
        assert name in captured.err, captured.err
    assert "Traceback" not in captured.err
    assert needs_data or "tokenizer" not in captured.out


@pytest.mark.parametrize(
    "extra,names,needs_data",
    [
        (["--set", "foo=1"], ["foo"], False),
        (["--set", "d_model=-4"], ["d_model"], False),
        (["--micro-batch-size", "3"], ["--micro-batch-size"], False),
        (["--context", "1000000"], ["fewer than one context"], True),
    ],
)
def test_bad_train_settings_fail_first_and_leave_nothing(corpus, tmp_path, capsys, extra, names, needs_data):
    out = tmp_path / "run"
    _train_fails(train_args(corpus, out, tmp_path / "cache", extra=extra), capsys, out, *names, needs_data=needs_data)
    assert not out.exists()


def test_too_large_a_vocabulary_fails_before_the_run_exists(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    _train_fails(
        train_args(corpus, out, tmp_path / "cache", extra=["--vocab-size", "60000"]),
        capsys,
        out,
        "--vocab-size 60000",
        "at most",
        needs_data=True,
    )
    assert not out.exists()
    # a re-run into the same place with a valid vocabulary starts cleanly with its own tokenizer
    assert main(train_args(corpus, out, tmp_path / "cache", steps=1)) == 0
    assert json.loads((out / "run.json").read_text())["vocab_size"] == 400


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--steps", "-5"),
        ("--steps", "0"),
        ("--batch-size", "0"),
        ("--lr", "-1"),
        ("--lr", "nan"),
        ("--context", "0"),
        ("--clip", "-1"),
        ("--keep-checkpoints", "0"),
        ("--vocab-size", "70000"),
    ],
)
def test_out_of_range_train_flags_are_refused_by_name(corpus, tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(train_args(corpus, out, tmp_path / "cache") + [flag, value])
    assert e.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
    assert not out.exists()


def test_out_at_a_file_or_a_foreign_directory_is_refused(corpus, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("mine")
    _train_fails(train_args(corpus, f, tmp_path / "cache"), capsys, f, "is a file")
    assert f.read_text() == "mine"
    d = tmp_path / "mine"
    d.mkdir()
    (d / "run.txt").write_text("notes")
    (d / "metrics.jsonl").write_text("my metrics\n")
    _train_fails(train_args(corpus, d, tmp_path / "cache"), capsys, d, "other files")
    assert (d / "metrics.jsonl").read_text() == "my metrics\n" and sorted(p.name for p in d.iterdir()) == [
        "metrics.jsonl",
        "run.txt",
    ]


def test_flags_that_would_change_a_resumed_run_are_refused(finished, capsys):
    run, cache, _ = finished
    assert main(resume(run, cache, "--steps", "60", "--lr", "0.1")) == 2
    err = capsys.readouterr().err
    assert "--lr" in err and "--steps" not in err  # --steps may change (it extends the run); --lr may not


def test_resume_with_more_steps_extends_the_run_and_says_how(finished, capsys):
    """A finished 9-step run resumed with --steps 12 trains steps 10-12 on the schedule recomputed over 12
    steps (stated), and records the new length; fewer steps than done is refused by name."""
    run, cache, want = finished
    assert main(resume(run, cache, "--steps", "5")) == 2
    assert "--steps 5: the run is already at step 9" in capsys.readouterr().err
    assert main(resume(run, cache, "--steps", "12")) == 0
    out = capsys.readouterr().out
    assert "extending the run from 9 to 12 steps: the cosine schedule now spans 12 steps" in out
    assert sorted(losses(run)) == list(range(1, 13)) and all(losses(run)[s] == want[s] for s in range(1, 10))
    assert json.loads((run / "run.json").read_text())["config"]["steps"] == 12
    assert ckpt_lib.checkpoint_step(ckpt_lib.list_checkpoints(run)[-1]) == 12


def test_read_only_run_directory_is_a_clear_error(finished):
    """The run directory on a read-only mount (a private mount namespace; root ignores file modes)."""
    run, cache, _ = finished
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    script = f"mount --bind {run} {run} && mount -o remount,ro,bind {run} && exec {PY} -m moeut " + " ".join(
        resume(run, cache)
    )
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], env=ENV, capture_output=True, text=True, timeout=300)
    if "mount:" in proc.stderr or "unshare:" in proc.stderr:
        pytest.skip(f"cannot make a read-only mount here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 2, proc.stderr
    assert "not writable" in proc.stderr and str(run) in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture
def trained(reference):
    return reference[0]


@pytest.mark.parametrize(
    "extra,names",
    [
        (["--temperature", "-1"], ["--temperature"]),
        (["--top-p", "2"], ["--top-p"]),
        (["--top-p", "0"], ["--top-p"]),
        (["--top-k", "-5"], ["--top-k"]),
        (["--max-new-tokens", "1e9"], ["--max-new-tokens"]),
        (["--max-new-tokens", "-1"], ["--max-new-tokens"]),
    ],
)
def test_bad_generate_flags_are_refused_by_name(trained, capsys, extra, names):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--checkpoint", str(trained), "--prompt", "x", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert all(n in err for n in names) and "Traceback" not in err


def test_generate_refuses_a_kv_cache_larger_than_memory(trained, capsys):
    assert main(["generate", "--checkpoint", str(trained), "--prompt", "x", "--max-new-tokens", "1000000000000"]) == 2
    err = capsys.readouterr().err
    assert "--max-new-tokens" in err and "GiB" in err


def test_bad_prompt_files_are_refused_naming_the_file(trained, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café\n".encode("latin-1"))
    for path, what in ((empty, "holds no prompt"), (latin, "not valid UTF-8"), (tmp_path / "absent", "absent")):
        assert main(["generate", "--checkpoint", str(trained), "--prompt-file", str(path)]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and what in err and "Traceback" not in err


def test_bad_eval_inputs_are_refused_by_name(trained, tmp_path, capsys):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café\n".encode("latin-1"))
    for argv, what in (
        (["--text", str(latin)], str(latin)),
        (["--text", str(tmp_path / "nope")], "no such file"),
        (["--tasks", "lambada"], "--data-dir"),
        (["--tasks", "bogus"], "bogus"),
        (["--text", str(trained / "run.json"), "--json", str(tmp_path)], "--json"),
    ):
        assert main(["eval", "--checkpoint", str(trained), *argv]) == 2
        err = capsys.readouterr().err
        assert what in err and "Traceback" not in err, err


def test_debug_shows_the_traceback(trained, capsys):
    with pytest.raises(ValueError, match="holds no prompt"):
        empty = trained.parent / "empty-prompts.txt"
        empty.write_text("")
        main(["generate", "--checkpoint", str(trained), "--prompt-file", str(empty), "--debug"])


# ------------------------------------------------------------------------------------------------
# Data hygiene.
# ------------------------------------------------------------------------------------------------


def test_non_utf8_and_binary_data_files_are_replaced_skipped_or_refused(corpus, tmp_path, capsys):
    """--decode-errors: replace (the default: read with U+FFFD, counted in the summary), skip (the file
    left out, named), strict (refused, named). A binary file is never read as text."""
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    (data / "latin1.txt").write_bytes("naïve café résumé\n".encode("latin-1") * 50)
    (data / "blob.txt").write_bytes(bytes(range(256)) * 20)
    out = tmp_path / "run"
    assert main(train_args(data, out, tmp_path / "cache", steps=1)) == 0
    printed = capsys.readouterr().out
    assert "skipping" in printed and "blob.txt is a binary file" in printed
    assert "characters that were not UTF-8 replaced in 1 file(s)" in printed
    skip = tmp_path / "skip"
    assert main(train_args(data, skip, tmp_path / "cache", steps=1, extra=["--decode-errors", "skip"])) == 0
    printed = capsys.readouterr().out
    assert "skipping" in printed and "latin1.txt is not valid UTF-8" in printed
    from moeut.train.tokenizer import Tokenizer

    tok = Tokenizer(skip / "tokenizer.model")
    assert not any("\ufffd" in tok.sp.id_to_piece(i) for i in range(tok.vocab_size))
    strict = tmp_path / "strict"
    assert main(train_args(data, strict, tmp_path / "cache", steps=1, extra=["--strict-data"])) == 2
    err = capsys.readouterr().err
    assert "--decode-errors strict" in err and ("latin1.txt" in err or "blob.txt" in err)
    assert not strict.exists()
