"""The Triton kernels, run on CPU tensors through TRITON_INTERPRET=1, agree with the reference."""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("interpreter tests are for CPU-only machines (GPU runs use tests/gpu)", allow_module_level=True)

from moeut.ops.expert_mm import route  # noqa: E402
from moeut.ops.reference import reference_expert_mm  # noqa: E402
from moeut.ops.grouped_mm import grouped_mm_reference, weight_grad_reference  # noqa: E402
from moeut.kernels import expert_mm as triton_expert_mm, weight_grad as triton_weight_grad  # noqa: E402
from moeut.kernels.expert_mm import grouped_mm_triton  # noqa: E402
from moeut.kernels.weight_grad import grouped_mm_weight_grad_triton  # noqa: E402
from tests.helpers import force_loop_n, force_wgrad_splits  # noqa: E402


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

    if dtype == torch.bfloat16:   # an fp32 master weight, rounded tile by tile as the kernel loads it
        gen32 = torch.Generator().manual_seed(R * E)
        w32 = torch.randn(E, I, O, generator=gen32)   # (the interpreter truncates: one more bf16 ulp of slack)
        tol32 = dict(rtol=2e-2, atol=6e-2)
        torch.testing.assert_close(grouped_mm_triton(x, w32, r.offsets_E1, r.rows_N)[r.choice_RK].float(),
                                   reference_expert_mm(x.float(), w32.to(dtype).float(), expert), **tol32)
        g32 = torch.randn(R * K, O, generator=gen32).to(dtype)
        torch.testing.assert_close(grouped_mm_triton(g32, w32.transpose(1, 2), r.offsets_E1, None).float(),
                                   grouped_mm_reference(g32, w32.transpose(1, 2), r.offsets_E1, None).float(), **tol32)

    h = torch.randn(R * K, I, generator=gen).to(dtype)   # no gather: rows already routed
    torch.testing.assert_close(grouped_mm_triton(h, w, r.offsets_E1, None).float(),
                               grouped_mm_reference(h.float(), w.float(), r.offsets_E1, None), **tol)
    # input-gradient form: a transposed (non-contiguous) weight view
    g = torch.randn(R * K, O, generator=gen).to(dtype)
    torch.testing.assert_close(grouped_mm_triton(g, w.transpose(1, 2), r.offsets_E1, None).float(),
                               grouped_mm_reference(g.float(), w.float().transpose(1, 2), r.offsets_E1, None), **tol)
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


@pytest.mark.parametrize("loop_n", [True, False], ids=["epilogue_dot", "recomputed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_grouped_mm_dot_matches_torch(loop_n, dtype, monkeypatch):
    """The input-gradient GEMM with the row dot in its epilogue (loop over N), and the fallback that
    recomputes the forward product, against the PyTorch path: output bitwise, dot within rounding."""
    from moeut.ops.grouped_mm import grouped_mm_reference
    from moeut.kernels.expert_mm import row_dot_triton
    force_loop_n(monkeypatch, loop_n)
    gen = torch.Generator().manual_seed(4)
    R, K, E, I, O = 19, 2, 6, 12, 40
    expert = 2 * torch.randint(0, E // 2, (R, K), generator=gen)   # odd experts stay empty
    r = route(expert, E)
    g = torch.randn(R, I, generator=gen).to(dtype)
    w = torch.randn(E, I, O, generator=gen).to(dtype)
    x = torch.randn(R, O, generator=gen).to(dtype)
    gate = torch.rand(R * K, generator=gen)
    for dot_dst in (None, r.slot_N):
        if loop_n:
            out, dot, gated = grouped_mm_triton(g, w, r.offsets_E1, r.rows_N, gate, r.slot_N, True, dot_x_MO=x,
                                                dot_rows_N=r.rows_N, dot_dst_N=dot_dst, gate_x=dot_dst is not None)
            if dot_dst is None:
                assert gated.shape == (0, I)
            else:   # the gated input rows, in routed order (the weight gradient's operand), rounded once
                # (the interpreter truncates to bf16 where CUDA rounds: within one bf16 step there)
                tol = 0 if dtype == torch.float32 else 1e-2
                torch.testing.assert_close(gated, (g[r.rows_N].float() * gate[r.slot_N, None]).to(dtype), rtol=tol,
                                           atol=0)
        else:   # what moeut::grouped_mm_dot runs where the loop-over-N form does not apply
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
        torch.testing.assert_close(scaled.float(), (a.float() * s[:, None]), rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=1e-2 if dtype != torch.float32 else 1e-6)
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
        torch.testing.assert_close(gated, (b_N.float() * s_dst.float()[dst][:, None]).to(dtype),
                                   rtol=0 if dtype == torch.float32 else 1e-2, atol=0)
        # scaled_dst: the scaled rows written at scaled_dst[n] (a permutation), the dot unchanged
        perm = torch.randperm(N, generator=gen)
        dot3, scaled3, _ = row_dot_triton(a, b, rows, s, scaled_dst_N=perm)
        assert torch.equal(dot3, dot) and torch.equal(scaled3[perm], scaled)


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


def test_loop_over_n_only_with_many_rows_per_expert():
    """The one-program-per-row-tile form pays with hundreds of rows per expert (training) and cost 2x
    at batch-32 decoding (512 rows over 387 experts) on the H200; the policy keeps them apart."""
    from moeut.kernels.expert_mm import use_loop_n
    assert use_loop_n(128, 1024, 16384 * 16, 387)         # 244M FFN down projection, training
    assert not use_loop_n(128, 1024, 32 * 16, 387)        # the same at batch-32 decoding
    assert not use_loop_n(1024, 128, 16384 * 16, 387)     # wide input: the input tile would not fit
    assert not use_loop_n(128, 128, 16384 * 16, 387)      # one column block: nothing to loop over


@pytest.mark.parametrize("layout", ["ffn_up", "ffn_down", "value", "output"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_expert_gemv_matches_reference(layout, dtype):
    # Odd widths (not multiples of the blocks), repeated experts, and experts nobody picks.
    from moeut.ops.expert_gemv import expert_gemv_reference
    from moeut.kernels.expert_gemv import expert_gemv_triton
    R, H, K, E, D, S = 3, 3, 2, 5, 37, 21
    gen = torch.Generator().manual_seed(len(layout))
    heads = dict(head_k=K, n_heads=H, head_experts=E)
    if layout == "ffn_up":
        args = dict(x=torch.randn(R, D, generator=gen), w=torch.randn(E, D, S, generator=gen), C=R * K,
                    gate=False, per_x=K, per_out=1, relu=True, head_k=1, n_heads=1, head_experts=0)
    elif layout == "ffn_down":
        args = dict(x=torch.randn(R * K, S, generator=gen), w=torch.randn(E, S, D, generator=gen), C=R * K,
                    gate=True, per_x=1, per_out=K, relu=False, head_k=1, n_heads=1, head_experts=0)
    elif layout == "value":
        args = dict(x=torch.randn(R, D, generator=gen), w=torch.randn(H * E, D, S, generator=gen), C=R * H * K,
                    gate=True, per_x=H * K, per_out=K, relu=False, **heads)
    else:
        args = dict(x=torch.randn(R * H, S, generator=gen), w=torch.randn(H * E, S, D, generator=gen), C=R * H * K,
                    gate=True, per_x=K, per_out=H * K, relu=False, **heads)
    x, w, C = args.pop("x").to(dtype), args.pop("w").to(dtype), args.pop("C")
    expert = torch.randint(0, 2, (C,), generator=gen)          # experts 2..E-1 of each head stay unused
    gate = torch.rand(C, generator=gen) if args.pop("gate") else None
    kw = dict(per_x=args["per_x"], per_out=args["per_out"], head_k=args["head_k"], n_heads=args["n_heads"],
              head_experts=args["head_experts"], relu=args["relu"])
    got = expert_gemv_triton(x, w, expert, gate, **kw)
    want = expert_gemv_reference(x, w, expert, gate, **kw)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), **tol)
    # the launch shape a sweep passes in (another column block, other warps) computes the same
    torch.testing.assert_close(expert_gemv_triton(x, w, expert, gate, **kw, block_o=32, num_warps=2).float(),
                               want.float(), **tol)


def test_router_launch_shapes_a_benchmark_passes_compute_the_same():
    from moeut.kernels.router import sigmoid_topk_triton
    logits = torch.randn(37, 11, generator=torch.Generator().manual_seed(3))
    gate, expert = sigmoid_topk_triton(logits, 3)
    for launch in ((1, 1), (8, 4)):
        g2, e2 = sigmoid_topk_triton(logits, 3, launch=launch)
        assert torch.equal(e2, expert) and torch.equal(g2, gate)


def test_decoding_through_expert_gemv_matches_sorted_path(monkeypatch):
    """A cached decoding step of a whole model: the per-choice kernel gives the sorted path's logits."""
    from moeut import MoEUTLM, AttentionMask
    from moeut import moe
    from moeut.attention import switchhead
    from moeut.ops import expert_gemv
    from moeut.attention import new_static_cache
    torch.manual_seed(0)
    model = MoEUTLM(64, d_model=32, n_layers=2, n_heads=2, ff_n_experts=6, att_n_experts=3, d_head=8,
                    ff_k=2, group_size=2, ff_expert_size=8).eval()
    prompt, nxt = torch.randint(0, 64, (2, 5)), torch.randint(0, 64, (2, 1))
    mask = AttentionMask(torch.zeros(2, 8, dtype=torch.bool), None, is_causal=True)

    def step():
        kv = {i: new_static_cache(8) for i in range(model.n_layers)}
        with torch.no_grad():
            model(prompt, mask, kv_cache=kv)
            return model(nxt, mask, kv_cache=kv).outputs
    want = step()
    calls = []

    def applies(x, n_choices, w):
        calls.append(n_choices)
        return not torch.is_grad_enabled()
    monkeypatch.setattr(expert_gemv, "use_fused", lambda t, switch=None: True)   # the Triton kernel, interpreted
    monkeypatch.setattr(moe, "gemv_applies", applies)
    monkeypatch.setattr(switchhead, "gemv_applies", applies)
    got = step()
    assert len(calls) == 2 * 3 * model.n_layers      # prefill and step; FFN, value, output per layer
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


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
    assert aligned(ok) is ok   # already aligned: no copy
    # a cast that pads only when it has to: one copy in the target dtype either way
    for t, padded in ((w.transpose(1, 2), True), (ok, False)):
        a = aligned(t, copy_dtype=torch.bfloat16, always_copy=True)
        assert a.dtype == torch.bfloat16 and torch.equal(a, t.to(torch.bfloat16))
        assert (a.stride() != t.stride()) == padded
    assert aligned(ok, copy_dtype=torch.bfloat16) is ok   # aligned and no copy asked for


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_weight_grad_accumulates_in_place(dtype):
    """accumulate_into: the kernel adds its fp32 tile into the accumulator (a shared weight's gradient
    summed over applications): equal to a separate add, and experts without rows keep their sums."""
    R, K, E, I, O = 23, 2, 6, 20, 24
    gen = torch.Generator().manual_seed(5)
    expert = 2 * torch.randint(0, E // 2, (R, K), generator=gen)     # odd experts get no rows
    r = route(expert, E)
    x = torch.randn(R, I, generator=gen).to(dtype)
    g_R = torch.randn(R, O, generator=gen).to(dtype)
    gate = torch.rand(R * K, generator=gen)
    acc0 = torch.randn(E, I, O, generator=gen)
    for args in ((x, g_R.repeat_interleave(K, 0)[r.slot_N], r.offsets_E1, r.rows_N),
                 (x, g_R, r.offsets_E1, r.rows_N, r.rows_N, gate[r.slot_N])):
        acc = acc0.clone()
        out = grouped_mm_weight_grad_triton(*args, out_dtype=torch.float32, accumulate_into=acc)
        assert out is acc
        fresh = grouped_mm_weight_grad_triton(*args, out_dtype=torch.float32)
        assert torch.equal(acc, acc0 + fresh)
        assert torch.equal(acc[1::2], acc0[1::2])
    # gates read at each routed row's destination (scale_dst) instead of a permuted copy: same result
    at_dst = grouped_mm_weight_grad_triton(x, g_R, r.offsets_E1, r.rows_N, r.rows_N, gate, torch.float32,
                                           scale_dst_N=r.slot_N)
    assert torch.equal(at_dst, fresh)


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
        R = 9 + 6 * s   # applications of different sizes
        expert = 2 * torch.randint(0, (E + 1) // 2, (R, K), generator=gen)   # odd experts: no rows
        r = route(expert, E)
        # segment 1's operands are views with other row strides than the rest (48 and 64 elements)
        width = (lambda n: 48 if n == I else 64) if s == 1 else (lambda n: n)
        x = torch.randn(R, width(I), generator=gen).to(dtype)[:, :I]
        if layout == "gather_x":   # the FFN's up projection: x gathered, gradient rows already routed
            g = torch.randn(R * K, width(O), generator=gen).to(dtype)[:, :O]
            seg = (x, g, r.offsets_E1, r.rows_N, None, None, None)
        else:   # a gated down projection: both gathered, gates read at each row's destination
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
    if n_seg == 1:   # the single-application entry point is the same launch
        single = grouped_mm_weight_grad_triton(*segments[0][:6], torch.float32, scale_dst_N=segments[0][6])
        assert torch.equal(single, weight_grad_segments_triton(segments, torch.float32))


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
    for R in (100, 70):   # ~100 and ~70 rows per used expert: 7 and 5 blocks of BK = 16
        r = route(torch.randint(0, 2, (R, K), generator=gen), E)   # expert 2 gets no rows
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


def test_weight_grad_splits_only_when_experts_leave_sms_idle(monkeypatch):
    """The automatic split count: about four programs per SM, at least 1024 rows per range, at most
    WGRAD_MAX_SPLITS, none for the FFN or on CPU."""
    from types import SimpleNamespace
    from moeut.kernels import weight_grad as twg
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    cuda = torch.device("cuda")
    assert twg.wgrad_splits(40, 1024, 128, 131072, cuda) == 2    # SwitchHead at 244M (4 heads x 10): 320 tiles
    assert twg.wgrad_splits(40, 128, 1024, 131072, cuda) == 2
    assert twg.wgrad_splits(72, 1536, 128, 98304, cuda) == 1     # at 1B (6 x 12): 864 tiles
    assert twg.wgrad_splits(10, 1024, 128, 131072, cuda) == 7    # 80 tiles
    assert twg.wgrad_splits(387, 1024, 128, 262144, cuda) == 1   # the FFN: 3096 tiles
    assert twg.wgrad_splits(10, 1024, 128, 20000, cuda) == 1     # under 1024 rows per range
    assert twg.wgrad_splits(1, 128, 128, 10 ** 7, cuda) == twg.WGRAD_MAX_SPLITS
    assert twg.wgrad_splits(10, 1024, 128, 131072, torch.device("cpu")) == 1


def test_triton_weight_grad_segments_reject_mixed_launches():
    from moeut.kernels.weight_grad import MAX_SEGMENTS, weight_grad_segments_triton
    r = route(torch.tensor([[0, 1], [1, 2]]), 3)
    x, g = torch.randn(2, 8), torch.randn(4, 8)
    seg = (x, g, r.offsets_E1, r.rows_N, None, None, None)
    with pytest.raises(ValueError, match="segments"):
        weight_grad_segments_triton([])
    with pytest.raises(ValueError, match="segments"):
        weight_grad_segments_triton([seg] * (MAX_SEGMENTS + 1))
    with pytest.raises(ValueError, match="gathered or scaled"):   # one gathers x, the other does not
        weight_grad_segments_triton([seg, (torch.randn(4, 8), g, r.offsets_E1, None, None, None, None)])
    with pytest.raises(ValueError, match="shapes"):
        weight_grad_segments_triton([seg, (torch.randn(2, 16), g, r.offsets_E1, r.rows_N, None, None, None)])


@pytest.mark.parametrize("defer", [1, 2, 3, 9])
def test_shared_weights_through_the_kernels_match_per_application(defer, monkeypatch):
    """A training step's gradients with one shared bf16 copy per weight, summed by the weight-gradient
    kernel, against casting per application and summing with autograd. One application per launch
    (defer 1) gives the same fp32 sums bit for bit; deferred applications (three per weight here)
    are summed in one launch, in a different order: equal to fp32 rounding."""
    from moeut import MoEUTLM
    from moeut.settings import settings
    from tests.helpers import autocast_step_grads, switch_kernels
    switch_kernels(monkeypatch, lambda t, switch=None: switch is None)   # kernels, interpreted
    torch.manual_seed(0)
    model = MoEUTLM(40, d_model=32, n_layers=6, n_heads=2, ff_n_experts=6, att_n_experts=3, d_head=8,
                    ff_k=2, group_size=2, ff_expert_size=16).train()
    x = torch.randint(0, 40, (2, 8))
    monkeypatch.setattr(settings, "wgrad_defer", 0)
    _, want = autocast_step_grads(model, x)
    launches = []
    segments_triton = triton_weight_grad.weight_grad_segments_triton
    monkeypatch.setattr(triton_weight_grad, "weight_grad_segments_triton",
                        lambda segments, *a, **kw: launches.append(len(segments)) or segments_triton(segments, *a, **kw))
    monkeypatch.setattr(settings, "wgrad_defer", defer)
    _, got = autocast_step_grads(model, x)
    # 8 shared expert weights (FFN up and down, SwitchHead's V and O, in 2 layers), 3 applications each
    assert sorted(launches) == sorted({1: [1, 1, 1], 2: [2, 1], 3: [3], 9: [3]}[defer] * 8)
    for n in want:
        if defer == 1:
            assert torch.equal(got[n], want[n]), n
        else:
            torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7 * want[n].abs().max().item())


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
    y = torch.randn(X * C, O + 3, generator=gen).to(dtype)[:, 2:O + 2]   # rows with a stride > O
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
    torch.testing.assert_close(got, _sum_choices_torch(y, X, out_dtype, init), rtol=1e-6 if out_dtype == torch.float32
                               else 8e-3, atol=1e-5)
    if X:
        torch.testing.assert_close(got.double(), exact + init.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("I,O", [(10, 7), (5, 12)])   # both ways of getting the gate gradient
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
    assert torch.equal(runs[1][-1], gy)   # the residual's gradient is the output's


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


@pytest.mark.parametrize("case", ["mlp_bf16", "mlp_fp32", "combine_narrow_out", "combine_wide_in",
                                  "combine_routed_input"])
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
        monkeypatch.setattr(torch.Tensor, "index_copy_",
                            lambda self, *a: index_copies.append(1) or real_index_copy(self, *a))
        out = run()
        results.append((out, *torch.autograd.grad(out, leaves, gy)))
        monkeypatch.setattr(torch.Tensor, "index_copy_", real_index_copy)
        if kernels:
            assert not index_copies, f"{len(index_copies)} index_copy_ calls on the kernel path"
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for name, a, b in zip(("out", *(f"d{i}" for i in range(len(leaves)))), *results):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < tol, name


@pytest.mark.parametrize("case", ["mlp_bf16", "mlp_fp32", "combine_narrow_out", "combine_wide_in"])
def test_weight_gradients_read_a_gated_operand_and_gather_no_gates(case, monkeypatch):
    """The backward's row-dot pass (or the value projection's input-gradient GEMM) writes one
    weight-gradient operand already gated, so no weight-gradient launch scales by a gate in its K loop;
    on the kernel path the backward gathers no gates (the kernels read them at each row's slot). Kernel
    path (interpreted, the value projection's input gradient in its loop-over-N form) against the
    PyTorch path; an expert that gets no row included."""
    from moeut.ops import expert_mlp as mlp_module, expert_mm as em
    from tests.helpers import switch_kernels
    force_loop_n(monkeypatch, True)   # (the tiny shapes would not pick it)
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
        monkeypatch.setattr(torch.Tensor, "index_select",
                            lambda self, *a: gathers.append(1) or real_index_select(self, *a))
        results[kernels] = (out, *torch.autograd.grad(out, leaves, gy))
        monkeypatch.setattr(torch.Tensor, "index_select", real_index_select)
        assert scales and not any(scales), scales
        if kernels:
            assert not gathers, f"{len(gathers)} index_select calls in the gated backward on the kernel path"
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for name, a, b in zip(("out", *(f"d{i}" for i in range(len(leaves)))), results[True], results[False]):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < tol, name
