"""The entropy regulariser's router statistics: the Triton kernels (`kernels/entropy.py`, through the
interpreter on CPU) against the PyTorch form of `router._ProbabilitySum`, forward and backward; and a
whole model's regularised step through the kernels against the PyTorch form."""

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from moeut import router as routing  # noqa: E402


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
    return wide[..., 5 : 5 + int(torch.tensor(GE).prod())].view(B, T, *GE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 9, 37), (3, 5, 2, 10), (1, 1, 1), (2, 7, 3, 1), (2, 0, 5), (1, 33, 20)])
def test_prob_sum_kernels_match_pytorch(shape, dtype):
    from moeut.kernels.entropy import prob_sum_backward_triton, prob_sum_triton

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
    if dtype == torch.bfloat16:  # one rounding of the same fp32 value; the interpreter's cast truncates
        scale = want_grad.float().abs().max().clamp_min(1e-6)
        assert ((got_grad.float() - want_grad.float()).abs().max() / scale) < 2e-2
    else:
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


def test_prob_sum_uses_many_programs_and_sums_them_in_a_fixed_order():
    """A long sequence is split over several programs per (sequence, head); the result does not
    depend on the run (no atomics) and equals the single-pass sum."""
    from moeut.kernels.entropy import prob_sum_triton

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50, 12, generator=gen)
    a, b = prob_sum_triton(logits), prob_sum_triton(logits)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, F.softmax(logits, -1).sum(1), rtol=1e-5, atol=1e-5)


def test_regularised_step_through_the_kernels_matches_pytorch(monkeypatch):
    """A MoEUT training step under bf16 autocast with the regulariser's kernels (interpreted) gives the
    reg loss and every gradient of the PyTorch form."""
    from tests.helpers import autocast_step_grads, tiny_lm

    torch.manual_seed(0)
    model = tiny_lm("moeut", entropy_reg=0.5, att_entropy_reg=0.3).train()
    x = torch.randint(0, 40, (2, 8))
    calls = []
    monkeypatch.setattr(routing, "use_fused", lambda t, switch=None: False)
    _, want = autocast_step_grads(model, x)
    with torch.autocast("cpu", torch.bfloat16):
        want_reg = model(x).reg_loss
    monkeypatch.setattr(routing, "use_fused", lambda t, switch=None: calls.append(switch) or switch == "entropy")
    _, got = autocast_step_grads(model, x)
    with torch.autocast("cpu", torch.bfloat16):
        got_reg = model(x).reg_loss
    # forward and backward of 3 routers (FFN, SwitchHead's V and O) in 4 layer applications
    assert calls.count("entropy") >= 2 * 3 * 4
    torch.testing.assert_close(got_reg, want_reg, rtol=1e-5, atol=1e-6)
    for n in want:
        scale = want[n].abs().max().item()
        assert (got[n] - want[n]).abs().max().item() <= 2e-2 * scale + 1e-6, n


def _topk_term(grad_gate, gate, expert, n_experts):
    """The selection's d logits in fp32: d gate * s * (1 - s) scattered to the chosen experts."""
    s = gate.float()
    return torch.zeros(gate.shape[0], n_experts).scatter_(1, expert, grad_gate.float() * (1 - s) * s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,n_valid,K",
    [((2, 9, 40), 37, 5), ((3, 5, 2, 10), 10, 2), ((1, 4, 8), 8, 8), ((2, 0, 5), 5, 1), ((1, 6, 16), 3, 2)],
)
@pytest.mark.parametrize("terms", ["both", "prob", "topk"])
def test_router_backward_kernel_adds_both_terms_and_zeroes_the_padding(shape, n_valid, K, dtype, terms):
    """The joint backward kernel writes (regulariser's term + selection's term) in fp32, rounded once,
    over a padded width whose extra columns are exactly zero; with either term alone it is that term."""
    from moeut.kernels.entropy import router_backward_triton

    gen = torch.Generator().manual_seed(sum(shape) + K)
    B, T, *G, W = shape
    logits = (3 * torch.randn(*shape, generator=gen)).to(dtype)
    R = B * T * (G[0] if G else 1)
    grad_sum = torch.randn(B, *G, n_valid, generator=gen) if terms != "topk" else None
    expert = torch.rand(R, n_valid, generator=gen).argsort(1)[:, :K]
    gate = torch.rand(R, K, generator=gen).to(dtype)
    grad_gate = torch.randn(R, K, generator=gen).to(dtype) if terms != "prob" else None
    want = torch.zeros(R, W)
    if grad_sum is not None:
        valid = logits[..., :n_valid].detach().float().requires_grad_()
        F.softmax(valid, dim=-1).sum(1).backward(grad_sum)
        want[:, :n_valid] += valid.grad.reshape(R, n_valid)
    if grad_gate is not None:
        want[:, :n_valid] += _topk_term(grad_gate, gate, expert, n_valid)
    got = router_backward_triton(
        logits,
        n_valid,
        grad_sum,
        gate if grad_gate is not None else None,
        expert if grad_gate is not None else None,
        grad_gate,
    )
    assert got.shape == logits.shape and got.dtype == dtype and got.is_contiguous()
    got = got.reshape(R, W).float()
    assert (got[:, n_valid:] == 0).all()
    # one rounding of the fp32 sum (the interpreter's cast truncates: one bf16 ulp)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(got, want.to(dtype).float(), **tol)


@pytest.mark.parametrize("fp32", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,n_valid,K", [((2, 7, 24), 21, 4), ((2, 6, 3, 5), 5, 2)])
def test_select_with_prob_sum_equals_the_separate_operators(monkeypatch, shape, n_valid, K, dtype, fp32):
    """`router.select_with_prob_sum` (interpreted kernels) gives the gates, expert ids and softmax sum of
    the separate PyTorch operators, and the logits' gradient autograd builds from them (both uses of the
    logits); padded columns get a zero gradient."""
    from moeut.ops import router

    gen = torch.Generator().manual_seed(n_valid + K)
    base = (2 * torch.randn(*shape, generator=gen)).to(dtype)
    w_gate = torch.randn(*shape[:-1], K, generator=gen)
    w_sum = torch.randn(shape[0], *shape[2:-1], n_valid, generator=gen)

    def loss(gate, p_sum):
        return (gate.float() * w_gate).sum() + (p_sum * w_sum).sum()

    # the separate operators: the selection's kernel (ties to the lowest id, where torch.topk's order is
    # unspecified) with its PyTorch backward, and the PyTorch softmax sum
    monkeypatch.setattr(router, "use_fused", lambda t, switch=None: True)
    want_logits = base.clone().requires_grad_()
    valid = want_logits[..., :n_valid]
    want_gate, want_expert = router.sigmoid_topk(valid, K, fp32=fp32)
    want_sum = F.softmax(valid, dim=-1, dtype=torch.float32).sum(1)
    loss(want_gate, want_sum).backward()

    got_logits = base.clone().requires_grad_()
    assert router.joint_selection_applies(got_logits)
    gate, expert, p_sum = router.select_with_prob_sum(got_logits, K, fp32=fp32, n_valid=n_valid)
    assert gate.shape == expert.shape == (*shape[:-1], K) and p_sum.shape == want_sum.shape
    assert gate.dtype == (torch.float32 if fp32 else dtype) and p_sum.dtype == torch.float32
    assert torch.equal(expert, want_expert)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 and not fp32 else dict(rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(gate.float(), want_gate.float(), **tol)
    torch.testing.assert_close(p_sum, want_sum, rtol=1e-5, atol=1e-5)
    loss(gate, p_sum).backward()
    assert (got_logits.grad[..., n_valid:] == 0).all()
    scale = want_logits.grad.float().abs().max()
    assert (got_logits.grad.float() - want_logits.grad.float()).abs().max() <= (
        1e-5 if dtype == torch.float32 else 2e-2
    ) * scale


def test_select_with_prob_sum_rejects_bad_arguments():
    from moeut.ops import router

    logits = torch.randn(2, 3, 8, requires_grad=True)
    with pytest.raises(ValueError, match="n_valid"):
        router.select_with_prob_sum(logits, 2, n_valid=9)
    with pytest.raises(ValueError, match="k=5"):
        router.select_with_prob_sum(logits, 5, n_valid=4)
    with pytest.raises(ValueError, match=r"\[B, T, \(G,\) W\]"):
        router.select_with_prob_sum(logits[0], 2)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_step_with_joint_router_gradient_matches_pytorch(monkeypatch, checkpointing):
    """A MoEUT training step (bf16 autocast) whose routers compute their selection and the regulariser's
    sum as one node (`select_with_prob_sum`, interpreted kernels; the FFN's through its padded
    projection) gives the reg loss and every gradient of the all-PyTorch step, with and without
    activation checkpointing."""
    from moeut import MoEUTLM
    from moeut.ops import router
    from tests.helpers import autocast_step_grads

    torch.manual_seed(0)
    model = MoEUTLM(
        40,
        d_model=32,
        n_layers=2,
        n_heads=2,
        ff_n_experts=13,
        att_n_experts=3,
        d_head=8,
        ff_k=3,
        group_size=2,
        ff_expert_size=16,
        entropy_reg=0.5,
        att_entropy_reg=0.3,
    ).train()
    model.transformer.activation_checkpointing = checkpointing
    x = torch.randint(0, 40, (2, 40))  # 80 rows: the FFN's 13 selector columns are padded to 16
    # The same selection kernel in both steps (its ties differ from torch.topk's), the regulariser's
    # PyTorch form and autograd's add of the two gradients in the first.
    monkeypatch.setattr(routing, "use_fused", lambda t, switch=None: False)
    monkeypatch.setattr(router, "use_fused", lambda t, switch=None: switch in ("router", "entropy"))
    # separate nodes: what runs where the joint node does not apply
    monkeypatch.setattr(routing, "joint_selection_applies", lambda logits: False)
    _, want = autocast_step_grads(model, x)
    with torch.autocast("cpu", torch.bfloat16):
        want_reg = model(x).reg_loss
    joint = []
    monkeypatch.setattr(
        routing,
        "select_with_prob_sum",
        lambda *a, **kw: joint.append(kw.get("n_valid")) or router.select_with_prob_sum(*a, **kw),
    )
    monkeypatch.setattr(routing, "joint_selection_applies", router.joint_selection_applies)
    _, got = autocast_step_grads(model, x)
    # 3 routers (FFN, SwitchHead's V and O) in 2 layer applications (and their recomputation)
    assert len(joint) == 3 * 2 * (2 if checkpointing else 1) and 13 in joint
    with torch.autocast("cpu", torch.bfloat16):
        got_reg = model(x).reg_loss
    torch.testing.assert_close(got_reg, want_reg, rtol=1e-4, atol=1e-6)  # summed in another order
    for n in want:
        scale = want[n].abs().max().item()
        assert (got[n] - want[n]).abs().max().item() <= 2e-2 * scale + 1e-6, n
