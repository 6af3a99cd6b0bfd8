"""The fused σ-MoE expert MLP (`ops/expert_mlp.py`) against the two operators and a ReLU it replaces."""

import pytest
import torch
import torch.nn.functional as F

from moeut.ops import expert_mlp as mlp_module
from moeut.ops import expert_mm as em
from moeut.ops.expert_mm import route
from moeut.ops.reference import sigma_moe_mlp_reference
from tests.helpers import force_loop_n, interpreted


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
    if dtype == torch.bfloat16:  # the fold is the more accurate: no bf16 rounding of the sum before x is added
        m64 = SigmaMoE(16, 9, 8, 3).double()
        m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
        want = m64.forward_with_logits(x.detach().double(), add_input=True)[0]
        err = lambda t: (t.double() - want).norm().item()
        assert err(folded[0]) <= err(separate[0])
    with pytest.raises(ValueError, match="v_dim"):
        SigmaMoE(16, 9, 8, 3, v_dim=12).forward_with_logits(x, add_input=True)


# The Triton kernels of this operator, run on CPU tensors through TRITON_INTERPRET=1 (`interpreted`).
@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_mlp_through_the_kernels_matches_the_torch_path(dtype, monkeypatch):
    """The fused σ-MoE expert MLP (ReLU in the up projection's epilogue, its backward in the row dot),
    forward and backward, with every kernel on against the PyTorch path."""
    from moeut.ops import expert_mlp as mlp_module
    from tests.helpers import switch_kernels
    from tests.unit.test_expert_mlp import mlp_case

    r, x, w1, w2, gate, gy = mlp_case(dtype, seed=11)
    runs = []
    for kernels in (False, True):
        switch_kernels(monkeypatch, lambda t, switch=None, on=kernels: on)
        out = mlp_module.expert_mlp(x, w1, w2, r, gate)
        runs.append((out, *torch.autograd.grad(out, (x, w1, w2, gate), gy)))
    # relative (norm) error: bf16 values here reach ~100, and the interpreter truncates where CUDA rounds
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for name, a, b in zip(("out", "dx", "dw1", "dw2", "dgate"), *runs):
        assert a.dtype == b.dtype
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert err < tol, f"{name}: relative error {err:.2e}"


def _expert_mlp_or_combine_case(case: str, seed: int):
    """(dtype, leaves, run, output gradient) of a gated projection with an expert that gets no row: the
    expert MLP ("mlp_bf16", "mlp_fp32") or a combine, narrower in than out ("combine_narrow_out"), wider
    ("combine_wide_in"), or with routed input rows ("combine_routed_input")."""
    from moeut.ops import expert_mlp as mlp_module, expert_mm as em
    from tests.helpers import combine_case
    from tests.unit.test_expert_mlp import mlp_case

    if case.startswith("mlp"):
        dtype = torch.bfloat16 if case == "mlp_bf16" else torch.float32
        r, x, w1, w2, gate, gy = mlp_case(dtype, seed=seed)
        return dtype, (x, w1, w2, gate), lambda: mlp_module.expert_mlp(x, w1, w2, r, gate), gy
    I, O = (5, 12) if case == "combine_narrow_out" else (12, 5)
    gather = case != "combine_routed_input"
    r, x, w, gate = combine_case(gather, 1, I, O, seed=seed)
    gy = torch.randn(gate.shape[0], O, generator=torch.Generator().manual_seed(seed + 100))
    return torch.float32, (x, w, gate), lambda: em.expert_mm_combine(x, w, r, gate, gather=gather), gy


@interpreted
@pytest.mark.parametrize(
    "case", ["mlp_bf16", "mlp_fp32", "combine_narrow_out", "combine_wide_in", "combine_routed_input"]
)
def test_gate_gradient_is_written_in_choice_order_with_no_permuting_copy(case, monkeypatch):
    """The row dots (and the value projection's epilogue dot) read the gates and write their gradient in
    (row, choice) order: the interpreted kernels' backward runs no index_copy, and every gradient (and
    the output) matches the PyTorch path (an expert that gets no row included)."""
    from tests.helpers import switch_kernels

    dtype, leaves, run, gy = _expert_mlp_or_combine_case(case, seed=5)
    results = []
    for kernels in (True, False):
        switch_kernels(monkeypatch, lambda t, switch=None, kernels=kernels: kernels)
        index_copies = []
        real_index_copy = torch.Tensor.index_copy_
        monkeypatch.setattr(
            torch.Tensor, "index_copy_", lambda self, *a: index_copies.append(1) or real_index_copy(self, *a)
        )
        out = run()
        results.append((out, *torch.autograd.grad(out, leaves, gy)))
        monkeypatch.setattr(torch.Tensor, "index_copy_", real_index_copy)
        if kernels:
            assert not index_copies, f"{len(index_copies)} index_copy_ calls on the kernel path"
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for name, a, b in zip(("out", *(f"d{i}" for i in range(len(leaves)))), *results):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < tol, name


@interpreted
@pytest.mark.parametrize("case", ["mlp_bf16", "mlp_fp32", "combine_narrow_out", "combine_wide_in"])
def test_weight_gradients_read_a_gated_operand_and_gather_no_gates(case, monkeypatch):
    """The backward's row-dot pass (or the value projection's input-gradient GEMM) writes one
    weight-gradient operand already gated, so no weight-gradient launch scales by a gate in its K loop;
    on the kernel path the backward gathers no gates (the kernels read them at each row's slot). Kernel
    path (interpreted, the value projection's input gradient in its loop-over-N form) against the
    PyTorch path; an expert that gets no row included."""
    from moeut.ops import expert_mlp as mlp_module, expert_mm as em
    from tests.helpers import switch_kernels

    force_loop_n(monkeypatch, True)  # (the tiny shapes would not pick it)
    dtype, leaves, run, gy = _expert_mlp_or_combine_case(case, seed=7)
    scales = []
    real = {m: m.weight_grad for m in (em, mlp_module)}
    for m, f in real.items():
        monkeypatch.setattr(m, "weight_grad", lambda *a, f=f, **k: scales.append(a[6] is not None) or f(*a, **k))
    results = {}
    for kernels in (True, False):
        switch_kernels(monkeypatch, lambda t, switch=None, kernels=kernels: kernels)
        scales.clear()
        out = run()
        gathers = []
        real_index_select = torch.Tensor.index_select
        monkeypatch.setattr(
            torch.Tensor, "index_select", lambda self, *a: gathers.append(1) or real_index_select(self, *a)
        )
        results[kernels] = (out, *torch.autograd.grad(out, leaves, gy))
        monkeypatch.setattr(torch.Tensor, "index_select", real_index_select)
        assert scales and not any(scales), scales
        if kernels:
            assert not gathers, f"{len(gathers)} index_select calls in the gated backward on the kernel path"
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for name, a, b in zip(("out", *(f"d{i}" for i in range(len(leaves)))), results[True], results[False]):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < tol, name
