"""torch.compile(fullgraph=True) of a MoEUT training step on CPU: the custom operators (grouped GEMM,
fused expert MLP, row dot, top-k sum, router) and the joint Q/K/selector projection trace without a
graph break, and the compiled step gives the eager loss and gradients. (The GPU suite runs the
same check at the tiny and 244M shapes; this one keeps it in CI.)"""

import shutil

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import tiny_lm

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile on CPU needs a C++ compiler"
)


def _step(model, x, run=None):
    model.zero_grad(set_to_none=True)
    out = (run if run is not None else model)(x)
    loss = F.cross_entropy(out.outputs.flatten(0, 1), x.flatten()) + out.reg_loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    model = tiny_lm("moeut").train()
    x = torch.randint(0, 40, (2, 8))
    loss_eager, grads_eager = _step(model, x)
    torch._dynamo.reset()
    loss_compiled, grads_compiled = _step(model, x, torch.compile(model, fullgraph=True))
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-6)
    assert grads_compiled.keys() == grads_eager.keys()
    for n, g in grads_eager.items():
        err = ((grads_compiled[n] - g).norm() / g.norm().clamp_min(1e-30)).item()
        assert err < 1e-5, f"{n}: relative gradient error {err:.1e}"
