"""The decoding path of the expert projections (`moeut.expert_gemv`) against the sorted path.

The plain reference is checked here against `reference_expert_mm` and `expert_mm_combine` for each of
MoEUT's four layouts; the Triton kernel is checked against the reference in
test_triton_interpreter.py (CPU) and tests/gpu (CUDA).
"""
import pytest
import torch

from moeut.ops.expert_gemv import expert_gemv_reference
from moeut.ops.expert_mm import expert_mm_combine, route
from moeut.ops.reference import reference_expert_mm


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
    ffn = torch.empty(387, 1024, 128, dtype=torch.bfloat16, device="meta")      # 99 MB: past L2
    value = torch.empty(4 * 10, 1024, 128, dtype=torch.bfloat16, device="meta")  # 10 MB: fits
    with torch.no_grad():
        assert expert_gemv.gemv_applies(x, 1 * 16, ffn) and expert_gemv.gemv_applies(x, 32 * 16, ffn)
        assert expert_gemv.gemv_applies(x, 32 * 4 * 2, value)       # 6.4 choices per expert: measured faster
        assert not expert_gemv.gemv_applies(x, 128 * 16, ffn)      # a 128-token prefill: sorted
        assert not expert_gemv.gemv_applies(x, 128 * 4 * 2, value)
    assert not expert_gemv.gemv_applies(x, 16, ffn)                # gradients on: training never takes it
