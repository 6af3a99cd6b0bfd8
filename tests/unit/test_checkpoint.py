"""The checkpoint format: plain-data encoding, manifest verification, rotation, the legacy format."""

import json
import os
import random

import numpy as np
import pytest
import torch

from moeut.train import checkpoint as ckpt_lib
from moeut.train.legacy import load_legacy_checkpoint


def training_state():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    rng = {
        "python": random.getstate(),
        "numpy": (name, keys.astype(np.int64).tolist(), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    return model, {
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": rng,
        "data_position": 12,
        "config": {"lr": 1e-3, "data": ["a"]},
    }


def test_encode_decode_gives_back_the_same_types_and_values():
    _, training = training_state()
    tensors = {}
    tree = json.loads(json.dumps(ckpt_lib.encode_tree(training, tensors)))  # through real JSON
    back = ckpt_lib.decode_tree(tree, tensors)
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)  # a tuple again
    assert set(back["optimizer"]["state"]) == {0, 1}  # int keys again
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], training["optimizer"]["state"][0]["exp_avg"])
    assert back["rng"]["python"] == training["rng"]["python"]
    assert torch.equal(back["rng"]["torch"], training["rng"]["torch"])
    with pytest.raises(TypeError, match="ndarray"):
        ckpt_lib.encode_tree({"x": np.zeros(2)}, {})


def test_round_trip_restores_an_optimizer_exactly(tmp_path):
    model, training = training_state()
    path = ckpt_lib.save_checkpoint(tmp_path, 5, model.state_dict(), training)
    loaded = ckpt_lib.load_training_state(path)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.load_state_dict(loaded["optimizer"])
    assert loaded["step"] == 5 and loaded["data_position"] == 12
    for k, v in training["optimizer"]["state"][0].items():
        assert torch.equal(opt.state_dict()["state"][0][k], v)
    state = ckpt_lib.load_model_state(path)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_every_byte_is_covered_by_the_manifest(tmp_path):
    model, training = training_state()
    path = ckpt_lib.save_checkpoint(tmp_path, 1, model.state_dict(), training)
    for name in ckpt_lib.CHECKPOINT_FILES:
        f = path / name
        data = bytearray(f.read_bytes())
        for i in (0, len(data) // 2, len(data) - 1):
            data[i] ^= 1
            f.write_bytes(bytes(data))
            with pytest.raises(ckpt_lib.CheckpointError, match=name):
                ckpt_lib.verify_checkpoint(path)
            data[i] ^= 1
            f.write_bytes(bytes(data))
    ckpt_lib.verify_checkpoint(path)


def test_rotation_keeps_the_newest_and_the_temporaries_are_cleaned(tmp_path):
    model, training = training_state()
    for step in range(1, 6):
        ckpt_lib.save_checkpoint(tmp_path, step, model.state_dict(), training, keep=2)
    assert [p.name for p in ckpt_lib.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    stale = tmp_path / "checkpoints" / ".tmp-step_00000006-99999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    (tmp_path / "run.json.tmp-123").write_text("{")
    removed = ckpt_lib.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".tmp-step_00000006-99999", "run.json.tmp-123"]
    assert not stale.exists()


def test_newest_usable_checkpoint_reports_and_skips_damage(tmp_path):
    model, training = training_state()
    for step in (1, 2):
        ckpt_lib.save_checkpoint(tmp_path, step, model.state_dict(), training)
    (tmp_path / "checkpoints" / "step_00000002" / "training.json").write_text("{}")
    said = []
    assert ckpt_lib.newest_usable_checkpoint(tmp_path, "verify", warn=said.append).path.name == "step_00000001"
    assert len(said) == 1 and "step_00000002" in said[0] and "training.json" in said[0]


def test_legacy_reader_refuses_code_and_reads_data(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "moeut-checkpoint-v1", "x": Payload()}, evil)
    with pytest.raises(ckpt_lib.CheckpointError, match="nothing in it was run"):
        load_legacy_checkpoint(evil)
    assert not marker.exists()
    good = tmp_path / "good.pt"
    torch.save({"format": "moeut-checkpoint-v1", "rng": np.random.get_state(), "w": torch.ones(2)}, good)
    data = load_legacy_checkpoint(good)
    assert torch.equal(data["w"], torch.ones(2)) and np.array_equal(data["rng"][1], np.random.get_state()[1])
