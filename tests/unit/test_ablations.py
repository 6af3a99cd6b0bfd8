"""The paper's ablation axes as model options: layernorm placement (peri, the default; pre; post) and
group order (ABAB, the default; AABB), each against a hand-wired reference of the training code's
computation (RelativeMoeTransformerEncoderLayer with and without `moe.nonorm`, preln on or off;
`transformer.universal.group_type`)."""

import pytest
import torch
import torch.nn.functional as F

import moeut
from moeut.attention import AttentionMask
from moeut.generate import generate

CFG = dict(
    d_model=32,
    n_layers=6,
    n_heads=2,
    ff_n_experts=6,
    att_n_experts=3,
    d_head=8,
    group_size=2,
    ff_k=2,
    att_k=2,
    ff_expert_size=8,
)


def ln(x, norm):
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)


def reference(m, x, order, placement):
    """The LM wired by hand from its sublayers: attention(q_src, k_src, v_src) and the σ-MoE(input, router input)."""
    mask = AttentionMask(None, None, is_causal=True)
    h = m.embedding(x)
    for li in order:
        L = m.transformer.layers[li]
        if placement == "peri":  # nonorm: routers, queries and keys read ln1(h); values the raw h
            n = ln(h, L.ln1)
            h = h + L.attention(n, n, h, mask)[0]
            h = h + L.ffn(h, ln(h, L.ln2))
        elif placement == "pre":  # preln: every input of a sublayer is normalised
            n = ln(h, L.ln1)
            h = h + L.attention(n, n, n, mask)[0]
            n = ln(h, L.ln2)
            h = h + L.ffn(n, n)
        else:  # post: normalise after each residual addition
            h = ln(h + L.attention(h, h, h, mask)[0], L.ln1)
            h = ln(h + L.ffn(h, h), L.ln2)
    if placement != "post":
        h = ln(h, m.out_norm)
    return m.lm_head(h)


@pytest.mark.parametrize("layer_norm", ["peri", "pre", "post"])
@pytest.mark.parametrize("group_type", ["abab", "aabb"])
def test_each_variant_computes_its_reference(layer_norm, group_type):
    torch.manual_seed(0)
    m = moeut.MoEUTLM(40, **CFG, group_type=group_type, layer_norm=layer_norm).eval()
    with torch.no_grad():  # LayerNorms away from 1 / 0, so that a misplaced one shows
        for L in m.transformer.layers:
            for norm in (L.ln1, L.ln2):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0, 0.2)
    order = [0, 1, 0, 1, 0, 1] if group_type == "abab" else [0, 0, 0, 1, 1, 1]
    assert [li for _, li in m.transformer.application_order()] == order
    x = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = m(x).outputs
        torch.testing.assert_close(got, reference(m, x, order, layer_norm), rtol=1e-5, atol=1e-5)
        for other in {"peri", "pre", "post"} - {layer_norm}:  # and not another variant's computation
            assert (got - reference(m, x, order, other)).abs().max() > 1e-2
        other_order = [0, 0, 0, 1, 1, 1] if group_type == "abab" else [0, 1, 0, 1, 0, 1]
        assert (got - reference(m, x, other_order, layer_norm)).abs().max() > 1e-2


@pytest.mark.parametrize("layer_norm, group_type", [("pre", "aabb"), ("post", "abab")])
def test_variants_train_and_decode_with_the_cache(layer_norm, group_type):
    torch.manual_seed(0)
    m = moeut.MoEUTLM(40, **CFG, group_type=group_type, layer_norm=layer_norm)
    x = torch.randint(0, 40, (2, 12))
    out = m(x)
    loss = F.cross_entropy(out.outputs.flatten(0, 1), x.flatten()) + out.reg_loss
    loss.backward()
    assert out.reg_loss != 0 and all(
        p.grad is not None for p in m.parameters() if p is not m.out_norm.weight and p is not m.out_norm.bias
    )
    m.eval()
    prompt = [x[0, :5].tolist()]
    cached = generate(m, prompt, 6, cache="static")
    recomputed = generate(m, prompt, 6, cache="none")
    assert cached == recomputed


def test_post_ln_initialises_without_the_depth_scale():
    torch.manual_seed(0)
    peri = moeut.MoEUTLM(40, **CFG)
    torch.manual_seed(0)
    post = moeut.MoEUTLM(40, **CFG, layer_norm="post")
    ratio = post.transformer.layers[0].ffn.keys.std() / peri.transformer.layers[0].ffn.keys.std()
    assert ratio.item() == pytest.approx((6 / 2) ** 0.5, rel=0.05)  # sqrt(2 / n_layers) left out


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="group_type"):
        moeut.MoEUTLM(40, **CFG, group_type="abba")
    with pytest.raises(ValueError, match="layer_norm"):
        moeut.MoEUTLM(40, **CFG, layer_norm="sandwich")
