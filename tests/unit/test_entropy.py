"""The entropy regulariser's router statistics: the Triton kernels (`triton_entropy.py`, through the
interpreter on CPU) against the PyTorch form of `moe._ProbabilitySum`, forward and backward; and a
whole model's regularised step through the kernels against the PyTorch form."""
import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from moeut import moe  # noqa: E402


def _reference(logits: torch.Tensor, grad_sum: torch.Tensor):
    """(sum, d logits) of softmax(logits in fp32).sum(1) by autograd, d logits in the logits' dtype."""
    x = logits.detach().float().requires_grad_()
    s = F.softmax(x, dim=-1).sum(1)
    s.backward(grad_sum)
    return s.detach(), x.grad.to(logits.dtype)


def _strided_logits(shape, dtype, gen):
    """[B, T, (G,) E] logits sliced out of a wider projection (as SwitchHead's selectors are), with a
    column of large values so the softmax is far from uniform."""
    B, T, *GE = shape
    width = 5 + int(torch.tensor(GE).prod()) + 3
    wide = (3 * torch.randn(B, T, width, generator=gen)).to(dtype)
    wide[..., 6] = 30
    return wide[..., 5:5 + int(torch.tensor(GE).prod())].view(B, T, *GE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 9, 37), (3, 5, 2, 10), (1, 1, 1), (2, 7, 3, 1), (2, 0, 5), (1, 33, 20)])
def test_prob_sum_kernels_match_pytorch(shape, dtype):
    from moeut.triton_entropy import prob_sum_backward_triton, prob_sum_triton
    gen = torch.Generator().manual_seed(sum(shape))
    logits = _strided_logits(shape, dtype, gen)
    grad_sum = torch.randn(shape[0], *shape[2:], generator=gen)
    want, want_grad = _reference(logits, grad_sum)
    got = prob_sum_triton(logits)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if shape[1]:
        torch.testing.assert_close(got.sum(-1), torch.full_like(got.sum(-1), shape[1]), rtol=1e-5, atol=1e-5)
    got_grad = prob_sum_backward_triton(grad_sum, logits)
    assert got_grad.dtype == dtype and got_grad.shape == logits.shape and got_grad.is_contiguous()
    if not logits.numel():
        return
    if dtype == torch.bfloat16:   # one rounding of the same fp32 value; the interpreter's cast truncates
        scale = want_grad.float().abs().max().clamp_min(1e-6)
        assert ((got_grad.float() - want_grad.float()).abs().max() / scale) < 2e-2
    else:
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


def test_prob_sum_uses_many_programs_and_sums_them_in_a_fixed_order():
    """A long sequence is split over several programs per (sequence, head); the result does not
    depend on the run (no atomics) and equals the single-pass sum."""
    from moeut.triton_entropy import prob_sum_triton
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50, 12, generator=gen)
    a, b = prob_sum_triton(logits), prob_sum_triton(logits)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, F.softmax(logits, -1).sum(1), rtol=1e-5, atol=1e-5)


def test_regularised_step_through_the_kernels_matches_pytorch(monkeypatch):
    """A MoEUT training step under bf16 autocast with the regulariser's kernels (interpreted) gives the
    reg loss and every gradient of the PyTorch form."""
    from moeut import MoEUTLM
    from tests.helpers import autocast_step_grads
    torch.manual_seed(0)
    model = MoEUTLM(40, d_model=32, n_layers=4, n_heads=2, ff_n_experts=6, att_n_experts=3, d_head=8,
                    ff_k=2, group_size=2, ff_expert_size=16, entropy_reg=0.5, att_entropy_reg=0.3).train()
    x = torch.randint(0, 40, (2, 8))
    calls = []
    monkeypatch.setattr(moe, "use_fused", lambda t, switch=None: False)
    _, want = autocast_step_grads(model, x)
    with torch.autocast("cpu", torch.bfloat16):
        want_reg = model(x).reg_loss
    monkeypatch.setattr(moe, "use_fused", lambda t, switch=None: calls.append(switch) or switch == "MOEUT_FUSED_ENTROPY")
    _, got = autocast_step_grads(model, x)
    with torch.autocast("cpu", torch.bfloat16):
        got_reg = model(x).reg_loss
    # forward and backward of 3 routers (FFN, SwitchHead's V and O) in 4 layer applications
    assert calls.count("MOEUT_FUSED_ENTROPY") >= 2 * 3 * 4
    torch.testing.assert_close(got_reg, want_reg, rtol=1e-5, atol=1e-6)
    for n in want:
        scale = want[n].abs().max().item()
        assert (got[n] - want[n]).abs().max().item() <= 2e-2 * scale + 1e-6, n
