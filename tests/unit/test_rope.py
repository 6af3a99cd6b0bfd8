"""RoPE: the fused operator (its backward rotates by -angle) against autograd through the plain form,
and the Triton kernel through the interpreter on CPU (strided inputs, odd widths, unrotated rest)."""

import os

import pytest
import torch

from moeut.ops.rope import _Rope, rope_tables, rotate_reference


@pytest.mark.parametrize("scale", [1.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_function_backward_is_the_adjoint(dtype, scale):
    torch.manual_seed(0)
    B, T, H, D, n_rot = 2, 7, 3, 20, 10
    x = torch.randn(B, T, H, D).to(dtype).transpose(1, 2).requires_grad_()  # [B, H, T, D], strided
    cos, sin = rope_tables(n_rot, 3, T, 10000.0, "cpu")
    y = _Rope.apply(x, cos, sin, scale)
    ref_x = x.detach().clone().requires_grad_()
    ref = rotate_reference(ref_x, cos, sin, scale)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(x.grad, ref_x.grad, **tol)
    assert y.transpose(1, 2).is_contiguous()  # x's layout (a head view); its gradient: the tests below
    x2 = x.detach().contiguous().requires_grad_()
    y2 = _Rope.apply(x2, cos, sin, scale)
    y2.backward(g)
    assert y2.is_contiguous()  # a contiguous input keeps the contiguous layout
    torch.testing.assert_close(y2, ref, rtol=0, atol=0)
    torch.testing.assert_close(x2.grad, ref_x.grad, **tol)


def _head_view_grad(B=2, T=6, H=3, D=16, scale=0.7):
    """RoPE on a head view of a [B, T, H * D] projection: (output, the gradient autograd hands the view,
    the projection's gradient, and their plain-PyTorch values)."""
    torch.manual_seed(4)
    proj = torch.randn(B, T, H * D, requires_grad=True)
    cos, sin = rope_tables(8, 0, T, 10000.0, "cpu")
    seen = []
    x = proj.view(B, T, H, D).transpose(1, 2)
    x.register_hook(lambda grad: seen.append(grad))
    y = _Rope.apply(x, cos, sin, scale)
    g = torch.randn(B, H, T, D)
    y.backward(g)
    ref = rotate_reference(proj.view(B, T, H, D).transpose(1, 2), cos, sin, scale)
    (want_grad,) = torch.autograd.grad(ref, proj, g)
    return y, seen[0], proj.grad, ref, want_grad


def test_rope_keeps_a_head_views_layout():
    """On a head view of a projection RoPE writes its output and the view's gradient in the view's
    layout, with the reference's values; the gradient reaches the projection as a view (no copy)."""
    y, grad_x, grad_proj, ref, want_grad = _head_view_grad()
    assert y.transpose(1, 2).is_contiguous() and not y.is_contiguous()
    assert grad_x.transpose(1, 2).is_contiguous() and not grad_x.is_contiguous()
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    torch.testing.assert_close(grad_proj, want_grad, rtol=1e-6, atol=1e-6)
    assert grad_proj.data_ptr() == grad_x.data_ptr()


triton = pytest.importorskip("triton")
interpreted = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not interpreted, reason="the interpreter test is for CPU-only machines")
@pytest.mark.parametrize("D,n_rot", [(82, 40), (16, 16), (24, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_rope_kernel_matches_reference(D, n_rot, dtype):
    from moeut.kernels.rope import rope_triton

    torch.manual_seed(D)
    B, T, H = 2, 19, 3
    x = torch.randn(B, T, H, D).to(dtype).transpose(1, 2)  # the layout attention passes
    positions = torch.arange(5, 5 + T)
    cos, sin = rope_tables(n_rot, positions, T, 10000.0, "cpu")
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    got = rope_triton(x, cos, sin)
    assert got.is_contiguous()
    torch.testing.assert_close(got, rotate_reference(x, cos, sin), **tol)
    torch.testing.assert_close(rope_triton(x, cos, sin, scale=0.3), rotate_reference(x, cos, sin, 0.3), **tol)
    torch.testing.assert_close(rope_triton(x, cos, sin, inverse=True), rotate_reference(x, cos, -sin), **tol)
    torch.testing.assert_close(rope_triton(got.float(), cos, sin, inverse=True), x.float(), rtol=1e-2, atol=1e-2)
    # time-major output: the same values, stored as [B, T, H, D]
    back = rope_triton(x, cos, sin, inverse=True, scale=0.3, time_major=True)
    assert back.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(back, rotate_reference(x, cos, -sin, 0.3), **tol)


def test_scaled_rope_equals_scaling_before_rotation():
    """Attention passes its q/k scale to RoPE: the same as scaling q before rotating it (fp32)."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 11, 24, dtype=torch.float64)
    cos, sin = rope_tables(16, 0, 11, 10000.0, "cpu")
    torch.testing.assert_close(
        rotate_reference(x, cos.double(), sin.double(), 0.25), rotate_reference(x * 0.25, cos.double(), sin.double())
    )


@pytest.mark.skipif(not interpreted, reason="the interpreter test is for CPU-only machines")
@pytest.mark.parametrize("model_kind", ["moeut", "dense"])
def test_training_step_through_the_rope_kernel_matches_pytorch(monkeypatch, model_kind):
    """A whole fp32 training step with RoPE through the interpreted kernel (time-major q, k and
    gradients flowing through attention, the joint projection and the output projection) gives the
    loss and every gradient of the plain PyTorch RoPE."""
    from moeut.ops import rope
    from tests.helpers import step_loss_grads, tiny_lm

    torch.manual_seed(0)
    model = tiny_lm(model_kind)
    x = torch.randint(0, 40, (2, 9))
    want_loss, want = step_loss_grads(model, x)
    kernel_calls = []
    monkeypatch.setattr(rope, "use_fused", lambda t, switch=None: kernel_calls.append(switch) or True)
    got_loss, got = step_loss_grads(model, x)
    assert kernel_calls  # the kernel ran, forward and backward
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)
