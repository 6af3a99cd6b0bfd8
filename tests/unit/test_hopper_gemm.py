"""When `moeut::grouped_mm` takes quack's Hopper GEMM (`kernels/hopper_gemm.py`): the selection logic,
which must hold on every machine. The kernel itself is checked against the reference on an sm90 GPU
(tests/gpu/test_hopper_gemm.py)."""
import sys

import pytest
import torch

from moeut.kernels import hopper_gemm
from moeut.ops.grouped_mm import grouped_mm, grouped_mm_reference
from moeut.settings import settings


def operands(dtype=torch.bfloat16, D=64, O=32):
    x = torch.randn(10, D).to(dtype)
    w = torch.randn(3, D, O).to(dtype)
    offsets = torch.tensor([0, 4, 4, 12])   # the middle expert gets no row
    rows = torch.randint(0, 10, (12,))
    return x, w, offsets, rows


def test_only_a_plain_gathered_16_bit_product_is_the_kernels_form():
    x, w, offsets, rows = operands()
    assert hopper_gemm.is_plain_gather(x, w, rows, None, None, False)
    assert hopper_gemm.is_plain_gather(x.half(), w.half(), rows, None, None, False)
    scale = torch.rand(12)
    for args in ((x, w, None, None, None, False),            # no gather
                 (x, w, rows, scale, None, False),          # a gate
                 (x, w, rows, None, rows, False),           # a scatter
                 (x, w, rows, None, None, True),            # a ReLU epilogue
                 (x.float(), w.float(), rows, None, None, False),   # fp32
                 (x, w.float(), rows, None, None, False),   # an fp32 master weight
                 (x[:, :60], w[:, :60], rows, None, None, False),   # rows not 16-byte aligned
                 (x, w[:, :, :30], rows, None, None, False),
                 (torch.randn(64, 10).bfloat16().t(), w, rows, None, None, False)):   # column-major x
        assert not hopper_gemm.is_plain_gather(*args)


def test_never_chosen_off_cuda_or_when_switched_off_or_without_quack(monkeypatch):
    x, w, offsets, rows = operands()
    assert not hopper_gemm.handles(x, w, rows, None, None, False)   # CPU tensors
    monkeypatch.setattr(settings, "hopper_gemm", False)
    assert not hopper_gemm.handles(x, w, rows, None, None, False)
    monkeypatch.setitem(sys.modules, "quack", None)   # an import of quack now fails
    hopper_gemm._quack_interface.cache_clear()
    try:
        assert hopper_gemm._quack_interface() is None
    finally:
        hopper_gemm._quack_interface.cache_clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to reach the choice")
def test_choice_on_cuda_follows_the_switch(monkeypatch):
    x, w, offsets, rows = (t.cuda() for t in operands())
    expected = torch.cuda.get_device_capability() == (9, 0) and hopper_gemm._quack_interface() is not None
    assert hopper_gemm.handles(x, w, rows, None, None, False) == expected
    monkeypatch.setattr(settings, "hopper_gemm", False)
    assert not hopper_gemm.handles(x, w, rows, None, None, False)


def test_cpu_operator_is_the_reference_with_an_empty_expert():
    x, w, offsets, rows = operands()
    assert torch.equal(grouped_mm(x, w, offsets, rows, None, None), grouped_mm_reference(x, w, offsets, rows))
