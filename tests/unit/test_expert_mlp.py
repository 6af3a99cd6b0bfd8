"""The fused σ-MoE expert MLP (`ops/expert_mlp.py`) against the two operators and a ReLU it replaces."""
import pytest
import torch
import torch.nn.functional as F

from moeut.ops import expert_mlp as mlp_module
from moeut.ops import expert_mm as em
from moeut.ops.expert_mm import route
from moeut.ops.reference import sigma_moe_mlp_reference


def mlp_case(dtype: torch.dtype, seed: int, R: int = 24, K: int = 3, E: int = 7, D: int = 20, S: int = 12):
    """(routing, x, w1, w2, gate, d out) of a small expert MLP: one crowded expert, one that gets no
    row; leaves require grad. Half the hidden units are pushed negative so the ReLU cuts."""
    gen = torch.Generator().manual_seed(seed)
    expert = torch.randint(0, E - 1, (R, K), generator=gen)
    expert[: R // 2, 0] = 0
    r = route(expert, E)
    x = torch.randn(R, D, generator=gen).to(dtype).requires_grad_()
    w1 = torch.randn(E, D, S, generator=gen).to(dtype).requires_grad_()
    w2 = torch.randn(E, S, D, generator=gen).to(dtype).requires_grad_()
    gate = torch.rand(R, K, generator=gen).to(dtype).requires_grad_()
    gy = torch.randn(R, D, generator=gen).to(dtype)
    return r, x, w1, w2, gate, gy


def experts_of(r, shape) -> torch.Tensor:
    """expert_RK back from a routing: the expert that owns each (row, choice) slot."""
    expert_N = torch.repeat_interleave(torch.arange(r.offsets_E1.numel() - 1), r.offsets_E1.diff())
    return torch.empty(r.slot_N.numel(), dtype=torch.long).index_copy_(0, r.slot_N, expert_N).view(shape)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_expert_mlp_matches_the_naive_sigma_moe(dtype, tol):
    """The fused MLP against the naive σ-MoE block in fp64 (`ops/reference.py`): output and the
    gradients of x, both weights and the gates; the expert that gets no row has zero weight gradients."""
    r, x, w1, w2, gate, gy = mlp_case(dtype, seed=7)
    leaves = (x, w1, w2, gate)
    out = mlp_module.expert_mlp(x, w1, w2, r, gate)
    got = (out, *torch.autograd.grad(out, leaves, gy))
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = sigma_moe_mlp_reference(leaves64[0], leaves64[1], leaves64[2], experts_of(r, gate.shape), leaves64[3])
    want = (ref, *torch.autograd.grad(ref, leaves64, gy.double()))
    for name, a, b in zip(("out", "dx", "dw1", "dw2", "dgate"), got, want):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * b.abs().max().item(), msg=name)
    assert (got[2][-1] == 0).all() and (got[3][-1] == 0).all()


def _composed(x, w1, w2, r, gate):
    return em.expert_mm_combine(F.relu(em.expert_mm(x, w1, r)), w2, r, gate, gather=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_expert_mlp_equals_the_composed_operators(dtype):
    """Same kernels, same rounding: the fused Function gives bit-identical outputs and gradients of
    x, both weights and the gates; the expert without rows gets exact zero weight gradients."""
    r, x, w1, w2, gate, gy = mlp_case(dtype, seed=3)
    leaves = (x, w1, w2, gate)
    fused = mlp_module.expert_mlp(x, w1, w2, r, gate)
    got = (fused, *torch.autograd.grad(fused, leaves, gy))
    composed = _composed(x, w1, w2, r, gate)
    want = (composed, *torch.autograd.grad(composed, leaves, gy))
    for name, a, b in zip(("out", "dx", "dw1", "dw2", "dgate"), got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert (got[2][-1] == 0).all() and (got[3][-1] == 0).all()


def test_expert_mlp_under_autocast_matches_composed(monkeypatch):
    """fp32 leaves under bf16 autocast (training): computed in bf16, gradients in fp32, as composed."""
    r, x, w1, w2, gate, gy = mlp_case(torch.float32, seed=5)
    leaves = (x, w1, w2, gate)
    with torch.autocast("cpu", torch.bfloat16):
        fused = mlp_module.expert_mlp(x, w1, w2, r, gate)
        composed = _composed(x, w1, w2, r, gate)
    assert fused.dtype == composed.dtype == torch.bfloat16
    g_fused = torch.autograd.grad(fused, leaves, gy.bfloat16())
    g_comp = torch.autograd.grad(composed, leaves, gy.bfloat16())
    assert torch.equal(fused, composed)
    for a, b in zip(g_fused, g_comp):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_expert_mlp_rejects_mismatched_gates():
    r, x, w1, w2, gate, _ = mlp_case(torch.float32, seed=1)
    with pytest.raises(ValueError, match="expert_mlp: gates of shape"):
        mlp_module.expert_mlp(x, w1, w2, r, gate[:, :2])


def relu_by_another_name(t):
    """F.relu under another identity: SigmaMoE then takes the composed operators (the reference)."""
    return F.relu(t)


def test_sigma_moe_uses_the_fused_mlp_with_identical_gradients(monkeypatch):
    """SigmaMoE with ReLU takes the fused Function, with outputs and gradients identical to the
    composed operators that any other activation takes (here ReLU itself under another name)."""
    from moeut import moe
    from moeut.moe import SigmaMoE
    torch.manual_seed(0)
    m = SigmaMoE(16, 9, 8, 3)
    m.reset_parameters(1.0)
    x = torch.randn(2, 11, 16, requires_grad=True)
    calls = []
    real = mlp_module.expert_mlp
    monkeypatch.setattr(moe, "expert_mlp", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    runs = []
    for activation in (F.relu, relu_by_another_name):
        m.activation = activation
        y = m(x)
        runs.append((y, *torch.autograd.grad(y.square().sum(), (x, m.keys, m.values, m.expert_sel))))
    assert calls == [1]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_folded_into_the_sums_matches_a_separate_add(dtype, monkeypatch):
    """SigmaMoE(add_input=True), x + FFN(x), with the residual added inside the fused MLP's top-k sums
    (forward) and its gradient inside the input-gradient sum (backward), against the composed operators
    and a separate add: outputs and gradients of x, both weights and the selector; under bf16 autocast
    the folded sum skips one rounding, so it is the closer one to fp64."""
    from moeut.moe import SigmaMoE
    torch.manual_seed(0)
    m = SigmaMoE(16, 9, 8, 3)
    m.reset_parameters(1.0)
    x = torch.randn(2, 11, 16, requires_grad=True)
    params = (x, m.keys, m.values, m.expert_sel)
    gy = torch.randn(2, 11, 16)

    def run(fused: bool):
        m.activation = F.relu if fused else relu_by_another_name
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = m.forward_with_logits(x, add_input=True)[0]
        return (y, *torch.autograd.grad(y, params, gy))

    folded, separate = run(True), run(False)
    assert folded[0].dtype == x.dtype
    for name, a, b in zip(("out", "dx", "dw1", "dw2", "dsel"), folded, separate):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
        else:
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2, msg=name)
    if dtype == torch.bfloat16:   # the fold is the more accurate: no bf16 rounding of the sum before x is added
        m64 = SigmaMoE(16, 9, 8, 3).double()
        m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
        want = m64.forward_with_logits(x.detach().double(), add_input=True)[0]
        err = lambda t: (t.double() - want).norm().item()  # noqa: E731
        assert err(folded[0]) <= err(separate[0])
    with pytest.raises(ValueError, match="v_dim"):
        SigmaMoE(16, 9, 8, 3, v_dim=12).forward_with_logits(x, add_input=True)
