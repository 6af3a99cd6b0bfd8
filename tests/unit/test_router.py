"""The fused router (`moeut.router.sigmoid_topk`) against sigmoid + topk: values, choices, gradients,
and, through the Triton interpreter on CPU, the kernel itself (ties included)."""
import os

import pytest
import torch

from moeut.router import sigmoid_topk, sigmoid_topk_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sigmoid_topk_matches_plain_pytorch_with_gradients(dtype):
    torch.manual_seed(0)
    logits = torch.randn(50, 3, 37, dtype=torch.float32).to(dtype).requires_grad_()
    gate, expert = sigmoid_topk(logits, 5)
    assert gate.shape == expert.shape == (50, 3, 5) and expert.dtype == torch.long
    ref_logits = logits.detach().clone().requires_grad_()
    ref_gate, ref_expert = torch.sigmoid(ref_logits).topk(5, dim=-1)
    torch.testing.assert_close(gate, ref_gate)
    assert (gate == torch.sigmoid(logits.detach()).gather(-1, expert)).all()
    g = torch.randn_like(gate)
    (gate * g).sum().backward()
    (ref_gate * g).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)


def test_fp32_ranking_of_bf16_logits_equals_ranking_their_float_copy():
    # SwitchHead's router: bf16 logits, ranked and gated in fp32 (the official code's `.float()`), gradient in bf16
    torch.manual_seed(1)
    logits = (2 * torch.randn(40, 10)).to(torch.bfloat16).requires_grad_()
    gate, expert = sigmoid_topk(logits, 2, fp32=True)
    ref_logits = logits.detach().clone().requires_grad_()
    ref_gate, ref_expert = sigmoid_topk(ref_logits.float(), 2)
    assert gate.dtype == torch.float32 and torch.equal(gate, ref_gate) and torch.equal(expert, ref_expert)
    g = torch.randn_like(gate)
    (gate * g).sum().backward()
    (ref_gate * g).sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.equal(logits.grad, ref_logits.grad)


@pytest.mark.parametrize("fp32", [False, True])
def test_strided_head_slices_route_like_their_contiguous_copy(fp32):
    """Selector logits sliced out of a wider projection ([B, T, H*E] with a row stride past H*E) are
    read in place as [rows, H, E]; choices, gates and gradients equal those of a contiguous copy."""
    torch.manual_seed(3)
    B, T, H, E, K = 2, 5, 3, 7, 2
    wide = torch.randn(B, T, 4 + H * E + 6, requires_grad=True)
    sliced = wide[..., 4:4 + H * E].view(B, T, H, E)
    gate, expert = sigmoid_topk(sliced, K, fp32=fp32)
    copy = sliced.detach().clone().requires_grad_()
    ref_gate, ref_expert = sigmoid_topk(copy, K, fp32=fp32)
    assert gate.shape == (B, T, H, K) and torch.equal(expert, ref_expert)
    torch.testing.assert_close(gate, ref_gate, rtol=0, atol=0)
    weights = torch.randn_like(gate)
    (gate * weights).sum().backward()
    (ref_gate * weights).sum().backward()
    torch.testing.assert_close(wide.grad[..., 4:4 + H * E].view(B, T, H, E), copy.grad)
    assert wide.grad[..., :4].abs().sum() == 0 and wide.grad[..., 4 + H * E:].abs().sum() == 0


def test_sigmoid_topk_rejects_bad_k():
    with pytest.raises(ValueError, match="k=9"):
        sigmoid_topk(torch.randn(4, 8), 9)
    with pytest.raises(TypeError, match="floating point"):
        sigmoid_topk(torch.ones(4, 8, dtype=torch.long), 2)


triton = pytest.importorskip("triton")
interpreted = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not interpreted, reason="the interpreter test is for CPU-only machines")
@pytest.mark.parametrize("R,E,K", [(37, 10, 2), (9, 387, 16), (5, 3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_router_kernel_matches_reference(R, E, K, dtype):
    from moeut.triton_router import sigmoid_topk_triton
    gen = torch.Generator().manual_seed(R * E)
    logits = (3 * torch.randn(R, E, generator=gen)).to(dtype)
    logits[0] = 0.5   # a row of exact ties: the lowest expert ids win
    logits[1, 1::2] = 20.0   # saturated scores (1.0 in every dtype) tie too
    gate, expert = sigmoid_topk_triton(logits, K)
    ref_gate, _ = sigmoid_topk_reference(logits, K)
    torch.testing.assert_close(gate, ref_gate, rtol=1e-6, atol=1e-6)
    scores = torch.sigmoid(logits)
    torch.testing.assert_close(scores.gather(1, expert), gate, rtol=1e-6, atol=1e-7)  # each gate is its expert's
    assert (expert.sort(1).values.diff(dim=1) > 0).all()    # K distinct experts per row
    assert expert[0].tolist() == list(range(K))
    if R > 1:
        n_tied = min(K, len(range(1, E, 2)))
        assert expert[1, :n_tied].tolist() == list(range(1, E, 2))[:n_tied]
    # fp32 ranking of the same logits: the choices and gates of the reference on their float copy
    gate32, expert32 = sigmoid_topk_triton(logits, K, fp32=True)
    ref_gate32, ref_expert32 = sigmoid_topk_reference(logits.float(), K)
    assert gate32.dtype == torch.float32
    torch.testing.assert_close(gate32, ref_gate32, rtol=1e-6, atol=1e-7)
    # bf16 logits repeat values, so compare choices through their scores (torch.topk orders ties arbitrarily)
    torch.testing.assert_close(torch.sigmoid(logits.float()).gather(1, expert32), gate32, rtol=1e-6, atol=1e-7)
    # [R0, G, E] rows read in place from a strided slice (heads x experts of a wider projection)
    if E > 3:
        wide = torch.randn(R, 3 * E + 5, generator=gen).to(dtype)
        sliced = wide[:, 5:].view(R, 3, E)
        gate3, expert3 = sigmoid_topk_triton(sliced, K)
        ref_gate3, ref_expert3 = sigmoid_topk_triton(sliced.reshape(-1, E).contiguous(), K)
        assert torch.equal(expert3, ref_expert3) and torch.equal(gate3, ref_gate3)


@pytest.mark.skipif(not interpreted, reason="the interpreter test is for CPU-only machines")
@pytest.mark.parametrize("R,E,K", [(37, 10, 2), (9, 387, 16), (5, 3, 3), (0, 8, 2)])
@pytest.mark.parametrize("dtype,gate_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.bfloat16, torch.float32)])
def test_triton_router_backward_kernel_matches_reference(R, E, K, dtype, gate_dtype):
    """One launch writes the logits' whole gradient: d gate * s * (1 - s) at the chosen experts (any
    order of choices), exact zeros elsewhere, in the logits' dtype; gates in their own dtype (fp32
    for SwitchHead's fp32 ranking)."""
    from moeut.router import _sigmoid_topk_backward_op
    from moeut.triton_router import sigmoid_topk_backward_triton
    gen = torch.Generator().manual_seed(R + E)
    expert = torch.rand(R, E, generator=gen).argsort(1)[:, :K]
    gate = torch.rand(R, K, generator=gen).to(gate_dtype)
    grad_gate = torch.randn(R, K, generator=gen).to(gate_dtype)
    got = sigmoid_topk_backward_triton(grad_gate, gate, expert, E, dtype)
    want = _sigmoid_topk_backward_op(grad_gate, gate, expert, E, dtype)   # the PyTorch form on CPU
    assert got.shape == (R, E) and got.dtype == dtype
    # (the interpreter truncates fp32 -> bf16 where the GPU rounds: one bf16 ulp)
    torch.testing.assert_close(got.float(), want.float(), rtol=0 if dtype == torch.float32 else 2 ** -7, atol=0)
    chosen = torch.zeros(R, E, dtype=torch.bool).scatter_(1, expert, True)
    assert (got[~chosen] == 0).all()


def test_router_backward_opcheck():
    from moeut.router import _sigmoid_topk_backward_op
    gen = torch.Generator().manual_seed(0)
    expert = torch.rand(6, 9, generator=gen).argsort(1)[:, :3].contiguous()
    gate, grad = torch.rand(6, 3, generator=gen), torch.randn(6, 3, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(_sigmoid_topk_backward_op, (grad, gate, expert, 9, dtype))
