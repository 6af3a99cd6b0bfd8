"""The sharded checkpoint layout without processes: shard files (the layout PyTorch Distributed
Checkpoint writes through its safetensors writer), whole tensors and shapes from them, conversion
between the layouts, and damage or tampering named before anything is used."""

import json

import pytest
import torch

from moeut.train import checkpoint as ckpt_lib
from moeut.train import shards as shard_lib

from .test_checkpoint import training_state


def test_our_shard_files_are_named_and_tagged_as_pytorch_writes_them():
    """A torch release that renames its files or metadata key fails here, not in a user's resume."""
    from torch.distributed.checkpoint import _hf_utils

    assert shard_lib.SHARDING_INFO_KEY == _hf_utils.CUSTOM_METADATA_KEY
    for i in (1, 2, 17):
        assert shard_lib.shard_file_name(i) == _hf_utils._gen_file_name(1, 1, i)


@pytest.mark.parametrize("n", [1, 3, 7])
def test_split_and_assemble_give_back_every_tensor(tmp_path, n):
    """Uneven pieces, more shards than rows (empty pieces are not written), 0-d tensors, bf16 and ints."""
    state = {
        "w": torch.randn(5, 3),
        "b": torch.randn(2),
        "scalar": torch.tensor(3.5),
        "half": torch.randn(4, 2).bfloat16(),
        "ids": torch.arange(6),
    }
    for i, part in enumerate(shard_lib.split_dim0(state, n), start=1):
        shard_lib.write_shard(tmp_path / shard_lib.shard_file_name(i), part)
    with shard_lib.open_directory(tmp_path) as shards:
        assert len(shards.fds) == n
        assert shards.whole_shapes() == {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
        back = shards.whole()
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_pieces_that_do_not_tile_a_tensor_are_named(tmp_path):
    w = torch.randn(4, 2)
    shard_lib.write_shard(tmp_path / shard_lib.shard_file_name(1), {"w": (w[:2], [0, 0])})
    shard_lib.write_shard(tmp_path / shard_lib.shard_file_name(2), {"w": (w[2:3], [3, 0])})  # row 2 missing
    with pytest.raises(shard_lib.ShardError, match=r"pieces of w do not tile one tensor: rows \[2, 3\) are in no"):
        shard_lib.open_directory(tmp_path)


def _single_checkpoint(run):
    model, training = training_state()
    path = ckpt_lib.save_checkpoint(run, 4, model.state_dict(), training)
    names = [n for n, _ in model.named_parameters()]  # one group, in order
    return model, training, path, ckpt_lib.ModelSpec.of(model, names)


def test_convert_single_to_sharded_and_back_keeps_every_value(tmp_path):
    model, training, path, names = _single_checkpoint(tmp_path)
    sharded = ckpt_lib.convert_checkpoint(tmp_path, path, "sharded", names, shards=2, report=lambda m: None)
    assert sharded == path and ckpt_lib.checkpoint_layout(path) == "sharded"
    assert not (path / ckpt_lib.MODEL_FILE).exists()
    assert len(list((path / shard_lib.SHARD_DIR).iterdir())) == 2
    assert ckpt_lib.checkpoint_tensor_shapes(path) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = ckpt_lib.load_model_state(path)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    loaded = ckpt_lib.load_training_state(path)
    assert loaded["optimizer_keys"] == "names" and loaded["step"] == 4 and loaded["data_position"] == 12
    for i, name in enumerate(names.parameters):
        want = training["optimizer"]["state"][i]
        got = loaded["optimizer"]["state"][name]
        assert float(got["step"]) == float(want["step"])
        assert torch.equal(got["exp_avg"], want["exp_avg"]) and torch.equal(got["exp_avg_sq"], want["exp_avg_sq"])

    ckpt_lib.convert_checkpoint(tmp_path, path, "single", names, report=lambda m: None)
    assert ckpt_lib.checkpoint_layout(path) == "single" and not (path / shard_lib.SHARD_DIR).exists()
    back = ckpt_lib.load_training_state(path)
    assert back["optimizer_keys"] == "positions"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.load_state_dict(back["optimizer"])
    for i in range(len(names.parameters)):
        for k, v in training["optimizer"]["state"][i].items():
            assert torch.equal(opt.state_dict()["state"][i][k], v), (i, k)
    assert [p.name for p in ckpt_lib.list_checkpoints(tmp_path)] == [path.name]
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())


def test_a_damaged_shard_is_named_and_an_older_checkpoint_used(tmp_path):
    _, _, path, names = _single_checkpoint(tmp_path)
    ckpt_lib.convert_checkpoint(tmp_path, path, "sharded", names, shards=2, report=lambda m: None)
    model, training = training_state()
    newer = ckpt_lib.save_checkpoint(tmp_path, 8, model.state_dict(), training)
    ckpt_lib.convert_checkpoint(tmp_path, newer, "sharded", names, shards=2, report=lambda m: None)
    shard = newer / shard_lib.SHARD_DIR / shard_lib.shard_file_name(2)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ckpt_lib.CheckpointError, match="shard-00002-model-00001-of-00001.safetensors does not match"):
        ckpt_lib.verify_checkpoint(newer)
    with pytest.raises(ckpt_lib.CheckpointError, match="shard-00002"):
        ckpt_lib.load_model_state(newer)
    warnings = []
    assert ckpt_lib.newest_usable_checkpoint(tmp_path, "model", names, warn=warnings.append).path == path
    assert "step_00000008" in warnings[0] and "shard-00002" in warnings[0]


@pytest.mark.parametrize(
    "name", ["../model.safetensors", "shards/../../x.safetensors", "/etc/passwd", "shards/extra.bin"]
)
def test_a_manifest_naming_other_files_is_refused(tmp_path, name):
    """The files of a sharded checkpoint are its training files and shard files named as DCP names
    them, inside `shards/`: a manifest pointing anywhere else is refused before anything is read."""
    _, _, path, names = _single_checkpoint(tmp_path)
    ckpt_lib.convert_checkpoint(tmp_path, path, "sharded", names, shards=1, report=lambda m: None)
    manifest = json.loads((path / ckpt_lib.MANIFEST_FILE).read_text())
    manifest["files"][name] = {"bytes": 1, "sha256": "0" * 64}
    (path / ckpt_lib.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ckpt_lib.CheckpointError, match="its manifest lists"):
        ckpt_lib.verify_checkpoint(path)


def test_an_unknown_layout_is_refused_by_name(tmp_path):
    _, _, path, _ = _single_checkpoint(tmp_path)
    manifest = json.loads((path / ckpt_lib.MANIFEST_FILE).read_text())
    manifest["layout"] = "striped"
    (path / ckpt_lib.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ckpt_lib.CheckpointError, match="unknown layout 'striped'"):
        ckpt_lib.load_model_state(path)


def test_conversion_refuses_bad_arguments_before_writing(tmp_path):
    _, _, path, names = _single_checkpoint(tmp_path)
    before = sorted(p.name for p in path.iterdir())
    with pytest.raises(ckpt_lib.CheckpointError, match="layout must be"):
        ckpt_lib.convert_checkpoint(tmp_path, path, "striped", names, report=lambda m: None)
    with pytest.raises(ckpt_lib.CheckpointError, match="from 1 to 4096"):
        ckpt_lib.convert_checkpoint(tmp_path, path, "sharded", names, shards=0, report=lambda m: None)
    assert sorted(p.name for p in path.iterdir()) == before


def test_a_file_added_to_shards_or_a_linked_checkpoint_is_refused(tmp_path):
    """Distributed Checkpoint's reader takes every safetensors file it finds in `shards/`, so a file
    the manifest does not list makes the checkpoint damaged; a checkpoint directory that is a
    symbolic link is not followed."""
    import os

    _, _, path, names = _single_checkpoint(tmp_path)
    ckpt_lib.convert_checkpoint(tmp_path, path, "sharded", names, shards=1, report=lambda m: None)
    link = path.parent / "step_00000099"
    os.symlink(path, link)
    with pytest.raises(ckpt_lib.CheckpointError, match="symbolic link"):
        ckpt_lib.load_model_state(link)
    extra = path / shard_lib.SHARD_DIR / shard_lib.shard_file_name(2)
    extra.write_bytes((path / shard_lib.SHARD_DIR / shard_lib.shard_file_name(1)).read_bytes())
    with pytest.raises(ckpt_lib.CheckpointError, match="shard-00002-model-00001-of-00001.safetensors"):
        ckpt_lib.verify_checkpoint(path)
    with pytest.raises(ckpt_lib.CheckpointError, match="beyond its manifest"):
        ckpt_lib.load_model_state(path)
