"""Helpers shared by the unit, interpreter and GPU tests."""

import pytest
import torch
import torch.nn.functional as F


def rel(a, b) -> float:
    """Relative error of a against b, in fp64: ||a - b|| / ||b||."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def autocast_step_grads(model, x, device_type: str = "cpu"):
    """(logits, {name: fp32 gradient}) of one bf16-autocast LM loss (+ reg loss) on tokens x."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(device_type, torch.bfloat16):
        out = model(x)
        loss = F.cross_entropy(out.outputs.float().flatten(0, 1), x.flatten()) + out.reg_loss
    loss.backward()
    return out.outputs.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


TINY_MOEUT = dict(
    d_model=32,
    n_layers=4,
    n_heads=2,
    ff_n_experts=6,
    att_n_experts=3,
    d_head=8,
    ff_k=2,
    group_size=2,
    ff_expert_size=16,
)


def tiny_lm(kind: str, **over):
    """A 4-layer MoEUT (two layers shared twice, 6 FFN experts, 3 attention experts per head) or dense
    LM over 40 tokens, d_model 32: small enough for whole training steps through the interpreter.
    `over` replaces MoEUT arguments."""
    from moeut import DenseLM, MoEUTLM

    if kind == "moeut":
        return MoEUTLM(40, **{**TINY_MOEUT, **over})
    return DenseLM(40, d_model=32, n_layers=4, n_heads=2, d_ff=64)


def step_loss_grads(model, x):
    """(loss, {name: gradient}) of one LM loss (+ reg loss) on tokens x, in the model's own dtype."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = F.cross_entropy(out.outputs.flatten(0, 1), x.flatten()) + out.reg_loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def shared_and_per_application_grads(model, x, monkeypatch, device_type: str = "cpu"):
    """`autocast_step_grads` with shared expert weights off (`settings.wgrad_defer` 0), then on (its
    value on entry, or the default 9 if that was 0)."""
    from moeut.settings import settings

    defer = settings.wgrad_defer or 9
    runs = []
    for share in (False, True):
        monkeypatch.setattr(settings, "wgrad_defer", defer if share else 0)
        runs.append(autocast_step_grads(model, x, device_type))
    return runs


def switch_kernels(monkeypatch, rule) -> None:
    """Patch `use_fused` to rule(t, switch) -> bool in every loaded moeut module that imported it (each
    holds its own reference: the operators in `grouped_mm`, the operand casts in `expert_mm`, ...), so
    no operator keeps the real test. `lambda t, switch=None: switch is None` turns the unswitched
    kernels on (through the interpreter on CPU) and leaves the switched ones off."""
    import sys
    import moeut  # noqa: F401  (loads the modules)

    patched = [
        name
        for name, module in list(sys.modules.items())
        if (name == "moeut" or name.startswith("moeut.")) and hasattr(module, "use_fused")
    ]
    for name in patched:
        monkeypatch.setattr(sys.modules[name], "use_fused", rule)
    assert {"moeut.ops.dispatch", "moeut.ops.grouped_mm", "moeut.ops.expert_mm"} <= set(patched), patched


def combine_case(gather: bool, groups: int, I: int, O: int, seed: int):
    """(routing, x, w, gate) of a small fused-combine problem: 24 rows, 4 choices, 6 experts of which
    the last gets no row, gates grouped `groups` per row; all leaves require grad."""
    from moeut.ops.expert_mm import route

    gen = torch.Generator().manual_seed(seed)
    R, K, E = 24, 4, 6
    expert = torch.randint(0, E - 1, (R, K), generator=gen)
    expert[:, 0] = 0
    r = route(expert, E)
    x = torch.randn(R if gather else R * K, I, generator=gen, requires_grad=True)
    w = torch.randn(E, I, O, generator=gen, requires_grad=True)
    gate = torch.rand(R * groups, K // groups, generator=gen, requires_grad=True)
    return r, x, w, gate


def force_loop_n(monkeypatch, loop_n) -> None:
    """Force the grouped GEMM kernel's "loop over N" form on (True) or off (False) wherever the input is
    narrow enough for it; None keeps the kernel's own rule."""
    if loop_n is None:
        return
    from moeut.kernels import expert_mm as triton_expert_mm

    monkeypatch.setattr(triton_expert_mm, "use_loop_n", lambda I, O, N, E: loop_n and I <= 128)


def force_wgrad_splits(monkeypatch, splits) -> None:
    """Force the weight-gradient kernel to split each expert's rows into `splits` ranges (None: its rule)."""
    if splits is None:
        return
    from moeut.kernels import weight_grad

    monkeypatch.setattr(weight_grad, "wgrad_splits", lambda *args, **kwargs: splits)


def _interpreter_runs() -> bool:
    import importlib.util
    import os

    return (
        importlib.util.find_spec("triton") is not None
        and not torch.cuda.is_available()
        and os.environ.get("TRITON_INTERPRET") == "1"
    )


# Tests of the Triton kernels through Triton's CPU interpreter (tests/conftest.py turns it on without a
# GPU); on a GPU machine tests/gpu runs the compiled kernels instead.
interpreted = pytest.mark.skipif(
    not _interpreter_runs(), reason="interpreter tests are for CPU-only machines (GPU runs use tests/gpu)"
)
