"""The fused router (`moeut.ops.router.sigmoid_topk`) against sigmoid + topk: values, choices, gradients,
and, through the Triton interpreter on CPU, the kernel itself (ties included)."""

import pytest
import torch

from moeut.ops.router import sigmoid_topk
from tests.helpers import interpreted


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
    sliced = wide[..., 4 : 4 + H * E].view(B, T, H, E)
    gate, expert = sigmoid_topk(sliced, K, fp32=fp32)
    copy = sliced.detach().clone().requires_grad_()
    ref_gate, ref_expert = sigmoid_topk(copy, K, fp32=fp32)
    assert gate.shape == (B, T, H, K) and torch.equal(expert, ref_expert)
    torch.testing.assert_close(gate, ref_gate, rtol=0, atol=0)
    weights = torch.randn_like(gate)
    (gate * weights).sum().backward()
    (ref_gate * weights).sum().backward()
    torch.testing.assert_close(wide.grad[..., 4 : 4 + H * E].view(B, T, H, E), copy.grad)
    assert wide.grad[..., :4].abs().sum() == 0 and wide.grad[..., 4 + H * E :].abs().sum() == 0


def test_sigmoid_topk_rejects_bad_k():
    with pytest.raises(ValueError, match="k=9"):
        sigmoid_topk(torch.randn(4, 8), 9)
    with pytest.raises(TypeError, match="floating point"):
        sigmoid_topk(torch.ones(4, 8, dtype=torch.long), 2)


triton = pytest.importorskip("triton")


def test_router_backward_opcheck():
    from moeut.ops.router import _sigmoid_topk_backward_op

    gen = torch.Generator().manual_seed(0)
    expert = torch.rand(6, 9, generator=gen).argsort(1)[:, :3].contiguous()
    gate, grad = torch.rand(6, 3, generator=gen), torch.randn(6, 3, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(_sigmoid_topk_backward_op, (grad, gate, expert, 9, dtype))


# The Triton kernels of this operator, run on CPU tensors through TRITON_INTERPRET=1 (`interpreted`).
@interpreted
def test_router_launch_shapes_a_benchmark_passes_compute_the_same():
    from moeut.kernels.router import sigmoid_topk_triton

    logits = torch.randn(37, 11, generator=torch.Generator().manual_seed(3))
    gate, expert = sigmoid_topk_triton(logits, 3)
    for launch in ((1, 1), (8, 4)):
        g2, e2 = sigmoid_topk_triton(logits, 3, launch=launch)
        assert torch.equal(e2, expert) and torch.equal(g2, gate)
