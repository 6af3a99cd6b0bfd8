"""moeut's LayerNorm: torch's on CPU (same parameters and state dict), and its Triton kernels through the
interpreter against F.layer_norm, forward and backward (fp32 and bf16 inputs, outputs in the autocast
dtype, strided rows, odd widths, rows that leave a program's last tile partial, no rows at all), with
weight and bias gradients that are bitwise reproducible."""

import os

import pytest
import torch
import torch.nn.functional as F

from moeut.ops.norm import LayerNorm


def test_module_is_torchs_layer_norm_on_cpu():
    torch.manual_seed(0)
    ours, theirs = LayerNorm(12), torch.nn.LayerNorm(12)
    assert isinstance(ours, torch.nn.LayerNorm)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 12)
    assert torch.equal(ours(x), theirs(x))
    with pytest.raises(RuntimeError, match="normalized_shape"):
        ours(torch.randn(3, 11))


triton = pytest.importorskip("triton")
interpreted = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not interpreted, reason="the interpreter tests are for CPU-only machines")


def _case(R, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (3 + 2 * torch.randn(R, D + 5, generator=gen))[:, 2 : D + 2].to(dtype)  # rows with a stride > D
    w = 1 + 0.3 * torch.randn(D, generator=gen)
    b = 0.5 * torch.randn(D, generator=gen)
    g = torch.randn(R, D, generator=gen)
    return x, w, b, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "R,D,programs", [(37, 82, 512), (37, 1000, 3), (300, 1000, 512), (1, 16, 512), (300, 20, 2), (0, 24, 512)]
)
def test_kernels_match_layer_norm(dtype, out_dtype, R, D, programs, monkeypatch):
    """`programs` caps the backward's programs: 3 at D = 1000 gives each one several 2-row tiles and the
    last a partial one; 2 at D = 20 gives 64-row tiles, the last one partial; 300 rows of 1000 give
    150 programs, whose partial sums the second kernel adds in five tiles of 32 rows (SUM_ROWS lowered
    from 512) and columns of 8 (the last one partial at D = 82 and 20)."""
    from moeut.kernels import norm as triton_norm
    from moeut.ops.norm import _LayerNormFunction

    monkeypatch.setattr(triton_norm, "BACKWARD_PROGRAMS", programs)
    monkeypatch.setattr(triton_norm, "SUM_ROWS", 32)
    x, w, b, g = _case(R, D, dtype, seed=R * 7 + D)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    y = _LayerNormFunction.apply(x, w, b, 1e-5, out_dtype, False)
    assert y.dtype == out_dtype and y.shape == x.shape
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    ref = F.layer_norm(xr.float(), (D,), wr, br, 1e-5)
    y.backward(g.to(out_dtype))
    ref.backward(g.to(out_dtype).float())
    # one rounding of the fp32 result to the output dtype (the interpreter truncates to bf16: 1 ulp)
    torch.testing.assert_close(
        y.float(), ref.to(out_dtype).float(), rtol=1e-5 if out_dtype == torch.float32 else 2**-7, atol=1e-5
    )
    assert x.grad.dtype == dtype and w.grad.dtype == w.dtype
    torch.testing.assert_close(
        x.grad.float(), xr.grad.to(dtype).float(), rtol=1e-5 if dtype == torch.float32 else 2**-7, atol=1e-5
    )
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, br.grad, rtol=1e-5, atol=1e-5)
    if R:  # the sums against fp64: the kernels' error is fp32 rounding, not a wrong formula
        x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
        ref64 = F.layer_norm(x64, (D,), w64, b64, 1e-5)
        ref64.backward(g.to(out_dtype).double())
        torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use", ["both", "norm only", "pass only"])
def test_pass_through_adds_the_other_gradient_inside_the_backward(dtype, use, monkeypatch):
    """normalize_and_pass's second output is x: its gradient (from any other use of x) is added inside
    the LayerNorm backward, equal to autograd summing x's two gradients; an unused output adds nothing."""
    from moeut.ops.norm import LayerNorm
    from tests.helpers import switch_kernels

    torch.manual_seed(2)
    norm = LayerNorm(40).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
        norm.bias.normal_(0, 0.3)
    x = (2 + torch.randn(3, 7, 40)).to(dtype).requires_grad_()
    gy, gx = torch.randn(3, 7, 40).to(dtype), torch.randn(3, 7, 40).to(dtype)

    def loss_of(y, x_out, g_y, g_x):
        if use == "both":
            return (y * g_y).sum() + (x_out * x_out * g_x).sum()
        if use == "norm only":
            return (y * g_y).sum()
        return (x_out * x_out * g_x).sum() + 0 * y.sum()

    switch_kernels(monkeypatch, lambda t, switch=None: switch == "norm")
    y, x_out = norm.normalize_and_pass(x)
    assert x_out.data_ptr() == x.data_ptr() and torch.equal(x_out, x)
    got = torch.autograd.grad(loss_of(y, x_out, gy, gx), (x, norm.weight, norm.bias))
    # autograd summing x's two gradients, in fp64
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, norm.weight, norm.bias))
    want = torch.autograd.grad(
        loss_of(F.layer_norm(x64, (40,), w64, b64), x64, gy.double(), gx.double()), (x64, w64, b64)
    )
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=2e-2)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, **tol)


def test_weight_gradient_is_bitwise_reproducible(monkeypatch):
    from moeut.kernels import norm as triton_norm

    monkeypatch.setattr(triton_norm, "BACKWARD_PROGRAMS", 5)
    x, w, b, g = _case(203, 40, torch.float32, seed=3)
    mean_rstd = triton_norm.layer_norm_fwd(x, w, b, 1e-5, torch.float32)[1:3]
    first = triton_norm.layer_norm_bwd(g, x, w, *mean_rstd)
    second = triton_norm.layer_norm_bwd(g, x, w, *mean_rstd)
    assert all(torch.equal(a, b) for a, b in zip(first[:3], second[:3]))


def test_output_dtype_follows_autocast():
    from moeut.ops.norm import layer_norm

    x, w, b, _ = _case(6, 24, torch.float32, seed=1)
    assert layer_norm(x, w, b).dtype == torch.float32
    with torch.autocast("cpu", torch.bfloat16):
        y = layer_norm(x.view(2, 3, 24), w, b)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 24)
    torch.testing.assert_close(
        y.float(), F.layer_norm(x, (24,), w, b).to(torch.bfloat16).float().view(2, 3, 24), rtol=2**-7, atol=1e-5
    )


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("kind", ["moeut", "dense"])
def test_model_step_with_the_norm_kernel_matches_torchs(kind, checkpointing, monkeypatch):
    """A training step of MoEUT and of the dense baseline with only the LayerNorm kernels switched on
    (interpreted, pass-through included) against torch's LayerNorm: the loss and every gradient, the
    LayerNorms' own included, with and without activation checkpointing (which runs each layer's
    forward again in the backward). In fp32: the interpreter truncates to bf16 where the GPU rounds,
    and a flipped bf16 router input can change an expert choice."""
    from moeut.kernels import norm as triton_norm
    from tests.helpers import step_loss_grads, switch_kernels, tiny_lm

    torch.manual_seed(0)
    model = tiny_lm(kind)
    backbone = model.transformer if kind == "moeut" else model
    model.train()
    backbone.activation_checkpointing = checkpointing
    norms = [n for n, m in model.named_modules() if isinstance(m, LayerNorm)]
    assert len(norms) == (2 * 2 if kind == "moeut" else 4 * 2) + 1  # ln1, ln2 of each distinct layer; out_norm
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.rsplit(".", 1)[0] in norms:
                p.add_(0.2 * torch.randn_like(p))
    x = torch.randint(0, 40, (2, 8))

    want_loss, want = step_loss_grads(model, x)
    calls = []
    fwd = triton_norm.layer_norm_fwd
    monkeypatch.setattr(triton_norm, "layer_norm_fwd", lambda *a, **k: calls.append(1) or fwd(*a, **k))
    switch_kernels(monkeypatch, lambda t, switch=None: switch == "norm")
    got_loss, got = step_loss_grads(model, x)
    # two per layer application (4 either way), twice with checkpointing; and the output norm
    assert len(calls) == 4 * 2 * (2 if checkpointing else 1) + 1
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5 * want[n].abs().max().item(), msg=n)


@pytest.mark.parametrize("R,D", [(37, 82), (300, 20), (0, 24)])
def test_kernels_write_the_low_precision_copies_of_x_and_dx(R, D):
    """With copy_dtype the forward also writes x, and the backward dx, in that dtype: what `.to` gives
    (the interpreter truncates where the GPU rounds to nearest even: 1 ulp; the GPU tests ask for the
    bits). Strided rows in, contiguous copies out; the other outputs unchanged."""
    from moeut.kernels import norm as triton_norm

    x, w, b, g = _case(R, D, torch.float32, seed=R + D)
    y, mean, rstd, x_copy = triton_norm.layer_norm_fwd(x, w, b, 1e-5, torch.bfloat16, copy_dtype=torch.bfloat16)
    y0, mean0, rstd0, none = triton_norm.layer_norm_fwd(x, w, b, 1e-5, torch.bfloat16)
    assert none is None and all(torch.equal(a, b) for a, b in ((y, y0), (mean, mean0), (rstd, rstd0)))
    assert x_copy.dtype == torch.bfloat16 and x_copy.shape == x.shape and x_copy.is_contiguous()
    torch.testing.assert_close(x_copy.float(), x.to(torch.bfloat16).float(), rtol=2**-7, atol=0)
    gy = g.to(torch.bfloat16)
    dx, dw, db, dx_copy = triton_norm.layer_norm_bwd(gy, x, w, mean, rstd, grad_add=g, copy_dtype=torch.bfloat16)
    dx0, dw0, db0, none = triton_norm.layer_norm_bwd(gy, x, w, mean, rstd, grad_add=g)
    assert none is None and all(torch.equal(a, b) for a, b in ((dx, dx0), (dw, dw0), (db, db0)))
    assert dx_copy.dtype == torch.bfloat16 and dx_copy.shape == x.shape
    torch.testing.assert_close(dx_copy.float(), dx.to(torch.bfloat16).float(), rtol=2**-7, atol=0)


def _rounded_or_truncated(copy, t):
    """Whether each element of the bf16 copy is t's, rounded to nearest even (`.to`, the GPU) or truncated
    (the interpreter)."""
    truncated = (t.float().contiguous().view(torch.int32) & -65536).view(torch.float32)
    c = copy.float()
    return bool(((c == t.to(torch.bfloat16).float()) | (c == truncated)).all())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_moeut_step_takes_the_norms_copies_instead_of_casting(checkpointing, monkeypatch):
    """A bf16-autocast MoEUT step with the LayerNorm kernels on (interpreted): each layer application's
    value projection and FFN take their input's bf16 copy from the LayerNorm before them, and the FFN
    and the output projection their output gradient's from the LayerNorm after them (four per
    application, the forward's twice with checkpointing). Every copy taken holds the tensor's own
    values (rounded, or truncated by the interpreter); the gradients agree with the step without
    offers up to what that truncation moves (~1e-2), with no offer taken there."""
    from moeut.ops import cast_relay
    from tests.helpers import autocast_step_grads, rel, switch_kernels, tiny_lm

    torch.manual_seed(0)
    model = tiny_lm("moeut")
    model.train()
    model.transformer.activation_checkpointing = checkpointing
    x = torch.randint(0, 40, (2, 8))
    switch_kernels(monkeypatch, lambda t, switch=None: switch == "norm")
    take, taken, enabled = cast_relay.take, [], [True]

    def spy(t, dtype):
        if not enabled[0]:
            return None  # every projection casts for itself: the reference
        copy = take(t, dtype)
        if copy is not None:
            taken.append(_rounded_or_truncated(copy, t))
        return copy

    monkeypatch.setattr(cast_relay, "take", spy)
    runs = []
    for on in (False, True):
        enabled[0] = on
        taken.clear()
        runs.append(autocast_step_grads(model, x) + (list(taken),))
    (want_out, want, no_takes), (got_out, got, takes) = runs
    applications = 4
    assert no_takes == []
    assert len(takes) == applications * (2 * (2 if checkpointing else 1) + 2) and all(takes)
    assert rel(got_out, want_out) < 2e-2
    for n in want:
        assert rel(got[n], want[n]) < 0.1, n
