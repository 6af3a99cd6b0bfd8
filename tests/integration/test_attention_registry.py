"""An attention class of one's own, registered by name, reaches every place a model goes: `--set
attention=NAME` in training, run.json, `load_run`, generation with the preallocated static cache
(asked of the class by capability, not by type), and the Hugging Face export."""

import json

import pytest
import torch

from moeut import attention
from moeut.cli import main
from moeut.generate import generate
from moeut.runs import load_run

from .conftest import train_args

pytestmark = pytest.mark.slow


class PlainRopeAttention(torch.nn.Module):
    """Dense multi-head attention with RoPE through `attention.attend`, the official interface only;
    `attend` fills both cache kinds, so it declares the static-cache capability."""

    supports_static_cache = True

    def __init__(self, state_size, n_heads, n_experts, projection_size=None, moe_k=2, expert_dropout=0.0):
        super().__init__()
        self.n_heads, self.d_head = n_heads, projection_size or state_size // n_heads
        self.qkv = torch.nn.Linear(state_size, 3 * n_heads * self.d_head, bias=False)
        self.out = torch.nn.Linear(n_heads * self.d_head, state_size, bias=False)

    def forward(self, q_src, k_src, v_src, mask, kv_cache=None):
        B, T, _ = q_src.shape
        q, k, v = self.qkv(q_src).view(B, T, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
        out, kv_cache = attention.attend(q, k, v, mask, kv_cache, self.d_head, 10000.0, self.d_head**-0.5)
        return self.out(out.transpose(1, 2).reshape(B, T, -1)), kv_cache


attention.register_attention("test_plain_rope", PlainRopeAttention)


def test_a_registered_attention_trains_loads_generates_and_exports(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(corpus, run, tmp_path / "cache", steps=3, extra=["--set", "attention=test_plain_rope"])) == 0
    assert json.loads((run / "run.json").read_text())["model_kwargs"]["attention"] == "test_plain_rope"
    model, tok, _ = load_run(run)
    layers = model.transformer.layers
    assert all(type(layer.attention) is PlainRopeAttention for layer in layers)
    assert attention.supports_static_cache(layers[0].attention) and not attention.adds_residual(layers[0].attention)
    prompts = [tok.encode("def f(x):"), tok.encode("import os\n")]
    static = generate(model, prompts, 8)  # the static cache (the default), by capability
    assert static == generate(model, prompts, 8, cache="none") == generate(model, prompts, 8, cache="dynamic")
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_kwargs"]["attention"] == "test_plain_rope"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([prompts[0]])
    torch.testing.assert_close(hf(ids).logits, model(ids).outputs)


def test_an_unregistered_attention_is_refused_before_anything_is_written(corpus, tmp_path, capsys):
    bad = tmp_path / "bad"
    assert main(train_args(corpus, bad, tmp_path / "cache", steps=2, extra=["--set", "attention=nonesuch"])) == 2
    err = capsys.readouterr().err
    assert "unknown attention 'nonesuch'" in err and "switchhead" in err and "test_plain_rope" in err
    assert not bad.exists()
    with pytest.raises(ValueError, match="already registered"):
        attention.register_attention("switchhead", PlainRopeAttention)
