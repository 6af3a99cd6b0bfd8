"""Runs that cannot be lost, round two: one test (or a few) for each fault an attacker or an unlucky
user found in the first round's guarantees, numbered as they were reported:

 1. two starts racing for one --out          6. a file swapped between its check and its use
 2. shard pieces that overlap or leave gaps   7. small inputs that would multiply into huge work
 3. a NaN state saved over a good one         8. bad flags and hostile values in a run's files
 4. checkpoints intact but unusable           9. re-saves, quarantine order, steps, dtypes, rotation
 5. malformed JSON inside a checkpoint

Each asserts what must hold afterwards: nothing lost or overwritten, a one-line error naming the
file, the field or the flag, and (where a checkpoint is at fault) the next usable one taken.
"""

import gzip
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from moeut.cli import main
from moeut.runs import load_run
from moeut.train import checkpoint as ckpt_lib
from moeut.train import checkpoint_reader
from moeut.train import shards as shard_lib

from .conftest import PY, train_args

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def tree_digest(root: Path) -> dict:
    """{relative path: sha256 or link target} of everything under `root`."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def rehash(ckpt: Path) -> None:
    """Recompute the manifest's sizes and hashes after a file of `ckpt` was edited (an attacker would)."""
    manifest = json.loads((ckpt / ckpt_lib.MANIFEST_FILE).read_text())
    for name in manifest["files"]:
        data = (ckpt / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / ckpt_lib.MANIFEST_FILE).write_text(json.dumps(manifest))


def resave(run: Path, step: int, model_edit=None, training_edit=None) -> None:
    """Checkpoint `step` written again, whole and with valid hashes, after editing its state."""
    ck = ckpt_lib.read_checkpoint(step_dir(run, step), "all")
    model, training = ck.model, ck.training
    training.pop("step")
    if model_edit:
        model_edit(model)
    if training_edit:
        training_edit(training)
    ckpt_lib.save_checkpoint(run, step, model, training, keep=100)


def resume(run: Path, cache: Path, *extra):
    return ["train", "--resume", str(run), "--no-progress", "--cache-dir", str(cache), *extra]


def poison_weight(state):
    name = next(k for k in state if state[k].is_floating_point())
    state[name].view(-1)[0] = float("nan")


# ------------------------------------------------------------------------------------------------
# 1. A start race never deletes what another process wrote.
# ------------------------------------------------------------------------------------------------


def test_1_a_start_that_loses_the_race_leaves_the_winners_run_byte_identical(
    reference, corpus, tmp_path, monkeypatch, capsys
):
    """The second start passes its first check (the directory is empty), then the winner's complete run
    appears before the loser takes the lock: the loser must refuse and delete nothing of it."""
    from moeut.train import trainer

    winner, cache, _ = reference
    out = tmp_path / "out"
    real = trainer.check_tokens

    def winner_finishes_meanwhile(*args, **kwargs):
        real(*args, **kwargs)
        shutil.copytree(winner, out, dirs_exist_ok=True)  # its run.json, tokenizer, data.json, .lock, ...

    monkeypatch.setattr(trainer, "check_tokens", winner_finishes_meanwhile)
    before = tree_digest(winner)
    code = main(train_args(corpus, out, cache))
    assert code == 2 and "already holds a run" in capsys.readouterr().err
    assert tree_digest(out) == before  # every file of the winner's run, as it was
    model, _, meta = load_run(out)
    assert meta["loaded_checkpoint"]["step"] == 9


def test_1_two_starts_on_one_out_give_one_run_and_one_clear_refusal(corpus, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    cmd = [PY, "-m", "moeut", *train_args(corpus, out, cache, steps=4)]
    procs = [
        subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refusal = next(err for code, err in results if code == 2)
    assert "in use by another trainer" in refusal or "already holds a run" in refusal, refusal
    _, _, meta = load_run(out)
    assert meta["loaded_checkpoint"]["step"] == 4


# ------------------------------------------------------------------------------------------------
# 2. Shard pieces must tile every tensor exactly, checked before any read.
# ------------------------------------------------------------------------------------------------


def _sharded_copy(finished):
    run, cache, _ = finished
    meta = json.loads((run / "run.json").read_text())
    from moeut.models import build_model, model_kwargs_of_run
    from moeut.train.loop import optimizer_parameter_names

    with torch.device("meta"):
        model = build_model(meta["model"], meta["vocab_size"], model_kwargs_of_run(meta))
    spec = ckpt_lib.ModelSpec.of(model, optimizer_parameter_names(model))
    ckpt_lib.convert_checkpoint(run, step_dir(run, 9), "sharded", spec, shards=2, report=lambda m: None)
    return run, cache, spec


def _overwrite_piece(shard_file: Path, tensor: str, offset0: int) -> None:
    """Rewrite one shard file with `tensor`'s piece moved to start at row `offset0` (all else kept)."""
    with shard_lib.open_directory(shard_file.parent) as shards:
        pieces = {}
        for name, plist in shards.pieces.items():
            for p in plist:
                if p.file == shard_file.name:
                    rows = p.entry.shape[0] if p.entry.shape else 0
                    data = shards.rows(name, p.start, p.start + rows) if p.entry.shape else shards.rows(name, 0, 0)
                    start = offset0 if name == tensor else p.start
                    pieces[name] = (data, [start] + [0] * (len(p.entry.shape) - 1) if p.entry.shape else [])
    shard_lib.write_shard(shard_file, pieces)


@pytest.mark.parametrize("shift", [-1, 1], ids=["overlap", "gap"])
def test_2_overlapping_or_gapped_pieces_are_refused_before_any_read_and_the_older_checkpoint_used(
    finished, shift, tmp_path, capsys
):
    run, _, spec = _sharded_copy(finished)
    ckpt = step_dir(run, 9)
    second = ckpt / "shards" / shard_lib.shard_file_name(2)
    tensor = "model.transformer.layers.0.ffn.keys"
    with shard_lib.open_directory(second.parent) as shards:
        start = next(p.start for p in shards.pieces[tensor] if p.file == second.name)
    _overwrite_piece(second, tensor, start + shift)
    rehash(ckpt)
    with pytest.raises(ckpt_lib.CheckpointError, match="pieces of model.transformer.layers.0.ffn.keys do not tile"):
        ckpt_lib.load_model_state(ckpt)
    _, _, meta = load_run(run)
    assert meta["loaded_checkpoint"]["step"] == 6 and "step_00000009" in capsys.readouterr().err
    # the export writes the older, usable weights, never memory that no file filled
    pytest.importorskip("transformers")
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    older = ckpt_lib.load_model_state(step_dir(run, 6))
    assert all(torch.equal(exported["lm." + k], v) for k, v in older.items())


# ------------------------------------------------------------------------------------------------
# 3. The state is checked finite after the update, before it is saved.
# ------------------------------------------------------------------------------------------------


def test_3_a_poisoned_optimizer_state_stops_the_run_without_saving_and_names_the_last_good_checkpoint(finished, capsys):
    """A negative second moment is finite, so the checkpoint is usable, but its update makes every
    weight NaN from a finite loss: nothing may be saved, the good checkpoints stay, and the message
    names one that really is usable."""
    run, cache, _ = finished

    def negative_moments(training):
        for entry in training["optimizer"]["state"].values():
            entry["exp_avg_sq"].fill_(-1.0)

    resave(run, 6, training_edit=negative_moments)
    shutil.rmtree(step_dir(run, 9))
    before = {p.name: tree_digest(p) for p in ckpt_lib.list_checkpoints(run)}
    # a stop after one step saves at once: the update made NaN weights from a finite loss
    assert main(resume(run, cache, "--stop-after", "1")) == 3
    err = capsys.readouterr().err
    assert "weights or the optimizer state became non-finite at step 7" in err and "nothing was saved" in err
    assert "newest usable checkpoint, step_00000006" in err
    assert {p.name: tree_digest(p) for p in ckpt_lib.list_checkpoints(run)} == before
    # without the stop, the next step's loss is NaN: the same end, named by the loss
    assert main(resume(run, cache)) == 3
    err = capsys.readouterr().err
    assert "became non-finite at step 8" in err and "newest usable checkpoint, step_00000006" in err
    assert {p.name: tree_digest(p) for p in ckpt_lib.list_checkpoints(run)} == before


# ------------------------------------------------------------------------------------------------
# 4. Every reader falls back past a checkpoint that is intact (hashes match) but unusable.
# ------------------------------------------------------------------------------------------------


def _wrong_shape(state):
    name = next(k for k in state if state[k].dim() == 2)
    state[name] = torch.zeros(state[name].shape[0] + 1, state[name].shape[1])


def _bad_header(run):
    f = step_dir(run, 9) / ckpt_lib.MODEL_FILE
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    data[8 : 8 + n] = b"{" + b" " * (n - 1)  # a header that is not JSON, same length
    f.write_bytes(bytes(data))
    rehash(step_dir(run, 9))


@pytest.mark.parametrize("fault", ["nan weight", "wrong shape", "bad header"])
def test_4_eval_generate_and_resume_take_the_previous_checkpoint_past_an_unusable_one(finished, fault, capsys):
    run, cache, want = finished
    if fault == "nan weight":
        resave(run, 9, model_edit=poison_weight)
    elif fault == "wrong shape":
        resave(run, 9, model_edit=_wrong_shape)
    else:
        _bad_header(run)
    manifest = json.loads((step_dir(run, 9) / ckpt_lib.MANIFEST_FILE).read_text())
    for name, rec in manifest["files"].items():  # its hashes all match: only the content is wrong
        assert hashlib.sha256((step_dir(run, 9) / name).read_bytes()).hexdigest() == rec["sha256"]
    reason = {"nan weight": "non-finite", "wrong shape": "shape mismatch", "bad header": "not valid JSON"}[fault]
    _, _, meta = load_run(run)
    err = capsys.readouterr().err
    assert meta["loaded_checkpoint"]["step"] == 6 and "step_00000009" in err and reason in err, err
    assert main(["generate", "--checkpoint", str(run), "--prompt", "x", "--max-new-tokens", "2"]) == 0
    assert main(resume(run, cache)) == 0
    out = capsys.readouterr().out
    assert "step_00000009" in out and reason in out and "moved the unusable checkpoint" in out
    got = {r["step"]: r["loss"] for r in map(json.loads, open(run / "metrics.jsonl")) if "loss" in r}
    assert got == want  # the resumed run reproduces the uninterrupted one


# ------------------------------------------------------------------------------------------------
# 5. Malformed JSON inside a checkpoint: one named error, then the older checkpoint.
# ------------------------------------------------------------------------------------------------

MANIFEST_FAULTS = {
    "an entry that is a number": (lambda m: m["files"].__setitem__("training.json", 7), "files['training.json']"),
    "files that is a list": (lambda m: m.__setitem__("files", ["model.safetensors"]), "files"),
    "a huge integer": (lambda m: m.__setitem__("step", 10**5000), "not valid JSON"),
    "deep nesting": (lambda m: m.__setitem__("loss", json.loads("[" * 200 + "]" * 200)), "nests deeper"),
    "a negative step": (lambda m: m.__setitem__("step", -9), "step"),
}


@pytest.mark.parametrize("fault", list(MANIFEST_FAULTS))
def test_5_a_malformed_manifest_is_named_and_skipped(finished, fault, capsys):
    run, _, _ = finished
    path = step_dir(run, 9) / ckpt_lib.MANIFEST_FILE
    edit, named = MANIFEST_FAULTS[fault]
    manifest = json.loads(path.read_text())
    if fault == "a huge integer":
        path.write_text(json.dumps(manifest).replace('"step": 9', '"step": ' + "9" * 5000))
    else:
        edit(manifest)
        path.write_text(json.dumps(manifest))
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        ckpt_lib.verify_checkpoint(step_dir(run, 9))
    assert named in str(e.value) and "manifest.json" in str(e.value) and "\n" not in str(e.value)
    assert load_run(run)[2]["loaded_checkpoint"]["step"] == 6


def _edit_training_json(ckpt: Path, edit) -> None:
    path = ckpt / ckpt_lib.TRAINING_JSON_FILE
    tree = json.loads(path.read_text())
    edit(tree)
    path.write_text(json.dumps(tree))
    rehash(ckpt)


TRAINING_FAULTS = {
    "optimizer state that is a list": (lambda t: t["optimizer"].__setitem__("state", [1, 2]), "optimizer.state"),
    "a string step": (lambda t: t.__setitem__("step", "9"), "step"),
    "a step of another directory": (lambda t: t.__setitem__("step", 6), "not the step of its directory"),
    "a param group without params": (lambda t: t["optimizer"]["param_groups"][0].pop("params"), "param_groups[0]"),
    "a dangling tensor reference": (lambda t: t.__setitem__("scheduler", {"$tensor": "nowhere"}), "'nowhere'"),
    "an unknown tag": (lambda t: t.__setitem__("rng", {"$pickle": "x"}), "tags"),
    "deep nesting": (lambda t: t["config"].__setitem__("x", json.loads("[" * 100 + "]" * 100)), "nests deeper"),
}


@pytest.mark.parametrize("fault", list(TRAINING_FAULTS))
def test_5_a_malformed_training_json_is_named_and_the_resume_takes_the_older_checkpoint(finished, fault, capsys):
    run, cache, want = finished
    edit, named = TRAINING_FAULTS[fault]
    _edit_training_json(step_dir(run, 9), edit)
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        ckpt_lib.load_training_state(step_dir(run, 9))
    assert named in str(e.value) and "training.json" in str(e.value), str(e.value)
    assert main(resume(run, cache)) == 0
    assert "skipping checkpoint step_00000009" in capsys.readouterr().out


def test_5_moments_of_the_wrong_shape_are_refused_with_the_parameter_named(finished):
    run, _, _ = finished
    meta = json.loads((run / "run.json").read_text())
    from moeut.models import build_model, model_kwargs_of_run
    from moeut.train.loop import optimizer_parameter_names

    with torch.device("meta"):
        model = build_model(meta["model"], meta["vocab_size"], model_kwargs_of_run(meta))
    spec = ckpt_lib.ModelSpec.of(model, optimizer_parameter_names(model))

    def squash(training):
        training["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)

    resave(run, 9, training_edit=squash)
    with pytest.raises(ckpt_lib.CheckpointError, match=f"{spec.parameters[0]}.exp_avg is torch.float32 \\(3,\\)"):
        ckpt_lib.read_checkpoint(step_dir(run, 9), "all", spec)


# ------------------------------------------------------------------------------------------------
# 6. A file is opened once, following no link; temporaries are unpredictable; appends break hard links.
# ------------------------------------------------------------------------------------------------


def test_6_a_file_swapped_for_a_link_after_its_check_is_never_read(finished, tmp_path, monkeypatch):
    """Between hashing and parsing, the model file is replaced by a link to another valid checkpoint's
    weights; the reader keeps reading the file it hashed."""
    run, _, _ = finished
    ckpt = step_dir(run, 9)
    want = ckpt_lib.load_model_state(ckpt)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(step_dir(run, 3) / ckpt_lib.MODEL_FILE, outside)
    real = checkpoint_reader.hash_fd
    swapped = []

    def hash_then_swap(fd):
        digest = real(fd)
        target = ckpt / ckpt_lib.MODEL_FILE
        if not swapped and os.fstat(fd).st_ino == os.stat(target).st_ino:
            target.rename(tmp_path / "moved-away")
            os.symlink(outside, target)
            swapped.append(True)
        return digest

    monkeypatch.setattr(checkpoint_reader, "hash_fd", hash_then_swap)
    got = ckpt_lib.load_model_state(ckpt)
    assert swapped and all(torch.equal(got[k], v) for k, v in want.items())
    monkeypatch.setattr(checkpoint_reader, "hash_fd", real)
    with pytest.raises(ckpt_lib.CheckpointError, match="symbolic link"):  # and the link itself is refused
        ckpt_lib.load_model_state(ckpt)


def test_6_migrate_refuses_a_linked_legacy_directory_and_moves_nothing_out(finished, tmp_path, capsys):
    run, _, _ = finished
    ck = ckpt_lib.read_checkpoint(step_dir(run, 3), "all")
    legacy = {
        "format": "moeut-checkpoint-v1",
        "step": 3,
        "model": ck.model,
        **{k: ck.training[k] for k in ("optimizer", "scheduler", "data_position", "config")},
        "rng": ck.training["rng"],
    }
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").mkdir()
    torch.save(legacy, run / "checkpoints" / "step_00000003.pt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, run / "checkpoints" / "legacy")
    assert main(["migrate", str(run)]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert (run / "checkpoints" / "step_00000003.pt").is_file() and not list(elsewhere.iterdir())


def test_6_atomic_writes_use_fresh_exclusive_temporaries_and_never_follow_a_planted_link(tmp_path):
    from moeut.files import write_file_atomic

    victim = tmp_path / "victim"
    victim.write_text("keep me")
    target = tmp_path / "run.json"
    for guess in (f"run.json.tmp-{os.getpid()}", ".run.json.tmp", "run.json.tmp"):  # the old names, planted
        os.symlink(victim, tmp_path / guess)
    seen = set()
    real_replace = os.replace

    def spy(src, dst):
        seen.add(Path(src).name)
        return real_replace(src, dst)

    os.replace = spy
    try:
        for i in range(3):
            write_file_atomic(target, f"{i}".encode())
    finally:
        os.replace = real_replace
    assert victim.read_text() == "keep me" and target.read_text() == "2"
    assert len(seen) == 3 and not any(n.endswith(f"tmp-{os.getpid()}") for n in seen)
    assert oct(target.stat().st_mode & 0o777) == oct(0o644 & ~_umask())


def _umask():
    u = os.umask(0)
    os.umask(u)
    return u


def test_6_resuming_a_hard_linked_copy_never_writes_into_the_original(reference, tmp_path, capsys):
    run, cache, _ = reference
    original = tmp_path / "original"
    shutil.copytree(run, original)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-al", str(original), str(copy)], check=True)  # `cp -al`: every file shared
    before = tree_digest(original)
    assert main(resume(copy, cache, "--steps", "12")) == 0
    assert "hard links" in capsys.readouterr().out
    assert tree_digest(original) == before
    assert sum('"loss"' in line for line in (copy / "metrics.jsonl").read_text().splitlines()) == 12


# ------------------------------------------------------------------------------------------------
# 7. Bounds on everything a small input can multiply.
# ------------------------------------------------------------------------------------------------


def test_7_a_huge_shard_count_is_refused_at_once(finished, capsys):
    run, _, _ = finished
    before = tree_digest(run)
    with pytest.raises(SystemExit) as e:  # argparse's own one-line refusal
        main(["convert-checkpoint", str(run), "--layout", "sharded", "--shards", "1000000000"])
    assert e.value.code == 2
    assert "--shards: must be an integer from 1 to 4096" in capsys.readouterr().err and tree_digest(run) == before
    with pytest.raises(ckpt_lib.CheckpointError, match="from 1 to 4096"):  # and the library function too
        ckpt_lib.convert_checkpoint(run, step_dir(run, 9), "sharded", ckpt_lib.ModelSpec({}), shards=10**9)


def test_7_a_compressed_line_that_inflates_past_the_document_limit_is_refused(tmp_path, capsys):
    from moeut.train.sources import MAX_DOCUMENT_BYTES

    bomb = tmp_path / "bomb.jsonl.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        f.write(b'{"text": "' + b"a" * (MAX_DOCUMENT_BYTES + 10) + b'"}\n')
    assert bomb.stat().st_size < 1 << 20
    assert (
        main(
            [
                "train",
                "--data",
                str(bomb),
                "--out",
                str(tmp_path / "run"),
                "--steps",
                "1",
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == 2
    )
    assert "bomb.jsonl.gz:1: a line longer than 64 MiB" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_7_eval_text_refuses_binary_and_oversized_files_without_reading_them(reference, tmp_path, capsys):
    run, _, _ = reference
    sparse = tmp_path / "sparse.txt"
    with open(sparse, "wb") as f:
        f.truncate(5 << 30)  # 5 GB of NULs that take no disk
    nuls = tmp_path / "nuls.txt"
    nuls.write_bytes(b"some text\n" + b"\0" * 100)
    for path, named in ((sparse, "more than"), (nuls, "binary")):
        assert main(["eval", "--checkpoint", str(run), "--text", str(path)]) == 2
        assert named in capsys.readouterr().err


def test_7_a_run_json_with_absurd_sizes_is_refused_before_anything_is_built(finished, capsys):
    run, _, _ = finished
    meta = json.loads((run / "run.json").read_text())
    for kwargs, named in (
        ({"n_layers": 400000}, "n_layers"),
        ({"ff_n_experts": 1 << 20, "d_model": 1 << 20}, "parameters"),
    ):
        (run / "run.json").write_text(json.dumps({**meta, "model_kwargs": {**meta["model_kwargs"], **kwargs}}))
        assert main(["generate", "--checkpoint", str(run), "--prompt", "x"]) == 2
        assert named in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# 8. Every flag and every value from a run's files range-checked, with a one-line error naming it.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,named",
    [
        (["train", "--lr", "1e39"], "--lr"),
        (["train", "--device", "meta"], "--device"),
        (["train", "--set", "d_model=true"], "d_model"),
        (["train", "--set", "d_model=[[1]]"], "d_model"),
        (["train", "--set", "dropout=1e999"], "dropout"),
    ],
)
def test_8_bad_flags_are_named_in_one_line(argv, named, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_8_cuda_without_cuda_is_named(reference, capsys):
    run, _, _ = reference
    for argv in (
        ["generate", "--checkpoint", str(run), "--prompt", "x", "--device", "cuda"],
        ["eval", "--checkpoint", str(run), "--text", str(run / "run.json"), "--device", "cuda:0"],
        ["generate", "--checkpoint", str(run), "--prompt", "x", "--device", "meta"],
    ):
        assert main(argv) == 2
        assert "--device" in capsys.readouterr().err


def test_8_a_tiny_temperature_samples_the_argmax_instead_of_failing(reference, capsys):
    run, _, _ = reference
    args = ["generate", "--checkpoint", str(run), "--prompt", "def", "--max-new-tokens", "6"]
    assert main(args) == 0
    greedy = capsys.readouterr().out
    assert main([*args, "--temperature", "1e-300"]) == 0
    assert capsys.readouterr().out == greedy


def test_8_hostile_values_in_run_json_and_metrics_are_named(finished, tmp_path, capsys):
    run, _, _ = finished
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**meta, "config": {**meta["config"], "context": -1}}))
    assert main(["eval", "--checkpoint", str(run), "--text", str(run / "data.json")]) == 2
    assert "config.context" in capsys.readouterr().err
    (run / "run.json").write_text(json.dumps({**meta, "vocab_size": "many"}))
    assert main(["generate", "--checkpoint", str(run), "--prompt", "x"]) == 2
    assert "vocab_size" in capsys.readouterr().err
    from moeut.train.sweep import _last_val_ppl

    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "val_ppl": -1}\n{"step": 11, "val_ppl": "NaN"}\n' + "[" * 10000 + "\n")
    assert _last_val_ppl(run) > 1


# ------------------------------------------------------------------------------------------------
# 9. The smaller faults seen in the code.
# ------------------------------------------------------------------------------------------------


def test_9_a_step_written_again_keeps_the_old_one_until_the_new_one_verifies(finished, monkeypatch):
    run, _, _ = finished
    before = tree_digest(step_dir(run, 9))
    real = ckpt_lib.read_checkpoint

    def failing_read_back(path, part="model", spec=None):
        if part == "verify" and Path(path).name == "step_00000009":
            raise ckpt_lib.CheckpointError("simulated: the new files do not read back")
        return real(path, part, spec)

    monkeypatch.setattr(ckpt_lib, "read_checkpoint", failing_read_back)
    with pytest.raises(ckpt_lib.CheckpointError, match="simulated"):
        resave(run, 9, model_edit=lambda m: None)
    assert tree_digest(step_dir(run, 9)) == before
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_9_newer_unusable_checkpoints_are_set_aside_by_step_number_not_by_name(finished, capsys):
    """step_100000000 sorts before step_99999999 as text; the newer one by number is the one set aside."""
    run, cache, _ = finished
    nine = step_dir(run, 9)
    (nine).rename(step_dir(run, 99999999))
    shutil.copytree(step_dir(run, 99999999), step_dir(run, 100000000))
    for step in (99999999, 100000000):
        path = step_dir(run, step)
        manifest = json.loads((path / ckpt_lib.MANIFEST_FILE).read_text())
        manifest["step"] = step
        (path / ckpt_lib.MANIFEST_FILE).write_text(json.dumps(manifest))
    # both are unusable as well (their training.json still says step 9): the resume must say so of each
    assert [p.name for p in ckpt_lib.list_checkpoints(run)][-2:] == ["step_99999999", "step_100000000"]
    assert main(resume(run, cache)) == 0
    out = capsys.readouterr().out
    assert out.index("step_100000000") < out.index("step_99999999")  # newest first, by number
    assert "is not the step of its directory" in out
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "step_100000000.damaged" in names and "step_99999999.damaged" in names


def test_9_a_failed_resume_leaves_run_json_as_it_was(finished, capsys):
    run, cache, _ = finished
    before = (run / "run.json").read_bytes()
    for step in (3, 6, 9):
        resave(run, step, model_edit=poison_weight)
    assert main(resume(run, cache, "--steps", "20")) == 2
    assert "no usable checkpoint" in capsys.readouterr().err
    assert (run / "run.json").read_bytes() == before


def test_9_a_tensor_of_another_dtype_is_refused_not_cast(finished, capsys):
    run, _, _ = finished

    def to_double(state):
        name = next(k for k in state if state[k].is_floating_point())
        state[name] = state[name].double()

    resave(run, 9, model_edit=to_double)
    _, _, meta = load_run(run)
    assert meta["loaded_checkpoint"]["step"] == 6 and "dtype mismatch" in capsys.readouterr().err


def test_9_a_checkpoint_rotated_away_while_read_makes_the_reader_take_the_next(finished, monkeypatch):
    run, _, _ = finished
    real = checkpoint_reader.read_checkpoint
    removed = []

    def rotate_first(path, part="model", spec=None):
        if not removed:
            shutil.rmtree(path)
            removed.append(Path(path).name)
        return real(path, part, spec)

    monkeypatch.setattr(checkpoint_reader, "read_checkpoint", rotate_first)
    _, _, meta = load_run(run)
    assert removed == ["step_00000009"] and meta["loaded_checkpoint"]["step"] == 6
