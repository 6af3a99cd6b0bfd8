"""The grouped matmul operator's Triton kernels (forward, weight gradient, choice sums, aligned
copies, shared-weight deferral), run on CPU tensors through TRITON_INTERPRET=1, against the
PyTorch reference."""

import pytest
import torch

from moeut.ops.expert_mm import route
from moeut.ops.grouped_mm import grouped_mm_reference, weight_grad_reference
from moeut.kernels import weight_grad as triton_weight_grad
from moeut.kernels.expert_mm import grouped_mm_triton
from moeut.kernels.weight_grad import grouped_mm_weight_grad_triton
from tests.helpers import force_loop_n, force_wgrad_splits, interpreted


@interpreted
@pytest.mark.parametrize("loop_n", [True, False], ids=["epilogue_dot", "recomputed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_grouped_mm_dot_matches_torch(loop_n, dtype, monkeypatch):
    """The input-gradient GEMM with the row dot in its epilogue (loop over N), and the fallback that
    recomputes the forward product, against the PyTorch path: output bitwise, dot within rounding."""
    from moeut.kernels.expert_mm import row_dot_triton

    force_loop_n(monkeypatch, loop_n)
    gen = torch.Generator().manual_seed(4)
    R, K, E, I, O = 19, 2, 6, 12, 40
    expert = 2 * torch.randint(0, E // 2, (R, K), generator=gen)  # odd experts stay empty
    r = route(expert, E)
    g = torch.randn(R, I, generator=gen).to(dtype)
    w = torch.randn(E, I, O, generator=gen).to(dtype)
    x = torch.randn(R, O, generator=gen).to(dtype)
    gate = torch.rand(R * K, generator=gen)
    for dot_dst in (None, r.slot_N):
        if loop_n:
            out, dot, gated = grouped_mm_triton(
                g,
                w,
                r.offsets_E1,
                r.rows_N,
                gate,
                r.slot_N,
                True,
                dot_x_MO=x,
                dot_rows_N=r.rows_N,
                dot_dst_N=dot_dst,
                gate_x=dot_dst is not None,
            )
            if dot_dst is None:
                assert gated.shape == (0, I)
            else:  # the gated input rows, in routed order (the weight gradient's operand), rounded once
                # (the interpreter truncates to bf16 where CUDA rounds: within one bf16 step there)
                tol = 0 if dtype == torch.float32 else 1e-2
                torch.testing.assert_close(
                    gated, (g[r.rows_N].float() * gate[r.slot_N, None]).to(dtype), rtol=tol, atol=0
                )
        else:  # what moeut::grouped_mm_dot runs where the loop-over-N form does not apply
            out = grouped_mm_triton(g, w, r.offsets_E1, r.rows_N, gate, r.slot_N, True)
            y = grouped_mm_triton(x, w.transpose(1, 2), r.offsets_E1, r.rows_N)
            dot = row_dot_triton(y, g, r.rows_N, None, dot_dst)[0]
        assert torch.equal(out, grouped_mm_triton(g, w, r.offsets_E1, r.rows_N, gate, r.slot_N, True))
        plain = grouped_mm_reference(g.double(), w.double(), r.offsets_E1, r.rows_N)
        want = (plain * x.double()[r.rows_N]).sum(-1)
        if dot_dst is not None:
            want = torch.empty_like(want).index_copy_(0, dot_dst, want)
        err = ((dot.double() - want).norm() / want.norm()).item()
        assert err < (1e-6 if dtype == torch.float32 else 1e-2), err


@interpreted
def test_loop_over_n_only_with_many_rows_per_expert():
    """The one-program-per-row-tile form pays with hundreds of rows per expert (training) and cost 2x
    at batch-32 decoding (512 rows over 387 experts) on the H200; the policy keeps them apart."""
    from moeut.kernels.expert_mm import use_loop_n

    assert use_loop_n(128, 1024, 16384 * 16, 387)  # 244M FFN down projection, training
    assert not use_loop_n(128, 1024, 32 * 16, 387)  # the same at batch-32 decoding
    assert not use_loop_n(1024, 128, 16384 * 16, 387)  # wide input: the input tile would not fit
    assert not use_loop_n(128, 128, 16384 * 16, 387)  # one column block: nothing to loop over


@interpreted
def test_aligned_copies_keep_values_and_fix_row_strides():
    from moeut.kernels.expert_mm import ALIGN, aligned

    x = torch.randn(7, 412)
    w = torch.randn(3, 128, 82)
    for t in (x, w, w.transpose(1, 2), x[:, 1:]):
        a = aligned(t)
        assert torch.equal(a, t) and a.shape == t.shape
        order = sorted(range(a.dim()), key=lambda d: -a.stride(d))
        assert all(a.stride(d) % ALIGN == 0 for d in order[:-1]) and a.stride(order[-1]) == 1
    ok = torch.randn(5, 128)
    assert aligned(ok) is ok  # already aligned: no copy
    # a cast that pads only when it has to: one copy in the target dtype either way
    for t, padded in ((w.transpose(1, 2), True), (ok, False)):
        a = aligned(t, copy_dtype=torch.bfloat16, always_copy=True)
        assert a.dtype == torch.bfloat16 and torch.equal(a, t.to(torch.bfloat16))
        assert (a.stride() != t.stride()) == padded
    assert aligned(ok, copy_dtype=torch.bfloat16) is ok  # aligned and no copy asked for


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_weight_grad_accumulates_in_place(dtype):
    """accumulate_into: the kernel adds its fp32 tile into the accumulator (a shared weight's gradient
    summed over applications): equal to a separate add, and experts without rows keep their sums."""
    R, K, E, I, O = 23, 2, 6, 20, 24
    gen = torch.Generator().manual_seed(5)
    expert = 2 * torch.randint(0, E // 2, (R, K), generator=gen)  # odd experts get no rows
    r = route(expert, E)
    x = torch.randn(R, I, generator=gen).to(dtype)
    g_R = torch.randn(R, O, generator=gen).to(dtype)
    gate = torch.rand(R * K, generator=gen)
    acc0 = torch.randn(E, I, O, generator=gen)
    for args in (
        (x, g_R.repeat_interleave(K, 0)[r.slot_N], r.offsets_E1, r.rows_N),
        (x, g_R, r.offsets_E1, r.rows_N, r.rows_N, gate[r.slot_N]),
    ):
        acc = acc0.clone()
        out = grouped_mm_weight_grad_triton(*args, out_dtype=torch.float32, accumulate_into=acc)
        assert out is acc
        fresh = grouped_mm_weight_grad_triton(*args, out_dtype=torch.float32)
        assert torch.equal(acc, acc0 + fresh)
        assert torch.equal(acc[1::2], acc0[1::2])
    # gates read at each routed row's destination (scale_dst) instead of a permuted copy: same result
    at_dst = grouped_mm_weight_grad_triton(
        x, g_R, r.offsets_E1, r.rows_N, r.rows_N, gate, torch.float32, scale_dst_N=r.slot_N
    )
    assert torch.equal(at_dst, fresh)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["gather_x", "gated"])
@pytest.mark.parametrize("n_seg", [1, 2, 3, 4, 9])
def test_triton_weight_grad_segments_sum_applications(n_seg, layout, dtype):
    """One launch over several applications of a weight (each its own rows, routing, operands and row
    strides) equals the sum of their weight gradients, added to the accumulator; experts that no
    application routes to keep the accumulator's values exactly."""
    from moeut.kernels.weight_grad import weight_grad_segments_triton

    E, I, O, K = 7, 20, 24, 2
    gen = torch.Generator().manual_seed(11 * n_seg + len(layout))
    segments, want = [], torch.zeros(E, I, O)
    for s in range(n_seg):
        R = 9 + 6 * s  # applications of different sizes
        expert = 2 * torch.randint(0, (E + 1) // 2, (R, K), generator=gen)  # odd experts: no rows
        r = route(expert, E)
        # segment 1's operands are views with other row strides than the rest (48 and 64 elements)
        width = (lambda n: 48 if n == I else 64) if s == 1 else (lambda n: n)
        x = torch.randn(R, width(I), generator=gen).to(dtype)[:, :I]
        if layout == "gather_x":  # the FFN's up projection: x gathered, gradient rows already routed
            g = torch.randn(R * K, width(O), generator=gen).to(dtype)[:, :O]
            seg = (x, g, r.offsets_E1, r.rows_N, None, None, None)
        else:  # a gated down projection: both gathered, gates read at each row's destination
            g = torch.randn(R, width(O), generator=gen).to(dtype)[:, :O]
            seg = (x, g, r.offsets_E1, r.rows_N, r.rows_N, torch.rand(R * K, generator=gen), r.slot_N)
        segments.append(seg)
        want += weight_grad_reference(*seg[:6], torch.float32, seg[6])
    # (bf16: each application's gated operand rounded; the error of the sum grows with its length)
    bf16_atol = 5e-2 * max(1, n_seg / 3) ** 0.5
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=bf16_atol)
    torch.testing.assert_close(weight_grad_segments_triton(segments, torch.float32), want, **tol)
    acc0 = torch.randn(E, I, O, generator=gen)
    acc = acc0.clone()
    assert weight_grad_segments_triton(segments, accumulate_into=acc) is acc
    torch.testing.assert_close(acc, acc0 + want, **tol)
    assert torch.equal(acc[1::2], acc0[1::2])
    if n_seg == 1:  # the single-application entry point is the same launch
        single = grouped_mm_weight_grad_triton(*segments[0][:6], torch.float32, scale_dst_N=segments[0][6])
        assert torch.equal(single, weight_grad_segments_triton(segments, torch.float32))


@interpreted
@pytest.mark.parametrize("splits", [2, 3, 8])
@pytest.mark.parametrize("accumulate", [False, True])
def test_triton_weight_grad_split_over_rows_matches_one_program_per_tile(splits, accumulate, monkeypatch):
    """Each expert's rows split into ranges, one program and one fp32 partial per range, the partials added
    in a fixed order (`wgrad_splits`, for projections with few experts): against the plain form and the
    unsplit kernel, over two applications, uneven and empty ranges (8 splits of 7 row blocks), an expert
    with no rows (exact zeros, or the accumulator's values), and bit-identical when run twice."""
    from moeut.kernels import weight_grad as twg

    E, I, O, K = 3, 20, 24, 2
    gen = torch.Generator().manual_seed(splits)
    segments, want = [], torch.zeros(E, I, O)
    for R in (100, 70):  # ~100 and ~70 rows per used expert: 7 and 5 blocks of BK = 16
        r = route(torch.randint(0, 2, (R, K), generator=gen), E)  # expert 2 gets no rows
        x, g = torch.randn(R, I, generator=gen), torch.randn(R, O, generator=gen)
        seg = (x, g, r.offsets_E1, r.rows_N, r.rows_N, torch.rand(R * K, generator=gen), r.slot_N)
        segments.append(seg)
        want += weight_grad_reference(*seg[:6], torch.float32, seg[6])
    acc0 = torch.randn(E, I, O, generator=gen)

    def run(n):
        force_wgrad_splits(monkeypatch, n)
        if accumulate:
            acc = acc0.clone()
            assert twg.weight_grad_segments_triton(segments, accumulate_into=acc) is acc
            return acc
        return twg.weight_grad_segments_triton(segments, torch.float32)

    got, unsplit = run(splits), run(1)
    torch.testing.assert_close(got, want + acc0 if accumulate else want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got, unsplit, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[2], acc0[2] if accumulate else torch.zeros(I, O))
    assert torch.equal(run(splits), got)


@interpreted
def test_weight_grad_splits_only_when_experts_leave_sms_idle(monkeypatch):
    """The automatic split count: about four programs per SM, at least 1024 rows per range, at most
    WGRAD_MAX_SPLITS, none for the FFN or on CPU."""
    from types import SimpleNamespace
    from moeut.kernels import weight_grad as twg

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    cuda = torch.device("cuda")
    assert twg.wgrad_splits(40, 1024, 128, 131072, cuda) == 2  # SwitchHead at 244M (4 heads x 10): 320 tiles
    assert twg.wgrad_splits(40, 128, 1024, 131072, cuda) == 2
    assert twg.wgrad_splits(72, 1536, 128, 98304, cuda) == 1  # at 1B (6 x 12): 864 tiles
    assert twg.wgrad_splits(10, 1024, 128, 131072, cuda) == 7  # 80 tiles
    assert twg.wgrad_splits(387, 1024, 128, 262144, cuda) == 1  # the FFN: 3096 tiles
    assert twg.wgrad_splits(10, 1024, 128, 20000, cuda) == 1  # under 1024 rows per range
    assert twg.wgrad_splits(1, 128, 128, 10**7, cuda) == twg.WGRAD_MAX_SPLITS
    assert twg.wgrad_splits(10, 1024, 128, 131072, torch.device("cpu")) == 1


@interpreted
def test_triton_weight_grad_segments_reject_mixed_launches():
    from moeut.kernels.weight_grad import MAX_SEGMENTS, weight_grad_segments_triton

    r = route(torch.tensor([[0, 1], [1, 2]]), 3)
    x, g = torch.randn(2, 8), torch.randn(4, 8)
    seg = (x, g, r.offsets_E1, r.rows_N, None, None, None)
    with pytest.raises(ValueError, match="segments"):
        weight_grad_segments_triton([])
    with pytest.raises(ValueError, match="segments"):
        weight_grad_segments_triton([seg] * (MAX_SEGMENTS + 1))
    with pytest.raises(ValueError, match="gathered or scaled"):  # one gathers x, the other does not
        weight_grad_segments_triton([seg, (torch.randn(4, 8), g, r.offsets_E1, None, None, None, None)])
    with pytest.raises(ValueError, match="shapes"):
        weight_grad_segments_triton([seg, (torch.randn(2, 16), g, r.offsets_E1, r.rows_N, None, None, None)])


@interpreted
def test_shared_weights_through_the_kernels_match_per_application(monkeypatch):
    """A training step's gradients with one shared bf16 copy per weight, summed by the weight-gradient
    kernel, against casting per application and summing with autograd. One application per launch
    (defer 1) gives the same fp32 sums bit for bit; deferred applications (three per weight here)
    are summed in one launch, in a different order: equal to fp32 rounding."""
    from moeut.settings import settings
    from tests.helpers import autocast_step_grads, switch_kernels, tiny_lm

    switch_kernels(monkeypatch, lambda t, switch=None: switch is None)  # kernels, interpreted
    torch.manual_seed(0)
    model = tiny_lm("moeut", n_layers=6).train()
    x = torch.randint(0, 40, (2, 8))
    monkeypatch.setattr(settings, "wgrad_defer", 0)
    _, want = autocast_step_grads(model, x)
    launches = []
    segments_triton = triton_weight_grad.weight_grad_segments_triton
    monkeypatch.setattr(
        triton_weight_grad,
        "weight_grad_segments_triton",
        lambda segments, *a, **kw: launches.append(len(segments)) or segments_triton(segments, *a, **kw),
    )
    for defer in (1, 2, 3, 9):
        launches.clear()
        monkeypatch.setattr(settings, "wgrad_defer", defer)
        _, got = autocast_step_grads(model, x)
        # 8 shared expert weights (FFN up and down, SwitchHead's V and O, in 2 layers), 3 applications each
        assert sorted(launches) == sorted({1: [1, 1, 1], 2: [2, 1], 3: [3], 9: [3]}[defer] * 8), defer
        for n in want:
            if defer == 1:
                assert torch.equal(got[n], want[n]), (defer, n)
            else:
                torch.testing.assert_close(
                    got[n],
                    want[n],
                    rtol=1e-5,
                    atol=1e-7 * want[n].abs().max().item(),
                    msg=lambda m, n=n, defer=defer: f"defer {defer}, {n}: {m}",
                )


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
@pytest.mark.parametrize("X,C,O", [(13, 3, 37), (5, 1, 16), (0, 4, 8), (9, 24, 20)])
def test_triton_sum_choices_matches_torch(dtype, out_dtype, X, C, O):
    """The top-k sum: fp32 accumulation, one rounding to the requested dtype (fp32 gradients are not
    rounded to bf16 on the way), for any number of choices, an empty input, and a strided row view."""
    from moeut.ops.grouped_mm import _sum_choices_torch
    from moeut.kernels.sum_choices import sum_choices_triton

    out_dtype = out_dtype or dtype
    gen = torch.Generator().manual_seed(X * 31 + C)
    y = torch.randn(X * C, O + 3, generator=gen).to(dtype)[:, 2 : O + 2]  # rows with a stride > O
    got = sum_choices_triton(y, X, out_dtype)
    want = _sum_choices_torch(y, X, out_dtype)
    assert got.shape == (X, O) and got.dtype == out_dtype
    torch.testing.assert_close(got, want, rtol=1e-6 if out_dtype == torch.float32 else 8e-3, atol=1e-5)
    if X:
        exact = y.double().view(X, C, O).sum(1)
        tol = 1e-5 if out_dtype == torch.float32 else 8e-3
        torch.testing.assert_close(got.double(), exact, rtol=tol, atol=tol)
    # plus a tensor of the output's shape (the residual stream or its gradient), fp32 and strided
    init = torch.randn(X, O + 1, generator=gen)[:, 1:]
    got = sum_choices_triton(y, X, out_dtype, init)
    torch.testing.assert_close(
        got, _sum_choices_torch(y, X, out_dtype, init), rtol=1e-6 if out_dtype == torch.float32 else 8e-3, atol=1e-5
    )
    if X:
        torch.testing.assert_close(got.double(), exact + init.double(), rtol=tol, atol=tol)
