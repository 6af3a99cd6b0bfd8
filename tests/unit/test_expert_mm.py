"""moeut::expert_mm against the gather + einsum reference: forward and backward, fp32 and bf16."""

import pytest
import torch

from moeut.ops.expert_mm import combine, expert_mm, route
from moeut.ops.reference import reference_expert_mm
from moeut.ops.grouped_mm import grouped_mm_reference, weight_grad_reference
from moeut.kernels import expert_mm as triton_expert_mm
from moeut.kernels.expert_mm import grouped_mm_triton
from moeut.kernels.weight_grad import grouped_mm_weight_grad_triton
from tests.helpers import force_loop_n, interpreted


def _routing_case(kind, R, K, E, gen):
    if kind == "random":
        return torch.randint(0, E, (R, K), generator=gen)
    if kind == "one_expert":
        return torch.zeros(R, K, dtype=torch.long)
    if kind == "empty_experts":  # only even experts ever chosen
        return 2 * torch.randint(0, E // 2, (R, K), generator=gen)
    raise ValueError(kind)


def test_route_is_consistent():
    gen = torch.Generator().manual_seed(1)
    e = torch.randint(0, 7, (50, 3), generator=gen)
    r = route(e, 7)
    assert r.offsets_E1[0] == 0 and r.offsets_E1[-1] == 150
    counts = r.offsets_E1[1:] - r.offsets_E1[:-1]
    assert torch.equal(counts, torch.bincount(e.flatten(), minlength=7))
    flat = e.flatten()
    # routed position of (r, k) really holds expert e[r, k] and reads row r
    sorted_experts = flat[torch.argsort(flat, stable=True)]
    assert torch.equal(sorted_experts[r.choice_RK], e)
    assert torch.equal(r.rows_N[r.choice_RK], torch.arange(50)[:, None].expand(50, 3))
    assert torch.equal(r.slot_N[r.choice_RK].view(-1), torch.arange(150))  # slot is the inverse of choice


@pytest.mark.parametrize("kind", ["random", "one_expert", "empty_experts"])
@pytest.mark.parametrize("R,K,E,I,O", [(37, 3, 6, 20, 33), (64, 1, 4, 16, 16), (5, 2, 9, 7, 3)])
def test_expert_mm_matches_reference_fp32(kind, R, K, E, I, O):
    gen = torch.Generator().manual_seed(R * 31 + K)
    expert = _routing_case(kind, R, K, E, gen)
    x = torch.randn(R, I, generator=gen, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(E, I, O, generator=gen).requires_grad_()
    r = route(expert, E)
    y = expert_mm(x, w, r)
    g = torch.randn(y.shape, generator=gen)
    y.backward(g)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = reference_expert_mm(x2, w2, expert)
    ref.backward(g[r.choice_RK])
    torch.testing.assert_close(y[r.choice_RK], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-5)
    unused = torch.ones(E, dtype=torch.bool)
    unused[expert.unique()] = False
    assert (w.grad[unused] == 0).all()


def test_expert_mm_no_gather_and_combine():
    gen = torch.Generator().manual_seed(3)
    R, K, E, I, O = 20, 2, 5, 8, 6
    expert = torch.randint(0, E, (R, K), generator=gen)
    r = route(expert, E)
    h = torch.randn(R * K, I, generator=gen, requires_grad=True)  # already in routed order
    w = torch.randn(E, I, O, generator=gen, requires_grad=True)
    gate = torch.rand(R, K, generator=gen, requires_grad=True)
    out = combine(expert_mm(h, w, r, gather=False), r.choice_RK, gate)
    # reference: choice (r, k) reads routed row choice[r, k]
    h_RKI = h[r.choice_RK]
    ref = torch.einsum("rk,rki,rkio->ro", gate, h_RKI, w[expert])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (h, w, gate), gy)
    grads_ref = torch.autograd.grad(ref, (h, w, gate), gy)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_expert_mm_bf16_autocast():
    gen = torch.Generator().manual_seed(4)
    R, K, E, I, O = 48, 4, 8, 32, 24
    expert = torch.randint(0, E, (R, K), generator=gen)
    x = torch.randn(R, I, generator=gen, requires_grad=True)
    w = torch.randn(E, I, O, generator=gen, requires_grad=True)
    r = route(expert, E)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = expert_mm(x, w, r)
    assert y.dtype == torch.bfloat16
    g = torch.randn(y.shape, generator=gen)
    y.float().backward(g)
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = reference_expert_mm(xd, wd, expert)
    ref.backward(g.double()[r.choice_RK])

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    assert rel(y[r.choice_RK], ref) < 1e-2
    assert rel(x.grad, xd.grad) < 1e-2
    assert rel(w.grad, wd.grad) < 1e-2


def test_expert_mm_rejects_mismatched_dtypes():
    r = route(torch.zeros(4, 1, dtype=torch.long), 2)
    with pytest.raises(TypeError, match="dtype"):
        expert_mm(torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 3, 5), r)


def test_opcheck():
    from moeut.ops.grouped_mm import grouped_mm, grouped_mm_weight_grad

    gen = torch.Generator().manual_seed(5)
    expert = torch.randint(0, 4, (10, 2), generator=gen)
    r = route(expert, 4)
    x = torch.randn(10, 6, generator=gen)
    w = torch.randn(4, 6, 5, generator=gen)
    scale = torch.rand(20, generator=gen)
    for rows, inp in ((r.rows_N, x), (None, torch.randn(20, 6, generator=gen))):
        for sc, dst in ((None, None), (scale, None), (scale, r.slot_N), (None, r.slot_N)):
            torch.library.opcheck(grouped_mm, (inp, w, r.offsets_E1, rows, sc, dst))
    g = torch.randn(20, 5, generator=gen)
    torch.library.opcheck(grouped_mm_weight_grad, (x, g, r.offsets_E1, r.rows_N, None, None, torch.float32))
    g_rows = torch.randn(10, 5, generator=gen)
    torch.library.opcheck(grouped_mm_weight_grad, (x, g_rows, r.offsets_E1, r.rows_N, r.rows_N, scale, torch.float32))
    torch.library.opcheck(
        grouped_mm_weight_grad, (x.bfloat16(), g.bfloat16(), r.offsets_E1, r.rows_N, None, None, torch.float32)
    )
    from moeut.ops.grouped_mm import grouped_mm_weight_grad_add, sum_choices

    acc = torch.randn(4, 6, 5, generator=gen)
    torch.library.opcheck(grouped_mm_weight_grad_add, (acc, x, g_rows, r.offsets_E1, r.rows_N, r.rows_N, scale))
    want = acc + grouped_mm_weight_grad(x, g, r.offsets_E1, r.rows_N, None, None, torch.float32)
    grouped_mm_weight_grad_add(acc, x, g, r.offsets_E1, r.rows_N, None, None)
    assert torch.equal(acc, want)
    torch.library.opcheck(
        grouped_mm_weight_grad, (x, g_rows, r.offsets_E1, r.rows_N, r.rows_N, scale, torch.float32, r.slot_N)
    )
    torch.library.opcheck(
        grouped_mm_weight_grad_add, (acc, x, g_rows, r.offsets_E1, r.rows_N, r.rows_N, scale, r.slot_N)
    )
    from moeut.ops.grouped_mm import row_dot

    a20 = torch.randn(20, 6, generator=gen)
    torch.library.opcheck(row_dot, (a20, x, r.rows_N, scale, r.slot_N))
    dot = row_dot(a20, x, r.rows_N, None, r.slot_N)[0]
    assert torch.equal(dot[r.slot_N], row_dot(a20, x, r.rows_N, None)[0])
    torch.library.opcheck(row_dot, (a20, x, r.rows_N, scale, None, False, r.slot_N))
    dot_s, scaled_s, _ = row_dot(a20, x, r.rows_N, scale, None, False, r.slot_N)  # scaled rows written at slot[n]
    dot_p, scaled_p, _ = row_dot(a20, x, r.rows_N, scale)
    assert torch.equal(dot_s, dot_p) and torch.equal(scaled_s[r.slot_N], scaled_p)
    torch.library.opcheck(row_dot, (a20, x, r.rows_N, scale, r.slot_N, True, r.slot_N, True))
    gated = row_dot(a20, x, r.rows_N, scale, r.slot_N, gate_b=True)[2]  # gate * b, routed order, scale read at dst
    assert torch.equal(gated, (x[r.rows_N] * scale[r.slot_N, None]).to(x.dtype))
    y = torch.randn(20, 5, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(sum_choices, (y.to(dtype), 10, torch.float32))
    assert torch.equal(sum_choices(y, 10, torch.float32), y.view(10, 2, 5).sum(1))


def test_grouped_mm_dot_matches_reference():
    """grouped_mm_dot: the grouped GEMM (gathered, scaled, scattered) and the dot of each routed row's
    unscaled product with a gathered row of another tensor, written at dot_dst or in routed order.
    This is how SwitchHead's value projection gets its gate gradient <d v, x W> as <d v W^T, x>."""
    from moeut.ops.grouped_mm import grouped_mm, grouped_mm_dot

    gen = torch.Generator().manual_seed(9)
    R, K, E, I, O = 13, 2, 5, 7, 9
    expert = 2 * torch.randint(0, 3, (R, K), generator=gen)  # odd experts stay empty
    r = route(expert, E)
    g = torch.randn(R, I, generator=gen, dtype=torch.float64)  # d out, one row per output row
    w = torch.randn(E, I, O, generator=gen, dtype=torch.float64)  # (the transposed projection weight)
    x = torch.randn(R, O, generator=gen, dtype=torch.float64)  # the projection's input
    gate = torch.rand(R * K, generator=gen, dtype=torch.float64)
    for dot_dst in (None, r.slot_N):
        out, dot, gated = grouped_mm_dot(
            g,
            w,
            r.offsets_E1,
            r.rows_N,
            gate[r.slot_N],
            r.slot_N,
            False,
            x,
            r.rows_N,
            dot_dst,
            gate_x=dot_dst is not None,
        )
        assert torch.equal(out, grouped_mm(g, w, r.offsets_E1, r.rows_N, gate[r.slot_N], r.slot_N))
        if dot_dst is None:
            assert gated.shape == (0, I)
        else:  # routed row n's input row times its gate, in routed order
            assert torch.equal(gated, g[r.rows_N] * gate[r.slot_N, None])
        ref_RK = torch.einsum("ri,rkio,ro->rk", g, w[expert], x)  # <g_r W[e_rk], x_r>
        dot_slot = dot if dot_dst is not None else torch.empty_like(dot).index_copy_(0, r.slot_N, dot)
        torch.testing.assert_close(dot_slot.view(R, K), ref_RK)
    torch.library.opcheck(
        grouped_mm_dot,
        (
            g.float(),
            w.float(),
            r.offsets_E1,
            r.rows_N,
            gate[r.slot_N].float(),
            r.slot_N,
            False,
            x.float(),
            r.rows_N,
            None,
        ),
    )
    torch.library.opcheck(
        grouped_mm_dot,
        (g.float(), w.float(), r.offsets_E1, r.rows_N, gate.float(), r.slot_N, True, x.float(), r.rows_N, r.slot_N),
    )
    torch.library.opcheck(
        grouped_mm_dot,
        (
            g.float(),
            w.float(),
            r.offsets_E1,
            r.rows_N,
            gate.float(),
            r.slot_N,
            True,
            x.float(),
            r.rows_N,
            r.slot_N,
            True,
        ),
    )


def test_grouped_mm_scale_and_scatter_match_reference():
    """out[dst[n]] = scale[n] * x[rows[n]] @ w[e(n)]: with dst = slot, row r*K+k holds choice (r, k)."""
    from moeut.ops.grouped_mm import grouped_mm, grouped_mm_weight_grad

    gen = torch.Generator().manual_seed(8)
    R, K, E, I, O = 30, 3, 7, 9, 11
    expert = 2 * torch.randint(0, 3, (R, K), generator=gen)  # odd experts stay empty
    r = route(expert, E)
    x = torch.randn(R, I, generator=gen, dtype=torch.float64)
    w = torch.randn(E, I, O, generator=gen, dtype=torch.float64)
    gate = torch.rand(R, K, generator=gen, dtype=torch.float64)
    ref_RKO = reference_expert_mm(x, w, expert) * gate[..., None]
    out = grouped_mm(x, w, r.offsets_E1, r.rows_N, gate.view(-1)[r.slot_N], r.slot_N)
    torch.testing.assert_close(out.view(R, K, O), ref_RKO)
    # weight gradient with gathered, gate-scaled gradient rows: rows of g_RO are per input row
    g_RO = torch.randn(R, O, generator=gen, dtype=torch.float64)
    got = grouped_mm_weight_grad(x, g_RO, r.offsets_E1, r.rows_N, r.rows_N, gate.view(-1)[r.slot_N], torch.float64)
    want = torch.zeros(E, I, O, dtype=torch.float64)
    for rr in range(R):
        for k in range(K):
            want[expert[rr, k]] += gate[rr, k] * torch.outer(x[rr], g_RO[rr])
    torch.testing.assert_close(got, want)
    assert (got[1::2] == 0).all()


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("I,O", [(10, 7), (5, 12)])  # both ways of getting the gate gradient
def test_expert_mm_combine_matches_unfused(gather, groups, I, O):
    """The fused projection+combine equals combine(expert_mm(...)) in value and gradients."""
    from moeut.ops.expert_mm import expert_mm_combine
    from tests.helpers import combine_case

    r, x, w, gate = combine_case(gather, groups, I, O, seed=6 + I)
    gen = torch.Generator().manual_seed(7)
    fused = expert_mm_combine(x, w, r, gate, gather=gather)
    plain = combine(expert_mm(x, w, r, gather=gather), r.choice_RK.view(gate.shape), gate)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    gy = torch.randn(fused.shape, generator=gen)
    for a, b in zip(torch.autograd.grad(fused, (x, w, gate), gy), torch.autograd.grad(plain, (x, w, gate), gy)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("I,O", [(16, 40), (40, 16)])
def test_expert_mm_combine_bf16_autocast(I, O):
    """Under bf16 autocast the fused combine stays close to the fp64 reference, values and gradients."""
    from moeut.ops.expert_mm import expert_mm_combine

    gen = torch.Generator().manual_seed(9)
    R, K, E = 40, 4, 6
    expert = torch.randint(0, E, (R, K), generator=gen)
    r = route(expert, E)
    x = torch.randn(R, I, generator=gen, requires_grad=True)
    w = torch.randn(E, I, O, generator=gen, requires_grad=True)
    gate = torch.rand(R, K, generator=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = expert_mm_combine(x, w, r, gate)
    gy = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out.float(), (x, w, gate), gy)
    xd, wd, gd = (t.detach().double().requires_grad_() for t in (x, w, gate))
    ref = torch.einsum("rk,ri,rkio->ro", gd, xd, wd[expert])
    want = torch.autograd.grad(ref, (xd, wd, gd), gy.double())

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    assert out.dtype == torch.bfloat16 and rel(out, ref) < 1e-2
    for a, b in zip(got, want):
        assert rel(a, b) < 2e-2


def test_operand_cast_traces_without_graph_breaks(monkeypatch):
    """The autograd Functions' operand cast runs inside torch.compile's trace (fullgraph): on the
    fused path it must not touch data pointers (it leaves the padding to the operator there)."""
    from moeut.ops import expert_mm as expert_mm_module

    monkeypatch.setattr(expert_mm_module, "use_fused", lambda t, switch=None: True)
    w = torch.randn(3, 128, 82)  # misaligned rows: eagerly a padded copy
    eager = expert_mm_module.kernel_operand(w, torch.bfloat16, weight=True)
    assert eager.dtype == torch.bfloat16 and eager.stride(1) % 16 == 0
    torch._dynamo.reset()
    # an intermediate tensor (like the residual stream) has no real storage while tracing
    traced = torch.compile(lambda t: expert_mm_module.kernel_operand(t * 2, torch.bfloat16), fullgraph=True)(w)
    assert torch.equal(traced, (w * 2).to(torch.bfloat16))


def test_combine_residual_of_the_wrong_shape_is_rejected():
    from moeut.ops.expert_mm import expert_mm_combine

    r = route(torch.tensor([[0, 1], [1, 2]]), 3)
    x, w, gate = torch.randn(2, 4), torch.randn(3, 4, 5), torch.rand(2, 2)
    with pytest.raises(ValueError, match="residual of shape"):
        expert_mm_combine(x, w, r, gate, residual_XO=torch.randn(2, 4))
    out = expert_mm_combine(x, w, r, gate, residual_XO=torch.zeros(2, 5, dtype=torch.float64))
    assert out.dtype == torch.float64  # the residual's dtype


def test_settings_come_from_the_environment_and_bad_values_are_named():
    from moeut.settings import Settings

    assert Settings.from_env({}) == Settings()
    s = Settings.from_env(
        {"MOEUT_TRITON": "0", "MOEUT_AUTOTUNE": "0", "MOEUT_PYTORCH_OPS": "rope, norm", "MOEUT_WGRAD_DEFER": "2"}
    )
    assert (s.triton, s.autotune, s.pytorch_ops, s.wgrad_defer) == (False, False, {"rope", "norm"}, 2)
    for env, message in (
        ({"MOEUT_WGRAD_DEFER": "three"}, "MOEUT_WGRAD_DEFER must be a whole number.*'three'"),
        ({"MOEUT_WGRAD_DEFER": "12"}, "from 0 to 9"),
        ({"MOEUT_TRITON": "no"}, "MOEUT_TRITON must be 0 or 1"),
        ({"MOEUT_PYTORCH_OPS": "rope,gemm"}, r"unknown operators \['gemm'\]"),
    ):
        with pytest.raises(ValueError, match=message):
            Settings.from_env(env)


def test_pytorch_ops_send_one_operator_back_to_pytorch(monkeypatch):
    """`use_fused` says no for an operator named in `settings.pytorch_ops`, and for every operator with
    `settings.triton` off (decided before Triton is looked at: a CPU tensor never qualifies)."""
    from moeut.ops import dispatch as fused
    from moeut.settings import settings

    if triton_expert_mm.triton is None:
        pytest.skip("needs Triton importable")
    cuda_like = type("T", (), {"device": torch.device("cuda")})()
    assert fused.use_fused(cuda_like, "rope") and fused.use_fused(cuda_like)
    monkeypatch.setattr(settings, "pytorch_ops", frozenset({"rope"}))
    assert not fused.use_fused(cuda_like, "rope") and fused.use_fused(cuda_like, "norm")
    monkeypatch.setattr(settings, "triton", False)
    assert not fused.use_fused(cuda_like, "norm") and not fused.use_fused(cuda_like)
    assert not fused.use_fused(torch.zeros(1))


def test_by_default_one_launch_sums_every_application_of_a_weight():
    """The default deferral covers every application of a shared weight in the paper's models
    (n_layers / group_size), so each weight's gradient takes one launch and its fp32 sum is written
    once; the kernel's segment limit is no lower."""
    import os
    import subprocess
    import sys
    from moeut import profiles
    from moeut.kernels.weight_grad import MAX_SEGMENTS

    env = {k: v for k, v in os.environ.items() if k != "MOEUT_WGRAD_DEFER"}
    code = "from moeut.settings import settings; print(settings.wgrad_defer)"
    default = int(
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    )
    most = max(p["n_layers"] // p["group_size"] for p in profiles.MOEUT_PROFILES.values())
    assert min(default, MAX_SEGMENTS) >= most == 9


# The Triton kernels of this operator, run on CPU tensors through TRITON_INTERPRET=1 (`interpreted`).
@interpreted
@pytest.mark.parametrize("kind", ["random", "one_expert", "empty_experts"])
@pytest.mark.parametrize("R,K,E,I,O", [(37, 3, 5, 20, 33), (16, 1, 3, 16, 16), (9, 2, 17, 40, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loop_n", [False, True], ids=["column_blocks", "loop_n"])
def test_triton_matches_reference(kind, R, K, E, I, O, dtype, loop_n, monkeypatch):
    # Both forms of the grouped GEMM: one program per (row tile, column block), or per row tile
    # walking every column block (what narrow inputs such as the FFN down projection use).
    force_loop_n(monkeypatch, loop_n)
    gen = torch.Generator().manual_seed(R + 7 * E)
    if kind == "random":
        expert = torch.randint(0, E, (R, K), generator=gen)
    elif kind == "one_expert":
        expert = torch.full((R, K), E - 1)
    else:
        expert = 2 * torch.randint(0, (E + 1) // 2, (R, K), generator=gen)
    r = route(expert, E)
    x = torch.randn(R, I, generator=gen).to(dtype)
    w = torch.randn(E, I, O, generator=gen).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)

    out = grouped_mm_triton(x, w, r.offsets_E1, r.rows_N)
    ref = reference_expert_mm(x.float(), w.float(), expert)
    torch.testing.assert_close(out[r.choice_RK].float(), ref, **tol)
    # ReLU in the epilogue (before rounding; rounding keeps signs, so it equals a ReLU after it)
    assert torch.equal(grouped_mm_triton(x, w, r.offsets_E1, r.rows_N, relu=True), out.relu())

    if dtype == torch.bfloat16:  # an fp32 master weight, rounded tile by tile as the kernel loads it
        gen32 = torch.Generator().manual_seed(R * E)
        w32 = torch.randn(E, I, O, generator=gen32)  # (the interpreter truncates: one more bf16 ulp of slack)
        tol32 = dict(rtol=2e-2, atol=6e-2)
        torch.testing.assert_close(
            grouped_mm_triton(x, w32, r.offsets_E1, r.rows_N)[r.choice_RK].float(),
            reference_expert_mm(x.float(), w32.to(dtype).float(), expert),
            **tol32,
        )
        g32 = torch.randn(R * K, O, generator=gen32).to(dtype)
        torch.testing.assert_close(
            grouped_mm_triton(g32, w32.transpose(1, 2), r.offsets_E1, None).float(),
            grouped_mm_reference(g32, w32.transpose(1, 2), r.offsets_E1, None).float(),
            **tol32,
        )

    h = torch.randn(R * K, I, generator=gen).to(dtype)  # no gather: rows already routed
    torch.testing.assert_close(
        grouped_mm_triton(h, w, r.offsets_E1, None).float(),
        grouped_mm_reference(h.float(), w.float(), r.offsets_E1, None),
        **tol,
    )
    # input-gradient form: a transposed (non-contiguous) weight view
    g = torch.randn(R * K, O, generator=gen).to(dtype)
    torch.testing.assert_close(
        grouped_mm_triton(g, w.transpose(1, 2), r.offsets_E1, None).float(),
        grouped_mm_reference(g.float(), w.float().transpose(1, 2), r.offsets_E1, None),
        **tol,
    )
    # weight gradient, with and without gather; unused experts get exact zeros
    for rows, inp in ((r.rows_N, x), (None, h)):
        got = grouped_mm_weight_grad_triton(inp, g, r.offsets_E1, rows)
        want = weight_grad_reference(inp.float(), g.float(), r.offsets_E1, rows)
        torch.testing.assert_close(got.float(), want, **tol)
        counts = r.offsets_E1[1:] - r.offsets_E1[:-1]
        assert (got[counts == 0] == 0).all()

    # epilogue: gate scale in fp32 and scatter to (row, choice) order
    gate = torch.rand(R * K, generator=gen)
    got = grouped_mm_triton(x, w, r.offsets_E1, r.rows_N, gate[r.slot_N], r.slot_N)
    torch.testing.assert_close(got.float().view(R, K, O), ref * gate.view(R, K, 1), **tol)
    # the same gates read unpermuted, at each row's destination (what the combine forward passes)
    assert torch.equal(grouped_mm_triton(x, w, r.offsets_E1, r.rows_N, gate, r.slot_N, scale_at_dst=True), got)
    # weight gradient reading gathered gradient rows (one row per input row), the gate applied to the
    # input rows; against the reference with the same operands and rounding
    g_R = torch.randn(R, O, generator=gen).to(dtype)
    got = grouped_mm_weight_grad_triton(x, g_R, r.offsets_E1, r.rows_N, r.rows_N, gate[r.slot_N], torch.float32)
    want = weight_grad_reference(x, g_R, r.offsets_E1, r.rows_N, r.rows_N, gate[r.slot_N], torch.float32)
    # (norm-relative: the interpreter truncates the scaled bf16 rows where the reference rounds them)
    err = ((got - want).norm() / want.norm()).item()
    assert err < (1e-6 if dtype == torch.float32 else 1e-2), f"relative error {err:.2e}"


@interpreted
@pytest.mark.parametrize("gather,scale", [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_row_dot_matches_reference(gather, scale, dtype):
    """Row dot products (the combine's gate gradient) with optional gathered rows of b and a gate-scaled
    copy of a, against the plain form."""
    from moeut.kernels.expert_mm import row_dot_triton

    gen = torch.Generator().manual_seed(3)
    N, M, I = 23, 9, 40
    a = torch.randn(N, I, generator=gen).to(dtype)
    b = torch.randn(M if gather else N, I, generator=gen).to(dtype)
    rows = torch.randint(0, M, (N,), generator=gen) if gather else None
    s = torch.rand(N, generator=gen) if scale else None
    dot, scaled, gated = row_dot_triton(a, b, rows, s)
    assert gated.shape == (0, I)
    b_N = b[rows] if gather else b
    torch.testing.assert_close(dot, (a.float() * b_N.float()).sum(-1), rtol=1e-5, atol=1e-5)
    if scale:
        torch.testing.assert_close(
            scaled.float(),
            (a.float() * s[:, None]),
            rtol=1e-2 if dtype != torch.float32 else 1e-6,
            atol=1e-2 if dtype != torch.float32 else 1e-6,
        )
        # b a ReLU's output: the scaled rows are zero where b is (the gradient of the ReLU's input)
        b_relu = b.relu()
        dot_r, scaled_r, _ = row_dot_triton(a, b_relu, rows, s, relu_mask=True)
        b_N_relu = b_relu[rows] if gather else b_relu
        assert torch.equal(scaled_r, torch.where(b_N_relu > 0, scaled, torch.zeros((), dtype=dtype)))
        assert (scaled_r == 0).any() and (scaled_r != 0).any()
    else:
        assert scaled.shape == (0, I)
    # dst (a permutation): the scale read at dst[n] (bf16 gates too), the dot written to dot[dst[n]]
    dst = torch.randperm(N, generator=gen)
    s_dst = s.to(dtype) if scale else None
    dot2, scaled2, _ = row_dot_triton(a, b, rows, s_dst, dst)
    assert torch.equal(dot2[dst], dot)
    if scale:
        want = (a.float() * s_dst.float()[dst][:, None]).to(dtype)
        torch.testing.assert_close(scaled2, want, rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=1e-6)
        # gate_b: b's (gathered) rows times the gate read at dst[n], rounded once, in routed order
        dot_g, scaled_g, gated = row_dot_triton(a, b, rows, s_dst, dst, gate_b=True)
        assert torch.equal(dot_g, dot2) and torch.equal(scaled_g, scaled2)
        torch.testing.assert_close(
            gated,
            (b_N.float() * s_dst.float()[dst][:, None]).to(dtype),
            rtol=0 if dtype == torch.float32 else 1e-2,
            atol=0,
        )
        # scaled_dst: the scaled rows written at scaled_dst[n] (a permutation), the dot unchanged
        perm = torch.randperm(N, generator=gen)
        dot3, scaled3, _ = row_dot_triton(a, b, rows, s, scaled_dst_N=perm)
        assert torch.equal(dot3, dot) and torch.equal(scaled3[perm], scaled)


@interpreted
@pytest.mark.parametrize("R,K,E", [(1, 16, 387), (32, 16, 387), (5, 3, 4), (64, 2, 40), (7, 1, 1)])
def test_triton_route_small_matches_route(R, K, E):
    """The one-kernel routing of small inputs (decoding) against the torch sort path, exactly."""
    from moeut.ops.expert_mm import route
    from moeut.kernels.route import route_small_triton

    gen = torch.Generator().manual_seed(R * K + E)
    expert = torch.randint(0, E, (R, K), generator=gen)
    expert[0, 0] = E - 1
    want = route(expert, E)
    offsets, rows, slot, choice = route_small_triton(expert, E)
    assert torch.equal(offsets, want.offsets_E1)
    assert torch.equal(slot, want.slot_N)
    assert torch.equal(rows, want.rows_N)
    assert torch.equal(choice, want.choice_RK)


@interpreted
@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("I,O", [(10, 7), (5, 12)])  # both ways of getting the gate gradient
def test_combine_through_the_kernels_matches_the_torch_path(gather, groups, I, O, monkeypatch):
    """`expert_mm` and the fused `expert_mm_combine`, forward and backward, with every kernel on
    (grouped GEMM, weight gradient, row dot, top-k sum) against the same autograd Functions on the
    PyTorch path: values and the gradients of x, w and the gates."""
    from moeut.ops import expert_mm as em
    from tests.helpers import combine_case, switch_kernels

    r, x, w, gate = combine_case(gather, groups, I, O, seed=6 + I + groups)
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(gate.shape[0], O, generator=gen)
    gh = torch.randn(r.slot_N.numel(), O, generator=gen)
    runs = []
    for kernels in (False, True):
        switch_kernels(monkeypatch, lambda t, switch=None, on=kernels: on)
        fused = em.expert_mm_combine(x, w, r, gate, gather=gather)
        routed = em.expert_mm(x, w, r, gather=gather)
        grads = torch.autograd.grad((fused, routed), (x, w, gate), (gy, gh), allow_unused=True)
        runs.append((fused, routed, *[g for g in grads if g is not None]))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@interpreted
@pytest.mark.parametrize("I,O", [(10, 7), (5, 12)])
def test_combine_with_residual_through_the_kernels_matches_the_torch_path(I, O, monkeypatch):
    """`expert_mm_combine(..., residual_XO=r)`: r added inside the top-k sum kernel, its gradient passed
    through, against the PyTorch path and against a separate add."""
    from moeut.ops import expert_mm as em
    from tests.helpers import combine_case, switch_kernels

    r, x, w, gate = combine_case(True, 1, I, O, seed=3 + I)
    gen = torch.Generator().manual_seed(2)
    res = torch.randn(gate.shape[0], O, generator=gen, requires_grad=True)
    gy = torch.randn(gate.shape[0], O, generator=gen)
    runs = []
    for kernels in (False, True):
        switch_kernels(monkeypatch, lambda t, switch=None, on=kernels: on)
        out = em.expert_mm_combine(x, w, r, gate, residual_XO=res)
        runs.append((out, *torch.autograd.grad(out, (x, w, gate, res), gy)))
        torch.testing.assert_close(out, res + em.expert_mm_combine(x, w, r, gate), rtol=1e-5, atol=1e-5)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(runs[1][-1], gy)  # the residual's gradient is the output's
