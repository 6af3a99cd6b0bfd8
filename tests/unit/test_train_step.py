"""The multi-process step's gradient path (flat buffer, in-place accumulation) against the plain step."""
import pytest
import torch

from moeut import MoEUTLM
from moeut.train.step import FlatGradients, FlatGradientStep, step_body

CFG = dict(d_model=32, n_layers=4, n_heads=2, ff_n_experts=8, att_n_experts=2, d_head=16, ff_k=2,
           group_size=2, ff_expert_size=16)


def make(seed=0):
    torch.manual_seed(seed)
    model = MoEUTLM(50, **CFG).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    return model, opt


@pytest.mark.parametrize("accum", [1, 2])
def test_flat_gradient_step_equals_the_plain_step(accum):
    """One process, no group: the same gradients, norms and weights, bit for bit, over three steps
    (with gradient accumulation the second micro-batch adds into the same views)."""
    batches = torch.randint(0, 50, (3, accum, 4 // accum, 9), generator=torch.Generator().manual_seed(1))
    a, opt_a = make()
    b, opt_b = make()
    flat = FlatGradientStep(b, b, opt_b, torch.float32, clip=0.1)
    for batch in batches:
        la, _, ga, _ = step_body(a, a, opt_a, batch, torch.float32, 0.1, 1)
        lb, _, gb, _ = flat(batch)
        assert torch.equal(la, lb) and torch.equal(ga, gb)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n


def test_flat_buffer_holds_every_gradient_and_notices_a_replaced_one():
    model, _ = make()
    grads = FlatGradients(model)
    x = torch.randint(0, 50, (2, 8))
    out = model(x)
    (out.outputs.float().logsumexp(-1).mean() + out.reg_loss).backward()
    grads.check_views()
    assert grads.buffer.abs().sum() > 0
    total = sum(p.grad.pow(2).sum() for p in model.parameters())
    torch.testing.assert_close(grads.buffer.pow(2).sum(), total)
    next(model.parameters()).grad = torch.zeros_like(next(model.parameters()))
    with pytest.raises(RuntimeError, match="left the flat buffer"):
        grads.check_views()
