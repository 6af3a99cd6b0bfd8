"""`moeut train --parallel fsdp` (FSDP2 over CPU processes, gloo): the same training as one process and
as DDP for the same global batch; sharded checkpoints (Distributed Checkpoint) that resume on another
number of processes, in the other mode and after conversion, continuing the data from the same global
position; a failed sharded save that loses nothing; SIGTERM and resume."""

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from moeut.cli import main
from moeut.runs import load_run
from moeut.train import checkpoint as ckpt_lib

from .conftest import PY, train_args, wait_for_logged_steps
from .test_train import assert_same_training, losses

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def torchrun(n: int, args, timeout: int = 600, **popen):
    cmd = [PY, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={_port()}", "-m", "moeut", *args]
    if popen:
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_fsdp_trains_as_one_process_and_as_ddp(corpus, tmp_path):
    """Three AdamW steps with micro-batches (the reduce-scatter after the last one only): the weights
    and losses of FSDP over 2 processes (also with activation checkpointing, whose recomputation
    gathers the layer again, and with layers kept gathered through the forward), DDP over 2 and one
    process agree to float tolerance."""
    cache = tmp_path / "cache"
    args = lambda out, *extra: train_args(corpus, out, cache, steps=3, extra=["--micro-batch-size", "1", *extra])
    assert main(args(tmp_path / "single")) == 0
    torchrun(2, args(tmp_path / "fsdp", "--parallel", "fsdp"))
    torchrun(2, args(tmp_path / "fsdp_ac", "--parallel", "fsdp", "--activation-checkpointing"))
    torchrun(2, args(tmp_path / "fsdp_keep", "--parallel", "fsdp", "--fsdp-keep-gathered"))
    torchrun(2, args(tmp_path / "ddp"))
    single = load_run(tmp_path / "single")[0].state_dict()
    for other in ("fsdp", "fsdp_ac", "fsdp_keep", "ddp"):
        assert_same_training(load_run(tmp_path / other)[0].state_dict(), single, rtol=1e-4, atol=1e-5)
        ls, lo = losses(tmp_path / "single"), losses(tmp_path / other)
        assert ls.keys() == lo.keys() and all(abs(ls[s] - lo[s]) < 1e-4 for s in ls)


def _training_state(run: Path):
    return ckpt_lib.load_training_state(ckpt_lib.list_checkpoints(run)[-1])


def test_saved_with_4_processes_resumes_with_2_and_with_1(corpus, tmp_path):
    """An FSDP checkpoint is sharded: one safetensors file per process, written through Distributed
    Checkpoint. Resumed by FSDP on 2 processes (each reading its parts of the 4 files), by one plain
    process (whole tensors assembled), after conversion to the single layout, and after conversion to
    3 shard files resumed by FSDP on 2, it continues the run from the same global data position, and
    all continuations agree."""
    from moeut.train import shards as shard_lib

    cache = tmp_path / "cache"
    run4 = tmp_path / "run4"
    torchrun(4, train_args(corpus, run4, cache, steps=3, extra=["--parallel", "fsdp"]))
    newest = ckpt_lib.list_checkpoints(run4)[-1]
    assert ckpt_lib.checkpoint_layout(newest) == "sharded"
    assert sorted(p.name for p in (newest / shard_lib.SHARD_DIR).iterdir()) == [
        shard_lib.shard_file_name(i) for i in (1, 2, 3, 4)
    ]
    state = _training_state(run4)
    assert state["optimizer_keys"] == "names" and state["step"] == 3 and state["data_position"] == 3 * 4
    assert all(isinstance(k, str) for k in state["optimizer"]["state"])
    for name, how in (("two", "fsdp2"), ("one", "single"), ("converted", "single"), ("three", "fsdp2")):
        copy = tmp_path / name
        subprocess.run(["cp", "-r", str(run4), str(copy)], check=True)
        if name == "converted":
            assert main(["convert-checkpoint", str(copy), "--layout", "single"]) == 0
            assert ckpt_lib.checkpoint_layout(ckpt_lib.list_checkpoints(copy)[-1]) == "single"
        if name == "three":
            assert main(["convert-checkpoint", str(copy), "--layout", "sharded", "--shards", "3"]) == 0
        resume = ["train", "--resume", str(copy), "--steps", "5", "--cache-dir", str(cache), "--no-progress"]
        if how == "fsdp2":
            torchrun(2, resume + ["--parallel", "fsdp"])
        else:
            assert main(resume + ["--parallel", "ddp"]) == 0
        assert sorted(losses(copy)) == [1, 2, 3, 4, 5]
    one = load_run(tmp_path / "one")[0].state_dict()
    for other in ("two", "converted", "three"):
        assert_same_training(load_run(tmp_path / other)[0].state_dict(), one, rtol=1e-4, atol=1e-5, steps=2)
        lt, lo = losses(tmp_path / other), losses(tmp_path / "one")
        assert all(abs(lt[s] - lo[s]) < 1e-4 for s in (4, 5)), other


def test_a_failed_sharded_save_leaves_the_earlier_checkpoints_and_no_temporary(corpus, tmp_path, monkeypatch, capsys):
    """A process failing while the shards are written (here: after writing part of them) stops the run
    with the error named; the step's checkpoint does not appear, its temporary directory is gone, and
    the earlier checkpoint still verifies and resumes."""
    import moeut.train.loop as train_mod

    real, calls = train_mod.save_sharded_state, []

    def failing(model, opt, shard_dir):
        calls.append(1)
        if len(calls) == 2:
            Path(shard_dir).mkdir(parents=True, exist_ok=True)
            (Path(shard_dir) / "shard-00001-model-00001-of-00001.safetensors").write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real(model, opt, shard_dir)

    monkeypatch.setattr(train_mod, "save_sharded_state", failing)
    run, cache = tmp_path / "run", tmp_path / "cache"
    code = main(train_args(corpus, run, cache, steps=6, extra=["--parallel", "fsdp", "--ckpt-interval", "3"]))
    assert code != 0
    assert "No space left on device" in capsys.readouterr().err
    assert [p.name for p in ckpt_lib.list_checkpoints(run)] == ["step_00000003"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    ckpt_lib.verify_checkpoint(run / "checkpoints" / "step_00000003")
    monkeypatch.setattr(train_mod, "save_sharded_state", real)
    assert main(["train", "--resume", str(run), "--cache-dir", str(cache), "--no-progress", "--parallel", "fsdp"]) == 0
    assert ckpt_lib.checkpoint_step(ckpt_lib.list_checkpoints(run)[-1]) == 6


def test_a_one_process_checkpoint_resumes_under_fsdp(corpus, tmp_path):
    """Positions to names: a run started in one process continues under FSDP on 2 processes exactly as
    it continues in one process."""
    cache = tmp_path / "cache"
    base = tmp_path / "base"
    assert main(train_args(corpus, base, cache, steps=3)) == 0
    for name in ("plain", "sharded"):
        subprocess.run(["cp", "-r", str(base), str(tmp_path / name)], check=True)
    resume = lambda run: ["train", "--resume", str(run), "--steps", "5", "--cache-dir", str(cache), "--no-progress"]
    assert main(resume(tmp_path / "plain")) == 0
    torchrun(2, resume(tmp_path / "sharded") + ["--parallel", "fsdp"])
    assert_same_training(
        load_run(tmp_path / "sharded")[0].state_dict(),
        load_run(tmp_path / "plain")[0].state_dict(),
        rtol=1e-4,
        atol=1e-5,
        steps=2,
    )


def test_sigterm_under_fsdp_checkpoints_and_resumes_to_the_same_losses(corpus, tmp_path):
    cache = tmp_path / "cache"
    ref, run = tmp_path / "ref", tmp_path / "run"
    args = lambda out: train_args(corpus, out, cache, steps=8, extra=["--parallel", "fsdp", "--ckpt-interval", "100"])
    torchrun(2, args(ref))
    proc = torchrun(2, args(run), popen=True)
    wait_for_logged_steps(run, 3, proc, timeout=300)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
    out, _ = proc.communicate(timeout=300)
    assert "stopped by signal at step" in out, out[-3000:]
    stopped = int(out.split("stopped by signal at step ")[1].split(";")[0])
    assert stopped < 8 and (run / "checkpoints" / f"step_{stopped:08d}").is_dir()
    torchrun(2, ["train", "--resume", str(run), "--cache-dir", str(cache), "--no-progress"])
    lr, lo = losses(ref), losses(run)
    assert sorted(lo) == sorted(lr)
    assert all(abs(lr[s] - lo[s]) < 1e-5 for s in lr), (lr, lo)


def test_fsdp_refusals_are_named(corpus, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(train_args(corpus, tmp_path / "a", cache, extra=["--parallel", "fsdp", "--compile"])) == 2
    assert "--compile is not combined with --parallel fsdp" in capsys.readouterr().err
    assert main(train_args(corpus, tmp_path / "b", cache, extra=["--parallel", "fsdp", "--sample-tokens", "5"])) == 2
    assert "--sample-tokens" in capsys.readouterr().err
    assert main(train_args(corpus, tmp_path / "d", cache, extra=["--fsdp-keep-gathered"])) == 2
    assert "--fsdp-keep-gathered applies to --parallel fsdp only" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "d").exists()
    if not torch.cuda.is_available():
        assert main(train_args(corpus, tmp_path / "c", cache, steps=1, extra=["--parallel", "fsdp"])) == 0
        assert "FSDP2 over 1 process" in capsys.readouterr().out


def test_a_sharded_checkpoint_with_non_finite_weights_is_refused_by_name(corpus, tmp_path, capsys):
    """The usable-checkpoint test reads every piece of a sharded checkpoint (one tensor at a time) before
    an FSDP resume picks it, and the plain resume assembles whole tensors and checks them too."""
    import hashlib
    import json
    from moeut.train import shards as shard_lib

    run, cache = tmp_path / "run", tmp_path / "cache"
    assert main(train_args(corpus, run, cache, steps=2, extra=["--parallel", "fsdp", "--ckpt-interval", "2"])) == 0
    path = ckpt_lib.list_checkpoints(run)[-1]
    shard = path / shard_lib.SHARD_DIR / shard_lib.shard_file_name(1)
    with shard_lib.open_directory(shard.parent) as shards:
        pieces = {
            t: (shards.rows(t, 0, shards.shapes[t][0] if shards.shapes[t] else 0), [0] * len(shards.shapes[t]))
            for t in shards.pieces
        }
    name = next(t for t, (v, _) in pieces.items() if t.startswith("model.") and v.is_floating_point())
    pieces[name][0].view(-1)[0] = float("nan")
    shard_lib.write_shard(shard, pieces)
    manifest = json.loads((path / "manifest.json").read_text())
    data = shard.read_bytes()
    manifest["files"]["shards/" + shard.name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    resume = ["train", "--resume", str(run), "--steps", "4", "--cache-dir", str(cache), "--no-progress"]
    assert main(resume + ["--parallel", "fsdp"]) == 2
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and "non-finite values" in err and name in err
    assert main(resume) == 2
    assert "non-finite" in capsys.readouterr().err


def test_convert_checkpoint_command_checks_its_arguments_and_keeps_the_weights(corpus, tmp_path, capsys):
    run, cache = tmp_path / "run", tmp_path / "cache"
    assert main(train_args(corpus, run, cache, steps=2, extra=["--ckpt-interval", "2"])) == 0
    before = load_run(run)[0].state_dict()
    with pytest.raises(SystemExit):
        main(["convert-checkpoint", str(run), "--layout", "sharded", "--shards", "0"])
    assert "--shards: must be an integer from 1 to 4096" in capsys.readouterr().err
    assert main(["convert-checkpoint", str(run), "--layout", "sharded", "--step", "99"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert ckpt_lib.checkpoint_layout(ckpt_lib.list_checkpoints(run)[-1]) == "single"
    assert main(["convert-checkpoint", str(run), "--layout", "sharded", "--shards", "2"]) == 0
    assert "single -> sharded (2 shard files)" in capsys.readouterr().out
    after = load_run(run)[0].state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
