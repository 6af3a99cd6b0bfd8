"""The decoding path of the expert projections (`moeut.expert_gemv`) against the sorted path.

The plain reference is checked here against `reference_expert_mm` and `expert_mm_combine` for each of
MoEUT's four layouts; the Triton kernel is checked against the reference in
the interpreter tests at the end of this file (CPU) and tests/gpu (CUDA).
"""

import pytest
import torch

from moeut.ops.expert_gemv import expert_gemv_reference
from moeut.ops.expert_mm import expert_mm_combine, route
from moeut.ops.reference import reference_expert_mm
from tests.helpers import interpreted


def _setup(R, K, E, I, O, H=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    expert = torch.randint(0, E, (R, H, K), generator=gen)
    gate = torch.rand(R, H, K, generator=gen)
    return gen, expert, gate


def test_ffn_up_and_down_match_sorted_path():
    R, K, E, D, S = 5, 3, 7, 12, 8
    gen, expert, gate = _setup(R, K, E, D, S)
    expert, gate = expert[:, 0], gate[:, 0]
    x = torch.randn(R, D, generator=gen, dtype=torch.float64)
    w1 = torch.randn(E, D, S, generator=gen, dtype=torch.float64)
    w2 = torch.randn(E, S, D, generator=gen, dtype=torch.float64)
    h = expert_gemv_reference(x, w1, expert, None, per_x=K, per_out=1, relu=True)
    torch.testing.assert_close(h, reference_expert_mm(x, w1, expert).relu().reshape(R * K, S))
    out = expert_gemv_reference(h, w2, expert, gate, per_x=1, per_out=K)
    r = route(expert, E)
    # the sorted path reads h in routed order: gather it, then combine
    h_routed = h[r.slot_N]
    torch.testing.assert_close(out, expert_mm_combine(h_routed, w2, r, gate.to(h.dtype), gather=False))


@pytest.mark.parametrize("H,K,E", [(4, 2, 3), (2, 1, 5)])
def test_switchhead_value_and_output_layouts(H, K, E):
    # heads offset their expert ids by h*E, as SwitchHead's sorted path does with `head_base`
    R, D, Dh = 3, 10, 6
    gen, expert, gate = _setup(R, K, E, D, Dh, H, seed=H + K)
    heads = dict(head_k=K, n_heads=H, head_experts=E)
    offset = (torch.arange(H) * E).view(1, H, 1)
    x = torch.randn(R, D, generator=gen, dtype=torch.float64)
    wv = torch.randn(H * E, D, Dh, generator=gen, dtype=torch.float64)
    v = expert_gemv_reference(x, wv, expert, gate, per_x=H * K, per_out=K, **heads)
    rv = route((expert + offset).reshape(R, H * K), H * E)
    torch.testing.assert_close(v, expert_mm_combine(x, wv, rv, gate.reshape(R * H, K).double()))
    res = torch.randn(R * H, Dh, generator=gen, dtype=torch.float64)
    wo = torch.randn(H * E, Dh, D, generator=gen, dtype=torch.float64)
    o = expert_gemv_reference(res, wo, expert, gate, per_x=K, per_out=H * K, **heads)
    ro = route((expert + offset).reshape(R * H, K), H * E)
    torch.testing.assert_close(o, expert_mm_combine(res, wo, ro, gate.reshape(R, H * K).double()))


def test_policy_takes_the_measured_cases_and_leaves_training_alone(monkeypatch):
    """Which projections take the per-choice path, at the MoEUT_244M shapes (RESULTS.md C)."""
    from moeut.ops import expert_gemv

    monkeypatch.setattr(expert_gemv, "use_fused", lambda t, switch=None: True)
    x = torch.empty(1, dtype=torch.bfloat16)
    ffn = torch.empty(387, 1024, 128, dtype=torch.bfloat16, device="meta")  # 99 MB: past L2
    value = torch.empty(4 * 10, 1024, 128, dtype=torch.bfloat16, device="meta")  # 10 MB: fits
    with torch.no_grad():
        assert expert_gemv.gemv_applies(x, 1 * 16, ffn) and expert_gemv.gemv_applies(x, 32 * 16, ffn)
        assert expert_gemv.gemv_applies(x, 32 * 4 * 2, value)  # 6.4 choices per expert: measured faster
        assert not expert_gemv.gemv_applies(x, 128 * 16, ffn)  # a 128-token prefill: sorted
        assert not expert_gemv.gemv_applies(x, 128 * 4 * 2, value)
    assert not expert_gemv.gemv_applies(x, 16, ffn)  # gradients on: training never takes it


# The Triton kernels of this operator, run on CPU tensors through TRITON_INTERPRET=1 (`interpreted`).
@interpreted
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
        args = dict(
            x=torch.randn(R, D, generator=gen),
            w=torch.randn(E, D, S, generator=gen),
            C=R * K,
            gate=False,
            per_x=K,
            per_out=1,
            relu=True,
            head_k=1,
            n_heads=1,
            head_experts=0,
        )
    elif layout == "ffn_down":
        args = dict(
            x=torch.randn(R * K, S, generator=gen),
            w=torch.randn(E, S, D, generator=gen),
            C=R * K,
            gate=True,
            per_x=1,
            per_out=K,
            relu=False,
            head_k=1,
            n_heads=1,
            head_experts=0,
        )
    elif layout == "value":
        args = dict(
            x=torch.randn(R, D, generator=gen),
            w=torch.randn(H * E, D, S, generator=gen),
            C=R * H * K,
            gate=True,
            per_x=H * K,
            per_out=K,
            relu=False,
            **heads,
        )
    else:
        args = dict(
            x=torch.randn(R * H, S, generator=gen),
            w=torch.randn(H * E, S, D, generator=gen),
            C=R * H * K,
            gate=True,
            per_x=K,
            per_out=H * K,
            relu=False,
            **heads,
        )
    x, w, C = args.pop("x").to(dtype), args.pop("w").to(dtype), args.pop("C")
    expert = torch.randint(0, 2, (C,), generator=gen)  # experts 2..E-1 of each head stay unused
    gate = torch.rand(C, generator=gen) if args.pop("gate") else None
    kw = dict(
        per_x=args["per_x"],
        per_out=args["per_out"],
        head_k=args["head_k"],
        n_heads=args["n_heads"],
        head_experts=args["head_experts"],
        relu=args["relu"],
    )
    got = expert_gemv_triton(x, w, expert, gate, **kw)
    want = expert_gemv_reference(x, w, expert, gate, **kw)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), **tol)
    # the launch shape a sweep passes in (another column block, other warps) computes the same
    torch.testing.assert_close(
        expert_gemv_triton(x, w, expert, gate, **kw, block_o=32, num_warps=2).float(), want.float(), **tol
    )


@interpreted
def test_decoding_through_expert_gemv_matches_sorted_path(monkeypatch):
    """A cached decoding step of a whole model: the per-choice kernel gives the sorted path's logits."""
    from moeut import MoEUTLM, AttentionMask
    from moeut import moe
    from moeut.attention import switchhead
    from moeut.ops import expert_gemv
    from moeut.attention import new_static_cache

    torch.manual_seed(0)
    model = MoEUTLM(
        64,
        d_model=32,
        n_layers=2,
        n_heads=2,
        ff_n_experts=6,
        att_n_experts=3,
        d_head=8,
        ff_k=2,
        group_size=2,
        ff_expert_size=8,
    ).eval()
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

    monkeypatch.setattr(expert_gemv, "use_fused", lambda t, switch=None: True)  # the Triton kernel, interpreted
    monkeypatch.setattr(moe, "gemv_applies", applies)
    monkeypatch.setattr(switchhead, "gemv_applies", applies)
    got = step()
    assert len(calls) == 2 * 3 * model.n_layers  # prefill and step; FFN, value, output per layer
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
