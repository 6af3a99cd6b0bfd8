"""The residual's low-precision copy written by the top-k sums (`lowp_copy.py`): a training step under
bf16 autocast gives the same outputs and gradients with and without it, the expert projections take
the copy instead of casting (one residual cast fewer per FFN and per value projection after the
first), and a copy is never used for a tensor that changed or is not the one it was made from."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moeut import MoEUTLM, lowp_copy
from tests.helpers import autocast_step_grads


def _model():
    torch.manual_seed(0)
    return MoEUTLM(40, d_model=32, n_layers=4, n_heads=2, ff_n_experts=6, att_n_experts=3, d_head=8,
                   ff_k=2, group_size=2, ff_expert_size=16).train()


class CountResidualCasts(TorchDispatchMode):
    """fp32 -> bf16 casts of tensors of the residual's size (n elements)."""

    def __init__(self, n):
        super().__init__()
        self.n, self.casts = n, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.startswith(("_to_copy", "copy_")) and torch.is_tensor(out) and out.dtype == torch.bfloat16 \
                and out.numel() == self.n and args[0].dtype == torch.float32 if torch.is_tensor(args[0]) else False:
            self.casts += 1
        return out


@pytest.mark.parametrize("kernels", [False, True], ids=["pytorch", "kernels"])
def test_step_with_copies_matches_casts_and_saves_them(kernels, monkeypatch):
    from moeut import expert_mm, fused
    if kernels:
        pytest.importorskip("triton")
        monkeypatch.setattr(expert_mm, "use_fused", lambda t, switch=None: switch is None)
        monkeypatch.setattr(fused, "use_fused", lambda t, switch=None: switch is None)
    model = _model()
    x = torch.randint(0, 40, (2, 8))
    runs = {}
    for enabled in (False, True):
        monkeypatch.setattr(lowp_copy, "ENABLED", enabled)
        counter = CountResidualCasts(2 * 8 * 32)
        with counter:
            runs[enabled] = autocast_step_grads(model, x), counter.casts
        assert lowp_copy._slot is None   # cleared at the end of the forward
    (out_off, grads_off), casts_off = runs[False]
    (out_on, grads_on), casts_on = runs[True]
    # 4 layer applications: every FFN reads the output sum's copy, every value projection but the first
    # the previous FFN's
    assert casts_off - casts_on == 2 * 4 - 1, (casts_off, casts_on)
    if not kernels:   # the copy is the cast: bit for bit
        assert torch.equal(out_on, out_off)
        for n in grads_off:
            assert torch.equal(grads_on[n], grads_off[n]), n
    else:   # the interpreter's cast truncates where torch's rounds: within bf16 rounding
        torch.testing.assert_close(out_on, out_off, rtol=2e-2, atol=2e-2)
        for n in grads_off:
            scale = grads_off[n].abs().max().item()
            assert (grads_on[n] - grads_off[n]).abs().max().item() <= 5e-2 * scale + 1e-6, n


def test_a_copy_is_only_used_for_its_own_unchanged_tensor(monkeypatch):
    monkeypatch.setattr(lowp_copy, "ENABLED", True)
    full = torch.randn(6, 4)
    copy = full.to(torch.bfloat16)
    lowp_copy.remember(full, copy)
    try:
        assert lowp_copy.recall(full, torch.bfloat16) is not None
        assert torch.equal(lowp_copy.recall(full.view(2, 3, 4), torch.bfloat16), copy.view(2, 3, 4))
        assert lowp_copy.recall(full, torch.float16) is None        # another dtype
        assert lowp_copy.recall(full.clone(), torch.bfloat16) is None   # another tensor with the same values
        assert lowp_copy.recall(full[:3], torch.bfloat16) is None   # part of it
        assert lowp_copy.recall(full.t(), torch.bfloat16) is None   # not contiguous
        full.add_(1)                                                 # changed in place since the copy
        assert lowp_copy.recall(full, torch.bfloat16) is None
        assert lowp_copy.wanted(torch.float32, torch.bfloat16) == torch.bfloat16
        assert lowp_copy.wanted(torch.bfloat16, torch.bfloat16) is None
    finally:
        lowp_copy.forget()
    assert lowp_copy.recall(full, torch.bfloat16) is None
