"""GPU checks of each fused kernel against its reference, forward and backward (run on the H200 via the device
tool; skipped where there is no CUDA). Whole-model checks are in test_models.py."""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from moeut.ops.expert_mm import expert_mm, route
from moeut.ops.reference import fp64_reference
from moeut.settings import settings
from tests.helpers import force_loop_n, force_wgrad_splits, rel


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("D,E,K", [(1024, 387, 16), (412, 155, 12), (64, 5, 1)])
def test_triton_expert_mm_matches_reference(dtype, tol, D, E, K):
    torch.manual_seed(0)
    T = 2048 + 37
    x = torch.randn(T, D, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(E, D, 128, device="cuda", dtype=dtype) / D**0.5).requires_grad_()
    expert = torch.randint(0, E, (T, K), device="cuda")
    expert[expert == 1] = 0  # expert 1 gets no rows
    r = route(expert, E)
    y = expert_mm(x, w, r)
    g = torch.randn_like(y)
    y.backward(g)
    ref, ref_dx, ref_dw = fp64_reference(x, w, g, r)  # the unit tests tie it to the einsum reference
    assert rel(y, ref) < tol
    assert rel(x.grad, ref_dx) < tol
    assert rel(w.grad, ref_dw) < tol
    assert (w.grad[1] == 0).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("I,O,gather", [(128, 1024, False), (128, 1024, True), (1024, 128, True)])
@pytest.mark.parametrize("loop_n", [None, False], ids=["auto", "column_blocks"])
def test_triton_combine_matches_torch_path(dtype, tol, I, O, gather, loop_n, monkeypatch):
    """Fused projection + gated sum (scale/scatter epilogue, gathered and scaled gradient rows) on the
    Triton path against the per-expert PyTorch path in fp64, values and all gradients; I = 128 runs
    the "loop over N" grouped GEMM by default, `column_blocks` forces the other form."""
    from moeut.ops.expert_mm import expert_mm_combine

    force_loop_n(monkeypatch, loop_n)
    torch.manual_seed(1)
    R, K, E = 1500, 4, 10
    expert = torch.randint(0, E - 1, (R, K), device="cuda")  # the last expert gets no rows
    r = route(expert, E)
    x = torch.randn(R if gather else R * K, I, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(E, I, O, device="cuda", dtype=dtype) / I**0.5).requires_grad_()
    gate = torch.rand(R, K, device="cuda", dtype=dtype, requires_grad=True)
    out = expert_mm_combine(x, w, r, gate, gather=gather)
    g = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (x, w, gate), g))
    monkeypatch.setattr(settings, "triton", False)
    xd, wd, gd = (t.detach().double().requires_grad_() for t in (x, w, gate))
    ref = expert_mm_combine(xd, wd, r, gd, gather=gather)
    want = (ref, *torch.autograd.grad(ref, (xd, wd, gd), g.double()))
    for name, a, b in zip(("out", "dx", "dw", "dgate"), got, want):
        assert rel(a, b) < tol, name
    assert (got[2][E - 1] == 0).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("D,E,K", [(1024, 387, 16), (412, 155, 12)])
def test_triton_expert_mlp_matches_torch_path(dtype, tol, D, E, K, monkeypatch):
    """The fused σ-MoE expert MLP (ReLU in the up projection's epilogue, its backward in the row dot)
    on the Triton path against the per-expert PyTorch path in fp64, values and all gradients; and
    bit-identical to the composed operators on the GPU too."""
    from moeut.ops.expert_mlp import expert_mlp
    from moeut.ops.expert_mm import expert_mm, expert_mm_combine

    torch.manual_seed(5)
    R = 2048
    expert = torch.randint(0, E - 1, (R, K), device="cuda")  # the last expert gets no rows
    r = route(expert, E)
    x = torch.randn(R, D, device="cuda", dtype=dtype, requires_grad=True)
    w1 = (torch.randn(E, D, 128, device="cuda", dtype=dtype) / D**0.5).requires_grad_()
    w2 = (torch.randn(E, 128, D, device="cuda", dtype=dtype) / 128**0.5).requires_grad_()
    gate = torch.rand(R, K, device="cuda", dtype=dtype, requires_grad=True)
    leaves = (x, w1, w2, gate)
    out = expert_mlp(x, w1, w2, r, gate)
    g = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, leaves, g))
    composed = expert_mm_combine(torch.relu(expert_mm(x, w1, r)), w2, r, gate, gather=False)
    same = (composed, *torch.autograd.grad(composed, leaves, g))
    monkeypatch.setattr(settings, "triton", False)
    ld = [t.detach().double().requires_grad_() for t in leaves]
    ref = expert_mlp(*ld[:3], r, ld[3])
    want = (ref, *torch.autograd.grad(ref, ld, g.double()))
    for name, a, b, c in zip(("out", "dx", "dw1", "dw2", "dgate"), got, want, same):
        assert rel(a, b) < tol, name
        assert torch.equal(a, c), name
    assert (got[2][E - 1] == 0).all() and (got[3][E - 1] == 0).all()


@pytest.mark.parametrize("case", ["ffn", "value", "output"])
def test_gated_weight_gradient_operand_matches_fp64(case, monkeypatch):
    """At 244M shapes in bf16: the weight gradients from the gated operand the row dot (or the value
    projection's input-gradient GEMM) writes, against the per-expert PyTorch path in fp64; every
    gradient."""
    from moeut.ops import expert_mm as em
    from moeut.ops.expert_mlp import expert_mlp

    torch.manual_seed(8)
    R, K, E, (I, O) = (
        (2048, 16, 387, (1024, 128))
        if case == "ffn"
        else (4096, 2, 10, {"value": (1024, 128), "output": (128, 1024)}[case])
    )
    expert = torch.randint(0, E - 1, (R, K), device="cuda")  # the last expert gets no rows
    r = route(expert, E)
    x = torch.randn(R, I, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gate = torch.rand(R, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ws = [(torch.randn(E, I, O, device="cuda", dtype=torch.bfloat16) / I**0.5).requires_grad_()]
    if case == "ffn":
        ws.append((torch.randn(E, O, I, device="cuda", dtype=torch.bfloat16) / O**0.5).requires_grad_())
        run = lambda x, ws, gate: expert_mlp(x, *ws, r, gate)
    else:
        run = lambda x, ws, gate: em.expert_mm_combine(x, ws[0], r, gate)
    leaves = (x, *ws, gate)
    g = torch.randn(R, I if case == "ffn" else O, device="cuda", dtype=torch.bfloat16)
    out = run(x, ws, gate)
    got = (out, *torch.autograd.grad(out, leaves, g))
    monkeypatch.setattr(settings, "triton", False)
    ld = [t.detach().double().requires_grad_() for t in leaves]
    ref = run(ld[0], ld[1:-1], ld[-1])
    want = (ref, *torch.autograd.grad(ref, ld, g.double()))
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel(a, b) < 1e-2, i
    for w in got[2:-1]:
        assert (w[E - 1] == 0).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
@pytest.mark.parametrize("n_seg", [2, 3, 4, 9])
@pytest.mark.parametrize("I,O,gated", [(1024, 128, False), (128, 1024, True)])
def test_triton_weight_grad_segments_match_sum_of_applications(dtype, tol, n_seg, I, O, gated):
    """Several applications' weight gradients in one launch (the FFN's up and gated down shapes at
    244M, 4096 tokens each): the fp32 sum of each application's gradient (bf16 operands exact in fp32),
    added to the accumulator; an expert no application routes to keeps its values."""
    from moeut.ops.grouped_mm import weight_grad_reference
    from moeut.kernels.weight_grad import weight_grad_segments_triton

    torch.manual_seed(n_seg)
    E, K, T = 387, 16, 4096
    segments, want = [], torch.zeros(E, I, O, device="cuda", dtype=torch.float64)
    for _ in range(n_seg):
        expert = torch.randint(0, E, (T, K), device="cuda")
        expert[expert == 5] = 6
        r = route(expert, E)
        x = torch.randn(T, I, device="cuda").to(dtype)
        if gated:
            seg = (
                x,
                torch.randn(T, O, device="cuda").to(dtype),
                r.offsets_E1,
                r.rows_N,
                r.rows_N,
                torch.rand(T * K, device="cuda"),
                r.slot_N,
            )
        else:
            seg = (x, torch.randn(T * K, O, device="cuda").to(dtype), r.offsets_E1, r.rows_N, None, None, None)
        segments.append(seg)
        want += weight_grad_reference(*seg[:6], torch.float32, seg[6]).double()
    acc0 = torch.randn(E, I, O, device="cuda")
    acc = weight_grad_segments_triton(segments, accumulate_into=acc0.clone())
    assert rel(acc, acc0.double() + want) < tol
    assert torch.equal(acc[5], acc0[5])


@pytest.mark.parametrize("I,O", [(1024, 128), (128, 1024)])
def test_triton_weight_grad_split_over_rows_at_switchhead_shapes(I, O, monkeypatch):
    """Weight gradients of a projection with few experts (SwitchHead's widths, 10 experts, 131072 routed
    rows, three applications per launch): the automatic row split (7 ranges) against one program per
    tile and the fp64 sum, added to the accumulator; bit-identical when run twice; an expert with no
    rows exact. (The model routes SwitchHead over heads x experts: 40 at 244M, 2 ranges.)"""
    from moeut.kernels import weight_grad as twg
    from moeut.ops.grouped_mm import weight_grad_reference

    torch.manual_seed(3)
    E, T, H = 10, 16384, 4
    segments, want = [], torch.zeros(E, I, O, device="cuda", dtype=torch.float64)
    for _ in range(3):
        r = route(torch.randint(0, E - 1, (T * H, 2), device="cuda"), E)
        x = torch.randn(T * H if I == 128 else T, I, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(r.rows_N.numel(), O, device="cuda", dtype=torch.bfloat16)
        seg = (x, g, r.offsets_E1, r.rows_N if I == 128 else r.rows_N // H, None, None, None)
        segments.append(seg)
        want += weight_grad_reference(*seg[:6], torch.float32).double()
    assert twg.wgrad_splits(E, I, O, segments[0][3].numel(), torch.device("cuda")) > 1
    acc0 = torch.randn(E, I, O, device="cuda")
    split = twg.weight_grad_segments_triton(segments, accumulate_into=acc0.clone())
    assert torch.equal(split, twg.weight_grad_segments_triton(segments, accumulate_into=acc0.clone()))
    force_wgrad_splits(monkeypatch, 1)
    whole = twg.weight_grad_segments_triton(segments, accumulate_into=acc0.clone())
    # (one program over 39k rows per tile: 5e-5 against fp64 on the H200; the ranges' partials: 7e-6)
    assert rel(split, acc0.double() + want) < 1e-4 and rel(whole, acc0.double() + want) < 1e-4
    assert torch.equal(split[E - 1], acc0[E - 1])


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("X,C,O", [(16384, 16, 1024), (8192, 24, 1536), (5, 3, 412), (0, 2, 64)])
def test_sum_choices_kernel_matches_torch(out_dtype, X, C, O):
    from moeut.ops.grouped_mm import _sum_choices_torch
    from moeut.kernels.sum_choices import sum_choices_triton

    y = torch.randn(X * C, O, device="cuda", dtype=torch.bfloat16)
    got = sum_choices_triton(y, X, out_dtype)
    want = _sum_choices_torch(y, X, out_dtype)
    assert got.dtype == out_dtype and got.shape == (X, O)
    torch.testing.assert_close(got, want, rtol=1e-5 if out_dtype == torch.float32 else 8e-3, atol=1e-4)
    init = torch.randn(X, O, device="cuda")  # the residual stream, added before the one rounding
    torch.testing.assert_close(
        sum_choices_triton(y, X, out_dtype, init),
        _sum_choices_torch(y, X, out_dtype, init),
        rtol=1e-5 if out_dtype == torch.float32 else 8e-3,
        atol=1e-4,
    )


def test_aligned_router_and_dense_ffn_match_unpadded():
    """The 244M router (387 experts) and dense FFN (d_ff 4110), padded to aligned widths for cuBLAS,
    against their unpadded products (the same rows in chunks below the padding threshold) under bf16
    autocast. Both are compared with the fp32 product: padding may not make outputs or weight gradients
    less accurate than the unpadded bf16 product is (a direct bf16-vs-bf16 bound flakes, since the two
    round their gradient reductions differently: ~1% apart on an H200)."""
    from moeut import moe
    from moeut.dense import DenseLayer

    torch.manual_seed(0)
    sel = moe.SigmaMoE(1024, 387, 128, 16).cuda()
    sel.reset_parameters(1.0)
    ffn = DenseLayer(1024, 16, 64, 4110, 0.0).cuda()
    x = torch.randn(4096, 1024, device="cuda")
    for fn, weight in ((sel.selector_logits, sel.expert_sel), (ffn.ffn, ffn.ff1.weight)):
        y32 = fn(x)
        g32 = torch.autograd.grad(y32.square().sum(), weight)[0]
        errors = []
        for chunk in (x.shape[0], 512):  # all rows at once: padded; 512 at a time: unpadded
            assert (chunk >= moe.PADDING_MIN_ROWS) == (chunk == x.shape[0])
            ys, g = [], 0
            for xc in x.split(chunk):
                with torch.autocast("cuda", torch.bfloat16):
                    y = fn(xc)
                g = g + torch.autograd.grad(y.float().square().sum(), weight)[0]
                ys.append(y.float())
            y = torch.cat(ys)
            assert y.shape == y32.shape
            errors.append((rel(y, y32), rel(g, g32)))
        (y_padded, g_padded), (y_unpadded, g_unpadded) = errors
        assert max(max(pair) for pair in errors) < 3e-2, errors
        assert y_padded < 1.5 * y_unpadded + 1e-3 and g_padded < 1.5 * g_unpadded + 1e-3, errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R,E,K", [(16384, 387, 16), (65536, 10, 2), (3, 565, 24)])
def test_router_kernel_matches_sigmoid_topk(dtype, R, E, K):
    """The fused Triton router against sigmoid + topk: same gates, experts whose scores are the gates,
    and the gradient of the logits."""
    from moeut.ops.router import sigmoid_topk, sigmoid_topk_reference

    torch.manual_seed(2)
    logits = (2 * torch.randn(R, E, device="cuda")).to(dtype).requires_grad_()
    gate, expert = sigmoid_topk(logits, K)
    ref_logits = logits.detach().clone().requires_grad_()
    ref_gate, _ = sigmoid_topk_reference(ref_logits, K)
    # The kernel's fp32 sigmoid may differ from torch's by an ulp, which can flip a bf16 rounding.
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-8, atol=0)
    torch.testing.assert_close(gate, ref_gate, **tol)
    torch.testing.assert_close(torch.sigmoid(logits.detach()).gather(1, expert), gate, **tol)
    # Gradient: autograd through sigmoid + gather at the kernel's choices (bf16 scores tie often, and
    # torch.topk breaks ties its own way, so its choices are not the reference here).
    g = torch.randn_like(gate)
    (gate * g).sum().backward()
    (torch.sigmoid(ref_logits).gather(1, expert) * g).sum().backward()
    # bf16: the kernel's s (its gate) can be one ulp off torch's sigmoid, and s * (1 - s) is then
    # rounded in another order: on the H200 the gradients differed by about 2 bf16 ulps at most
    # (relative difference <= 0.009 on 0.5-4% of the elements).
    gtol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-6, atol=1e-5)
    torch.testing.assert_close(logits.grad, ref_logits.grad, **gtol)


@pytest.mark.parametrize("router_kind", ["ffn_padded", "switchhead_sliced"])
def test_joint_router_gradient_matches_separate_nodes(router_kind):
    """`router.select_with_prob_sum` at the 244M shapes: the gates, ids and sum of the separate selection
    and regulariser kernels, and the logits' gradient within one rounding of its fp32 value (both terms
    summed in fp32; the separate nodes round each term and their bf16 sum, which where the terms cancel
    is off by more). The FFN's logits are the 387 first columns of a 392-wide product, whose extra
    columns get an exact zero gradient; SwitchHead's are a strided slice, ranked in fp32."""
    from moeut.ops import router
    from moeut.router import _ProbabilitySum

    torch.manual_seed(5)
    if router_kind == "ffn_padded":
        wide = (3 * torch.randn(16, 1024, 392, device="cuda")).to(torch.bfloat16).requires_grad_()
        K, fp32, n_valid = 16, False, 387
    else:
        wide = (3 * torch.randn(16, 1024, 3 + 40 + 40, device="cuda")).to(torch.bfloat16).requires_grad_()
        K, fp32, n_valid = 2, True, 10

    def logits_of(t):
        return t[..., :n_valid] if router_kind == "ffn_padded" else t[..., 3:43].view(*t.shape[:2], 4, 10)

    gate, expert, p_sum = router.select_with_prob_sum(
        wide if router_kind == "ffn_padded" else logits_of(wide), K, fp32=fp32, n_valid=n_valid
    )
    g_gate, g_sum = torch.randn_like(gate, dtype=torch.float32), torch.randn_like(p_sum)
    (got,) = torch.autograd.grad((gate.float() * g_gate).sum() + (p_sum * g_sum).sum(), wide)
    want_gate, want_expert = router.sigmoid_topk(logits_of(wide), K, fp32=fp32)
    want_sum = _ProbabilitySum.apply(logits_of(wide))
    assert torch.equal(expert, want_expert) and torch.equal(gate, want_gate) and torch.equal(p_sum, want_sum)
    # fp32 reference: the softmax sum's gradient through a float copy, plus d gate * s * (1 - s) (d gate as
    # autograd hands it to the node: in the gates' dtype)
    wide32 = wide.detach().float().requires_grad_()
    (ref,) = torch.autograd.grad((torch.softmax(logits_of(wide32), -1).sum(1) * g_sum).sum(), wide32)
    s, d_gate = gate.float().reshape(-1, K), g_gate.to(gate.dtype).float().reshape(-1, K)
    topk = torch.zeros(s.shape[0], n_valid, device="cuda").scatter_(1, expert.reshape(-1, K), d_gate * s * (1 - s))
    logits_of(ref).add_(topk.view(logits_of(ref).shape))
    if router_kind == "ffn_padded":
        assert (got[..., n_valid:] == 0).all()
    err = (got.float() - ref).abs()
    assert (err <= 2**-8 * ref.abs() + 1e-6).all(), (err - 2**-8 * ref.abs()).max()


@pytest.mark.parametrize("shape", [(16, 1024, 387), (16, 1024, 4, 10), "sliced"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused", ["1", "0"], ids=["kernels", "pytorch"])
def test_probability_sum_on_cuda_matches_autograd(shape, dtype, fused, monkeypatch):
    """The entropy regulariser's softmax sum (half-precision logits, fp32 softmax), forward and
    backward: the Triton kernels (`kernels/entropy.py`) and the PyTorch form (CUDA's softmax backward
    returns fp16 but not bf16 from fp32 gradients), against autograd through the fp32 softmax of a
    float copy. "sliced": SwitchHead's selector logits, a strided view of a wider projection."""
    from moeut.router import _ProbabilitySum

    monkeypatch.setattr(settings, "pytorch_ops", frozenset() if fused == "1" else frozenset({"entropy"}))
    torch.manual_seed(4)
    if shape == "sliced":
        logits = (3 * torch.randn(16, 1024, 3 + 40 + 5, device="cuda")).to(dtype)[..., 3:43].view(16, 1024, 4, 10)
        logits.requires_grad_()
    else:
        logits = (3 * torch.randn(shape, device="cuda")).to(dtype).requires_grad_()
    grad_out = torch.randn(logits.shape[0], *logits.shape[2:], device="cuda")
    got = _ProbabilitySum.apply(logits)
    (g_got,) = torch.autograd.grad(got, logits, grad_out)
    want = torch.softmax(logits.float(), dim=-1).sum(1)
    (g_want,) = torch.autograd.grad(want, logits, grad_out)
    assert g_got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_got.float(), g_want.float(), rtol=2**-7, atol=1e-5)
    assert torch.equal(_ProbabilitySum.apply(logits), got)  # reproducible: no atomics


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D,n_rot", [(128, 64), (82, 40)])
def test_fused_rope_matches_reference(dtype, D, n_rot):
    from moeut.ops.rope import rope_tables, rotate, rotate_reference

    torch.manual_seed(3)
    B, T, H = 4, 1000, 4
    x = torch.randn(B, T, H, D, device="cuda").to(dtype).transpose(1, 2).requires_grad_()
    cos, sin = rope_tables(n_rot, 17, T, 10000.0, "cuda")
    arriving = []
    x.register_hook(lambda grad: arriving.append(grad))  # the gradient as RoPE's backward wrote it
    y = rotate(x, cos, sin, 0.3)
    ref_x = x.detach().clone().requires_grad_()
    ref = rotate_reference(ref_x, cos, sin, 0.3)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y, ref, **tol)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, ref_x.grad, **tol)
    # in x's layout (a head view of [B, T, H * D]): reshapes and the view's backward copy nothing
    assert y.transpose(1, 2).is_contiguous() and arriving[0].transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("D", [1024, 1536, 82, 4096])
def test_layer_norm_kernels_match_torch(D, autocast, x_dtype):
    """moeut's LayerNorm against torch's as a model uses it: under bf16 autocast its output is the
    bf16 copy of torch's fp32 result (rounded once), the gradients agree to fp32 rounding, and the
    weight gradient is the same bits when the backward runs again."""
    from moeut.ops.norm import LayerNorm

    torch.manual_seed(D)
    ours = LayerNorm(D).cuda().to(x_dtype)
    with torch.no_grad():
        ours.weight.normal_(1, 0.2)
        ours.bias.normal_(0, 0.2)
    theirs = torch.nn.LayerNorm(D).cuda().to(x_dtype)
    theirs.load_state_dict(ours.state_dict())
    x = (3 + 2 * torch.randn(4, 1001, D, device="cuda")).to(x_dtype).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
        y, ref = ours(x), theirs(xr)
    out_dtype = torch.bfloat16 if autocast else x_dtype
    assert y.dtype == out_dtype and ref.to(out_dtype).dtype == out_dtype
    ref = ref.to(out_dtype)  # the copy autocast's next matmul makes
    if out_dtype == torch.bfloat16:
        assert (y == ref).float().mean() > 0.99  # the same rounding but where fp32 sums differ in order
        torch.testing.assert_close(y.float(), ref.float(), rtol=2**-7, atol=1e-6)
    else:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    tol = dict(rtol=1e-4, atol=1e-4) if x_dtype == torch.float32 else dict(rtol=2**-7, atol=1e-2)
    torch.testing.assert_close(x.grad, xr.grad, **tol)
    for a, b in ((ours.weight, theirs.weight), (ours.bias, theirs.bias)):  # bf16 parameters: 1 ulp
        scale = b.grad.float().abs().max().item()
        torch.testing.assert_close(
            a.grad.float(), b.grad.float(), rtol=1e-3 if x_dtype == torch.float32 else 2**-7, atol=1e-4 * scale
        )
    first = ours.weight.grad.clone()
    ours.weight.grad = None
    with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
        ours(x).backward(g)
    assert torch.equal(ours.weight.grad, first)


def test_layer_norm_pass_through_matches_autograd_sum():
    """x's gradient through normalize_and_pass's second output is added inside the LayerNorm backward:
    the same as autograd adding x's two gradients (bf16 autocast, the 244M width)."""
    from moeut.ops.norm import LayerNorm

    torch.manual_seed(5)
    norm = LayerNorm(1024).cuda()
    x = torch.randn(8, 1000, 1024, device="cuda", requires_grad=True)
    proj = torch.randn(1024, 1024, device="cuda") / 32
    gy = torch.randn(8, 1000, 1024, device="cuda")

    def grads(pass_through):
        with torch.autocast("cuda", torch.bfloat16):
            y, x_out = norm.normalize_and_pass(x) if pass_through else (norm(x), x)
            loss = (y.float() * gy).sum() + (x_out @ proj).float().square().sum()
        return torch.autograd.grad(loss, (x, norm.weight, norm.bias))

    for got, want in zip(grads(True), grads(False)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("D", [1024, 1536, 412])
def test_layer_norm_copies_are_the_casts_bits(D):
    """The LayerNorm kernels' bf16 copies of x (forward) and dx (backward) for `cast_relay`: the same bits
    as x.to(bf16) and dx.to(bf16) (round to nearest even), the other outputs unchanged."""
    from moeut.kernels import norm as triton_norm

    torch.manual_seed(D)
    x = 3 + 2 * torch.randn(4097, D, device="cuda")
    w, b = 1 + 0.2 * torch.randn(D, device="cuda"), 0.2 * torch.randn(D, device="cuda")
    gy, add = torch.randn(4097, D, device="cuda").bfloat16(), torch.randn(4097, D, device="cuda")
    y, mean, rstd, x_copy = triton_norm.layer_norm_fwd(x, w, b, 1e-5, torch.bfloat16, copy_dtype=torch.bfloat16)
    assert torch.equal(x_copy, x.bfloat16())
    assert torch.equal(y, triton_norm.layer_norm_fwd(x, w, b, 1e-5, torch.bfloat16)[0])
    dx, dw, db, dx_copy = triton_norm.layer_norm_bwd(gy, x, w, mean, rstd, grad_add=add, copy_dtype=torch.bfloat16)
    assert torch.equal(dx_copy, dx.bfloat16())
    assert torch.equal(dx, triton_norm.layer_norm_bwd(gy, x, w, mean, rstd, grad_add=add)[0])


@pytest.mark.parametrize("R,K,E", [(1, 16, 387), (32, 16, 387), (32, 24, 565), (128, 8, 40), (3, 2, 1)])
def test_small_route_kernel_matches_sort(R, K, E, monkeypatch):
    """Decoding's one-kernel routing equals the torch sort path exactly."""
    from moeut.ops.expert_mm import route

    torch.manual_seed(R + E)
    expert = torch.randint(0, E, (R, K), device="cuda")
    got = route(expert, E)
    monkeypatch.setattr(settings, "pytorch_ops", frozenset({"route"}))
    want = route(expert, E)
    for a, b in zip(
        (got.offsets_E1, got.rows_N, got.slot_N, got.choice_RK),
        (want.offsets_E1, want.rows_N, want.slot_N, want.choice_RK),
    ):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("R", [1, 32])
@pytest.mark.parametrize("layout", ["ffn_up", "ffn_down", "value", "output"])
def test_expert_gemv_kernel_matches_reference(dtype, tol, R, layout):
    """Decoding's per-choice expert projection at the 244M shapes (batch 1 and 32)."""
    from moeut.ops.expert_gemv import expert_gemv_reference
    from moeut.kernels.expert_gemv import expert_gemv_triton

    torch.manual_seed(R)
    D, S, E, K, H, EH, KH, Dh = 1024, 128, 387, 16, 4, 10, 2, 128
    heads = dict(head_k=KH, n_heads=H, head_experts=EH)
    shapes = {
        "ffn_up": ((R, D), (E, D, S), R * K, False, dict(per_x=K, per_out=1, relu=True)),
        "ffn_down": ((R * K, S), (E, S, D), R * K, True, dict(per_x=1, per_out=K)),
        "value": ((R, D), (H * EH, D, Dh), R * H * KH, True, dict(per_x=H * KH, per_out=KH, **heads)),
        "output": ((R * H, Dh), (H * EH, Dh, D), R * H * KH, True, dict(per_x=KH, per_out=H * KH, **heads)),
    }
    x_shape, w_shape, C, gated, kw = shapes[layout]
    n_experts = EH if "head_k" in kw else E
    x = torch.randn(x_shape, device="cuda", dtype=dtype)
    w = torch.randn(w_shape, device="cuda", dtype=dtype) / x_shape[1] ** 0.5
    expert = torch.randint(0, n_experts, (C,), device="cuda")
    gate = torch.rand(C, device="cuda") if gated else None
    got = expert_gemv_triton(x, w, expert, gate, **{"head_k": 1, "n_heads": 1, "head_experts": 0, "relu": False, **kw})
    want = expert_gemv_reference(x.double(), w.double(), expert, gate, **kw)
    assert rel(got.double(), want) < tol
