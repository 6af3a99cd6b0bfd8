"""`moeut.router`: one routing for the σ-MoE and SwitchHead with the activation as an argument. The
sigmoid goes through the `sigmoid_topk` operator; softmax takes the plain PyTorch reference path, and a
tiny model with a softmax router trains on it."""

import pytest
import torch
import torch.nn.functional as F

from moeut import MoEUTLM, router
from moeut.models import model_kwargs


@pytest.mark.parametrize("fp32", [False, True])
def test_softmax_selection_is_the_reference_form_with_gradients(fp32, monkeypatch):
    monkeypatch.setattr(router, "sigmoid_topk", lambda *a, **k: pytest.fail("softmax took the sigmoid operator"))
    logits = torch.randn(2, 5, 3, 7, dtype=torch.bfloat16, requires_grad=True)
    rl, gate, expert = router.select_experts(logits, 2, "softmax", fp32=fp32)
    ref = F.softmax(logits.float() if fp32 else logits, dim=-1).topk(2, dim=-1)
    assert torch.equal(expert, ref.indices) and torch.equal(gate, ref.values) and rl.logits is not None
    assert gate.dtype == (torch.float32 if fp32 else torch.bfloat16)
    assert (gate.float().sum(-1) <= 1 + 1e-3).all()  # softmax gates of the k chosen out of E
    (g,) = torch.autograd.grad(gate.float().square().sum(), logits)
    (want,) = torch.autograd.grad(ref.values.float().square().sum(), logits)
    torch.testing.assert_close(g, want)


def test_sigmoid_goes_through_the_operator(monkeypatch):
    calls = []
    real = router.sigmoid_topk
    monkeypatch.setattr(router, "sigmoid_topk", lambda *a, **k: calls.append(1) or real(*a, **k))
    logits = torch.randn(4, 9)
    _, gate, expert = router.select_experts(logits, 3)
    assert calls and torch.equal(gate, torch.sigmoid(logits).topk(3).values)
    assert router.KERNEL_ACTIVATIONS == ("sigmoid",) and set(router.KERNEL_ACTIVATIONS) <= set(router.ACTIVATIONS)


def test_padded_columns_and_dropout_choose_valid_experts_only():
    logits = torch.randn(3, 4, 10)
    logits[..., 8:] = 100.0  # alignment padding: never chosen
    for activation in router.ACTIVATIONS:
        rl, _, expert = router.select_experts(logits, 3, activation, n_valid=8)
        assert rl.logits.shape[-1] == 8 and expert.max() < 8
        torch.manual_seed(0)
        _, gate, expert = router.select_experts(logits, 3, activation, expert_dropout=0.5, n_valid=8)
        assert expert.max() < 8 and torch.equal(gate, router.scores(logits[..., :8], activation).gather(-1, expert))


def test_chosen_experts_agree_with_every_activation():
    logits = torch.randn(50, 12)
    for activation in router.ACTIVATIONS:
        _, _, expert = router.select_experts(logits, 4, activation)
        assert torch.equal(expert.sort(-1).values, router.chosen_experts(logits, 4).sort(-1).values)


def test_a_tiny_model_with_a_softmax_router_trains():
    torch.manual_seed(0)
    kwargs = model_kwargs(
        "moeut-tiny",
        {
            "router_activation": "softmax",
            "d_model": 32,
            "n_layers": 2,
            "n_heads": 2,
            "ff_n_experts": 8,
            "att_n_experts": 3,
            "ff_k": 2,
        },
    )
    model = MoEUTLM(50, **kwargs).train()
    assert {m.router_activation for m in model.modules() if hasattr(m, "router_activation")} == {"softmax"}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 50, (4, 17))
    x[:, 1::2] = x[:, 0::2][:, :8] % 7  # something to learn
    losses = []
    for _ in range(30):
        out = model(x[:, :-1])
        loss = F.cross_entropy(out.outputs.flatten(0, 1), x[:, 1:].flatten())
        (loss + out.reg_loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    ffn = model.transformer.layers[0].ffn
    _, gate, _ = ffn.select(torch.randn(2, 3, 32))
    assert (gate.sum(-1) <= 1 + 1e-5).all()


def test_an_unknown_activation_is_refused_by_name():
    with pytest.raises(ValueError, match="router_activation must be one of sigmoid, softmax"):
        MoEUTLM(50, **{**model_kwargs("moeut-tiny"), "router_activation": "relu"})
    with pytest.raises(ValueError, match="router activation 'relu'"):
        router.select_experts(torch.randn(2, 5), 2, router.check_activation("relu"))
