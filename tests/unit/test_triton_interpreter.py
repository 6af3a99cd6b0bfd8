"""The Triton kernels, run on CPU tensors through TRITON_INTERPRET=1, agree with the reference."""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("interpreter tests are for CPU-only machines (GPU runs use tests/gpu)", allow_module_level=True)

from moeut.expert_mm import _grouped_mm_torch, _weight_grad_torch, reference_expert_mm, route  # noqa: E402
from moeut import triton_expert_mm  # noqa: E402
from moeut.triton_expert_mm import grouped_mm_triton, grouped_mm_weight_grad_triton  # noqa: E402


@pytest.mark.parametrize("kind", ["random", "one_expert", "empty_experts"])
@pytest.mark.parametrize("R,K,E,I,O", [(37, 3, 5, 20, 33), (16, 1, 3, 16, 16), (9, 2, 17, 40, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loop_n", [False, True], ids=["column_blocks", "loop_n"])
def test_triton_matches_reference(kind, R, K, E, I, O, dtype, loop_n, monkeypatch):
    # Both forms of the grouped GEMM: one program per (row tile, column block), or per row tile
    # walking every column block (what narrow inputs such as the FFN down projection use).
    monkeypatch.setattr(triton_expert_mm, "LOOP_N_OVERRIDE", loop_n)
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

    h = torch.randn(R * K, I, generator=gen).to(dtype)   # no gather: rows already routed
    torch.testing.assert_close(grouped_mm_triton(h, w, r.offsets_E1, None).float(),
                               _grouped_mm_torch(h.float(), w.float(), r.offsets_E1, None), **tol)
    # input-gradient form: a transposed (non-contiguous) weight view
    g = torch.randn(R * K, O, generator=gen).to(dtype)
    torch.testing.assert_close(grouped_mm_triton(g, w.transpose(1, 2), r.offsets_E1, None).float(),
                               _grouped_mm_torch(g.float(), w.float().transpose(1, 2), r.offsets_E1, None), **tol)
    # weight gradient, with and without gather; unused experts get exact zeros
    for rows, inp in ((r.rows_N, x), (None, h)):
        got = grouped_mm_weight_grad_triton(inp, g, r.offsets_E1, rows)
        want = _weight_grad_torch(inp.float(), g.float(), r.offsets_E1, rows)
        torch.testing.assert_close(got.float(), want, **tol)
        counts = r.offsets_E1[1:] - r.offsets_E1[:-1]
        assert (got[counts == 0] == 0).all()

    # epilogue: gate scale in fp32 and scatter to (row, choice) order
    gate = torch.rand(R * K, generator=gen)
    got = grouped_mm_triton(x, w, r.offsets_E1, r.rows_N, gate[r.slot_N], r.slot_N)
    torch.testing.assert_close(got.float().view(R, K, O), ref * gate.view(R, K, 1), **tol)
    # the same gates read unpermuted, at each row's destination (what the combine forward passes)
    assert torch.equal(grouped_mm_triton(x, w, r.offsets_E1, r.rows_N, gate, r.slot_N, scale_at_dst=True), got)
    # weight gradient reading gathered, gate-scaled gradient rows (one row per input row)
    g_R = torch.randn(R, O, generator=gen).to(dtype)
    got = grouped_mm_weight_grad_triton(x, g_R, r.offsets_E1, r.rows_N, r.rows_N, gate[r.slot_N], torch.float32)
    want = _weight_grad_torch(x.float(), g_R.float(), r.offsets_E1, r.rows_N, r.rows_N, gate[r.slot_N])
    torch.testing.assert_close(got.float(), want, **tol)


@pytest.mark.parametrize("gather,scale", [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_row_dot_matches_reference(gather, scale, dtype):
    """Row dot products (the combine's gate gradient) with optional gathered rows of b and a gate-scaled
    copy of a, against the plain form."""
    from moeut.triton_expert_mm import row_dot_triton
    gen = torch.Generator().manual_seed(3)
    N, M, I = 23, 9, 40
    a = torch.randn(N, I, generator=gen).to(dtype)
    b = torch.randn(M if gather else N, I, generator=gen).to(dtype)
    rows = torch.randint(0, M, (N,), generator=gen) if gather else None
    s = torch.rand(N, generator=gen) if scale else None
    dot, scaled = row_dot_triton(a, b, rows, s)
    b_N = b[rows] if gather else b
    torch.testing.assert_close(dot, (a.float() * b_N.float()).sum(-1), rtol=1e-5, atol=1e-5)
    if scale:
        torch.testing.assert_close(scaled.float(), (a.float() * s[:, None]), rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=1e-2 if dtype != torch.float32 else 1e-6)
    else:
        assert scaled.shape == (0, I)


@pytest.mark.parametrize("R,K,E", [(1, 16, 387), (32, 16, 387), (5, 3, 4), (64, 2, 40), (7, 1, 1)])
def test_triton_route_small_matches_route(R, K, E):
    """The one-kernel routing of small inputs (decoding) against the torch sort path, exactly."""
    from moeut.expert_mm import route
    from moeut.triton_route import route_small_triton
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
    from moeut.triton_expert_mm import use_loop_n
    assert use_loop_n(128, 1024, 16384 * 16, 387)         # 244M FFN down projection, training
    assert not use_loop_n(128, 1024, 32 * 16, 387)        # the same at batch-32 decoding
    assert not use_loop_n(1024, 128, 16384 * 16, 387)     # wide input: the input tile would not fit
    assert not use_loop_n(128, 128, 16384 * 16, 387)      # one column block: nothing to loop over
