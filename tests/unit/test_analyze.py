"""`moeut analyze`: its numbers against direct computations on a small model, and the command's files."""

import json
import math

import pytest
import torch

import moeut
from moeut.analyze import analyze, diversity, overlap, trace, usage_stats
from moeut.attention import AttentionMask


def tiny():
    torch.manual_seed(0)
    return moeut.MoEUTLM(
        50,
        d_model=32,
        n_layers=4,
        n_heads=2,
        ff_n_experts=6,
        att_n_experts=3,
        d_head=8,
        group_size=2,
        ff_k=2,
        att_k=2,
        ff_expert_size=8,
    ).eval()


def test_the_trace_follows_the_models_own_forward():
    """Applying the recorded layers in order reproduces the model's output; the FFN experts are the
    router's top-k, the updates are the differences of the residual stream."""
    m = tiny()
    x = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    tr = trace(m, x)
    apps = tr["applications"]
    assert [a["layer"] for a in apps] == [0, 1, 0, 1]
    h = m.embedding(x)
    mask = AttentionMask(None, None, is_causal=True)
    for a in apps:
        layer = m.transformer.layers[a["layer"]]
        out, _, f_log, _ = layer.forward_with_logits(h, mask, None)
        want = torch.sigmoid(f_log.logits.float()).topk(2, -1).indices.reshape(14, 2)
        assert torch.equal(a["ffn"].sort(-1).values, want.sort(-1).values)
        torch.testing.assert_close(a["update"], (out - h).flatten(0, 1).norm(dim=-1))
        assert a["att_v"].shape == (14, 2, 2) and a["att_o"].max() < 3
        h = out
    torch.testing.assert_close(m.lm_head(m.out_norm(h)), m(x).outputs)


def test_usage_overlap_and_diversity_by_hand():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1]])
    u = usage_stats(ids, 4)
    assert u["share"] == pytest.approx([0.5, 2 / 6, 1 / 6, 0.0]) and u["never_selected"] == 1
    p = [0.5, 1 / 3, 1 / 6]
    assert u["entropy"] == pytest.approx(-sum(q * math.log(q) for q in p) / math.log(4))
    # token 0: {0,1} vs {0,2}: 1/3; token 1: {0,2} vs {0,2}: 1; token 2: {0,1} vs {2,3}: 0
    assert overlap(ids, torch.tensor([[0, 2], [0, 2], [2, 3]]), 4) == pytest.approx((1 / 3 + 1 + 0) / 3)
    d = diversity(torch.tensor([7, 7, 9]), ids, 4)
    assert d == {7: {"count": 2, "distinct": 3}, 9: {"count": 1, "distinct": 2}}


def test_analyze_reports_per_application_and_same_layer_overlaps():
    m = tiny()
    res = analyze(m, torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(2)))
    assert res["applications"] == 4 and len(res["ffn_usage"]) == 4
    assert set(res["overlap"]) == {"0", "1"} and all(len(v) == 2 for v in res["overlap"].values())
    assert all(res["overlap"][k][i][i] == pytest.approx(1.0) for k in ("0", "1") for i in range(2))
    assert len(res["attention_usage"][0]["att_o"]) == 2  # one entry per head
    json.dumps(res)  # plain data
    dense = analyze(
        moeut.DenseLM(50, d_model=32, n_layers=3, n_heads=4, d_ff=40).eval(), torch.zeros(1, 8, dtype=torch.long)
    )
    assert dense["applications"] == 3 and "ffn_usage" not in dense
