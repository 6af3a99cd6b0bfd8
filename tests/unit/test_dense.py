"""The dense baseline is the training code's `preln_rope` model: its initialisation and its embedding
scale of 1 (`create_model` in the training code's tasks/transformer_lm_mixin.py sets
`model.embedding_scale = 1.0` for pre-LN variants); runs keep the scale they recorded."""

import math

import pytest
import torch

from moeut.dense import DenseLM
from moeut.models import model_kwargs, model_kwargs_of_run


def test_every_block_linear_has_the_training_codes_deviation():
    torch.manual_seed(0)
    L, D, F = 3, 48, 96
    m = DenseLM(100, d_model=D, n_layers=L, n_heads=4, d_ff=F)
    for layer in m.layers:
        q_rows = layer.qkv.weight.shape[0] // 3
        blocks = {
            "q": layer.qkv.weight[:q_rows],
            "kv": layer.qkv.weight[q_rows:],
            "o": layer.o.weight,
            "ff1": layer.ff1.weight,
            "ff2": layer.ff2.weight,
        }
        for name, w in blocks.items():
            want = math.sqrt(2 / (L * w.shape[1]))
            assert w.std().item() == pytest.approx(want, rel=1e-5), name
            # drawn from a normal truncated at ±2 before the rescale (whose deviation is ~0.88)
            assert w.abs().max().item() <= 2 / 0.85 * want, name
        assert torch.equal(layer.ff1.bias, torch.zeros(F)) and torch.equal(layer.ff2.bias, torch.zeros(D))
        assert torch.equal(layer.ln1.weight, torch.ones(D)) and torch.equal(layer.ln2.bias, torch.zeros(D))
    # the embedding: kaiming normal (fan_in = d_model, linear gain)
    assert m.embedding.weight.std().item() == pytest.approx(1 / math.sqrt(D), rel=0.05)


def test_the_paper_baseline_does_not_scale_its_embedding():
    torch.manual_seed(3)
    D = 32
    m = DenseLM(50, d_model=D, n_layers=2, n_heads=4, d_ff=64).eval()
    assert m.embedding_scale == 1.0
    x = torch.randint(0, 50, (2, 9))
    from moeut.attention import AttentionMask

    h = m.embedding(x)  # what the first layer must see, unscaled
    for layer in m.layers:
        h, _ = layer(h, AttentionMask(None, None, is_causal=True), None)
    torch.testing.assert_close(m(x).outputs, m.lm_head(m.out_norm(h)), rtol=1e-5, atol=1e-5)


def test_the_optional_scale_multiplies_the_embedding_by_the_square_root_of_d_model():
    torch.manual_seed(1)
    D = 32
    scaled = DenseLM(50, d_model=D, n_layers=2, n_heads=4, d_ff=64, scale_embedding=True)
    plain = DenseLM(50, d_model=D, n_layers=2, n_heads=4, d_ff=64, scale_embedding=False)
    state = scaled.state_dict()
    plain.load_state_dict({**state, "embedding.weight": state["embedding.weight"] * math.sqrt(D)})
    x = torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(scaled(x).outputs, plain(x).outputs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(
        scaled(x).outputs,
        DenseLM(50, d_model=D, n_layers=2, n_heads=4, d_ff=64, scale_embedding=False).eval()(x).outputs,
    )


def test_runs_record_the_scale_and_keep_what_they_recorded():
    assert model_kwargs("dense-tiny")["scale_embedding"] is False
    assert "scale_embedding" not in model_kwargs("moeut-tiny")
    new = {"model": "dense-tiny", "model_kwargs": model_kwargs("dense-tiny")}
    scaled = {"model": "dense-tiny", "model_kwargs": {**model_kwargs("dense-tiny"), "scale_embedding": True}}
    old = {
        "model": "dense-tiny",
        "model_kwargs": {k: v for k, v in model_kwargs("dense-tiny").items() if k != "scale_embedding"},
    }
    assert model_kwargs_of_run(new)["scale_embedding"] is False
    assert model_kwargs_of_run(scaled)["scale_embedding"] is True  # a run made while the default was True
    assert model_kwargs_of_run(old)["scale_embedding"] is False
    assert "scale_embedding" not in model_kwargs_of_run({"model": "moeut-tiny", "model_kwargs": {}})
