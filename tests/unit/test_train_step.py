"""The multi-process step's gradient path (flat buffer, in-place accumulation) against the plain step, and
an optimizer resumed from another step mode's state."""

import copy

import pytest
import torch

from moeut import MoEUTLM
from moeut.train.step import FlatGradients, FlatGradientStep, set_optimizer_mode, step_body

CFG = dict(
    d_model=32,
    n_layers=4,
    n_heads=2,
    ff_n_experts=8,
    att_n_experts=2,
    d_head=16,
    ff_k=2,
    group_size=2,
    ff_expert_size=16,
)


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


def test_resumed_optimizer_runs_in_this_runs_mode_not_the_saving_runs():
    """A state saved by a graphed run (capturable=True) loaded into an eager CPU run: `load_state_dict`
    copies the saving run's flags, and AdamW then refuses a step on the CPU; after `set_optimizer_mode`
    it continues exactly like the optimizer that never stopped."""
    batches = torch.randint(0, 50, (2, 1, 4, 9), generator=torch.Generator().manual_seed(2))
    a, opt_a = make()
    step_body(a, a, opt_a, batches[0], torch.float32, 0.1, 1)
    saved = copy.deepcopy(opt_a.state_dict())  # not opt_a's live tensors
    saved["param_groups"][0]["capturable"] = True
    b, opt_b = make()
    b.load_state_dict(a.state_dict())
    opt_b.load_state_dict(saved)
    assert opt_b.param_groups[0]["capturable"]
    with pytest.raises(AssertionError, match="capturable"):
        step_body(b, b, opt_b, batches[1], torch.float32, 0.1, 1)
    b, opt_b = make()  # the refused step left its gradients behind
    b.load_state_dict(a.state_dict())
    opt_b.load_state_dict(saved)
    set_optimizer_mode(opt_b, fused=False, capturable=False)
    assert not any(g["capturable"] or g["fused"] for g in opt_b.param_groups)
    assert all(s["step"].device.type == "cpu" and s["step"].dtype == torch.float32 for s in opt_b.state.values())
    step_body(a, a, opt_a, batches[1], torch.float32, 0.1, 1)
    step_body(b, b, opt_b, batches[1], torch.float32, 0.1, 1)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
