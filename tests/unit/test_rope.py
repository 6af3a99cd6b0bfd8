"""RoPE: the fused operator (its backward rotates by -angle) against autograd through the plain form,
and the Triton kernel through the interpreter on CPU (strided inputs, odd widths, unrotated rest)."""
import os

import pytest
import torch

from moeut.rope import _Rope, rope_tables, rotate_reference


@pytest.mark.parametrize("scale", [1.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_function_backward_is_the_adjoint(dtype, scale):
    torch.manual_seed(0)
    B, T, H, D, n_rot = 2, 7, 3, 20, 10
    x = torch.randn(B, T, H, D).to(dtype).transpose(1, 2).requires_grad_()   # [B, H, T, D], strided
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


triton = pytest.importorskip("triton")
interpreted = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not interpreted, reason="the interpreter test is for CPU-only machines")
@pytest.mark.parametrize("D,n_rot", [(82, 40), (16, 16), (24, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_rope_kernel_matches_reference(D, n_rot, dtype):
    from moeut.triton_rope import rope_triton
    torch.manual_seed(D)
    B, T, H = 2, 19, 3
    x = torch.randn(B, T, H, D).to(dtype).transpose(1, 2)       # the layout attention passes
    positions = torch.arange(5, 5 + T)
    cos, sin = rope_tables(n_rot, positions, T, 10000.0, "cpu")
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    got = rope_triton(x, cos, sin)
    assert got.is_contiguous()
    torch.testing.assert_close(got, rotate_reference(x, cos, sin), **tol)
    torch.testing.assert_close(rope_triton(x, cos, sin, scale=0.3), rotate_reference(x, cos, sin, 0.3), **tol)
    torch.testing.assert_close(rope_triton(x, cos, sin, inverse=True), rotate_reference(x, cos, -sin), **tol)
    torch.testing.assert_close(rope_triton(got.float(), cos, sin, inverse=True), x.float(), rtol=1e-2, atol=1e-2)


def test_scaled_rope_equals_scaling_before_rotation():
    """Attention passes its q/k scale to RoPE: the same as scaling q before rotating it (fp32)."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 11, 24, dtype=torch.float64)
    cos, sin = rope_tables(16, 0, 11, 10000.0, "cpu")
    torch.testing.assert_close(rotate_reference(x, cos.double(), sin.double(), 0.25),
                               rotate_reference(x * 0.25, cos.double(), sin.double()))
