"""moeut.files and the safetensors reader: reads that follow no link and trust no size, bounded JSON,
appends that never write through another name, and headers checked field by field."""

import json
import os
import struct

import pytest
import torch

from moeut.files import FileProblem, open_append, parse_json, read_bytes, read_json
from moeut.train import shards as shard_lib
from moeut.train.tensor_file import read_header, read_rows, read_tensor


def test_reads_refuse_links_other_kinds_and_oversized_files(tmp_path):
    real = tmp_path / "real"
    real.write_bytes(b"12345")
    os.symlink(real, tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    assert read_bytes(real, 5) == b"12345"
    with pytest.raises(FileProblem, match="symbolic link"):
        read_bytes(tmp_path / "link", 100)
    with pytest.raises(FileProblem, match="not a regular file"):
        read_bytes(tmp_path / "fifo", 100)  # would block forever if opened for reading plainly
    with pytest.raises(FileProblem, match="more than the 4"):
        read_bytes(real, 4)


@pytest.mark.parametrize(
    "text,named",
    [
        ("[" * 65 + "]" * 65, "nests deeper"),
        ('{"a": ' + "1" * 101 + "}", "not valid JSON"),
        ('{"a": NaN}', "not valid JSON"),
        ('{"a": 1e999}', "not valid JSON"),
        ("\xff", "not UTF-8"),
    ],
)
def test_parse_json_refuses_what_would_exhaust_or_mislead(text, named):
    with pytest.raises(FileProblem, match=named):
        parse_json(text.encode("latin-1") if text == "\xff" else text.encode(), "x.json", 1 << 20)


def test_parse_json_bounds_size_and_counts_depth_outside_strings(tmp_path):
    assert parse_json(json.dumps({"s": "[[[[" * 100}).encode(), "x", 1 << 20) == {"s": "[[[[" * 100}
    with pytest.raises(FileProblem, match="more than the 10"):
        parse_json(b"[" + b"1," * 10 + b"1]", "x", 10)
    (tmp_path / "ok.json").write_text('{"a": [1, 2.5, null, "x"]}')
    assert read_json(tmp_path / "ok.json", 100) == {"a": [1, 2.5, None, "x"]}


def test_open_append_gives_a_hard_linked_file_a_private_copy_and_refuses_links(tmp_path):
    original = tmp_path / "a.jsonl"
    original.write_text("one\n")
    shared = tmp_path / "b.jsonl"
    os.link(original, shared)
    said = []
    with open_append(shared, said.append) as f:
        f.write("two\n")
    assert original.read_text() == "one\n" and shared.read_text() == "one\ntwo\n"
    assert said and "hard links" in said[0] and os.stat(shared).st_nlink == 1
    os.symlink(original, tmp_path / "c.jsonl")
    with pytest.raises(FileProblem, match="symbolic link"):
        open_append(tmp_path / "c.jsonl")


def _safetensors(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    "header,data,named",
    [
        (
            {
                "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            12,
            "overlap",
        ),
        ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "needs 12 bytes"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 4, "in 4 bytes of data"),
        ({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, 8, "unsupported dtype"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, 0, "not a list of sizes"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, 4, "exactly dtype"),
        ({"__metadata__": {"a": 1}}, 0, "map of strings"),
    ],
)
def test_safetensors_headers_are_checked_before_any_data_is_read(tmp_path, header, data, named):
    path = tmp_path / "t.safetensors"
    _safetensors(path, header, bytes(data))
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(FileProblem, match=named):
            read_header(fd, str(path))
    finally:
        os.close(fd)


def test_a_header_length_beyond_the_file_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(FileProblem, match="header claims"):
            read_header(fd, "t")
    finally:
        os.close(fd)


def test_tensors_and_row_ranges_read_back_exactly(tmp_path):
    from safetensors.torch import save_file

    state = {
        "w": torch.randn(5, 3),
        "h": torch.randn(7).bfloat16(),
        "i": torch.arange(4),
        "e": torch.zeros(0, 2),
        "b": torch.tensor([True, False]),
    }
    save_file(state, str(tmp_path / "t.safetensors"))
    fd = os.open(tmp_path / "t.safetensors", os.O_RDONLY)
    try:
        header = read_header(fd, "t")
        for k, v in state.items():
            got = read_tensor(fd, header.entries[k], "t")
            assert got.dtype == v.dtype and torch.equal(got, v)
        assert torch.equal(read_rows(fd, header.entries["w"], 1, 4, "t"), state["w"][1:4])
        with pytest.raises(FileProblem, match="rows"):
            read_rows(fd, header.entries["w"], 4, 9, "t")
    finally:
        os.close(fd)


def test_shard_rows_come_from_every_piece_that_holds_them(tmp_path):
    w = torch.randn(10, 3)
    for i, part in enumerate(shard_lib.split_dim0({"w": w}, 3), start=1):
        shard_lib.write_shard(tmp_path / shard_lib.shard_file_name(i), part)
    with shard_lib.open_directory(tmp_path) as shards:
        assert torch.equal(shards.rows("w", 2, 9), w[2:9])  # spans all three files
        for world in (1, 2, 3, 4):
            got = torch.cat([shards.rows("w", *shard_lib.dim0_chunk(10, world, r)) for r in range(world)])
            assert torch.equal(got, w)
    assert [shard_lib.dim0_chunk(10, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert [shard_lib.dim0_chunk(2, 4, r) for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert [c.shape[0] for c in torch.empty(10).chunk(4)] == [3, 3, 3, 1]  # what FSDP2 cuts
