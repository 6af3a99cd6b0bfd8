"""Before a device call's benchmarks: check each fused GPU path once against its reference and print
`export MOEUT_PYTORCH_OPS=...` naming those that fail or raise, so the rest of the call still measures something
(`eval "$(python3 benchmarks/gpu_smoke.py)"`). Messages go to stderr; the GPU tests give the detail.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def router():
    from moeut.ops.router import sigmoid_topk, sigmoid_topk_reference
    x = torch.randn(4096, 387, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gate, expert = sigmoid_topk(x, 16)
    torch.testing.assert_close(gate, sigmoid_topk_reference(x, 16)[0], rtol=2 ** -8, atol=0)
    g = torch.randn_like(gate)
    (grad,) = torch.autograd.grad(gate, x, g)   # the PyTorch form (selection alone)
    s = gate.float()
    want = torch.zeros_like(x).scatter_(1, expert, (g.float() * ((1 - s) * s)).to(x.dtype))
    torch.testing.assert_close(grad, want, rtol=2 ** -8, atol=0)


def rope():
    from moeut.ops.rope import rope_tables, rotate, rotate_reference
    x = torch.randn(2, 100, 4, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    cos, sin = rope_tables(64, 0, 100, 10000.0, "cuda")
    torch.testing.assert_close(rotate(x, cos, sin), rotate_reference(x, cos, sin), rtol=1e-2, atol=1e-2)


def loop_n():
    from moeut.kernels import expert_mm as triton_expert_mm
    from moeut.ops.expert_mm import route
    from moeut.ops.grouped_mm import grouped_mm_reference
    from moeut.kernels.expert_mm import grouped_mm_triton
    r = route(torch.randint(0, 50, (2048, 4), device="cuda"), 50)
    h = torch.randn(2048 * 4, 128, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(50, 128, 1024, device="cuda", dtype=torch.bfloat16) / 11
    rule, triton_expert_mm.use_loop_n = triton_expert_mm.use_loop_n, lambda I, O, N, E: I <= 128
    got = grouped_mm_triton(h, w, r.offsets_E1, None, None, r.slot_N)
    # with the epilogue row dot and the gated input rows (the value projection's backward, RESULTS Q.1)
    gate, dot_x = torch.rand(2048 * 4, device="cuda"), torch.randn(2048 * 4, 1024, device="cuda", dtype=torch.bfloat16)
    rows = torch.arange(2048 * 4, device="cuda")
    _, dot, gated = grouped_mm_triton(h, w, r.offsets_E1, None, gate, r.slot_N, True, dot_x_MO=dot_x,
                                      dot_rows_N=rows, gate_x=True)
    triton_expert_mm.use_loop_n = rule
    plain = grouped_mm_reference(h.float(), w.float(), r.offsets_E1, None)
    want = torch.empty_like(got).index_copy_(0, r.slot_N, plain.to(got.dtype))
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dot, (plain * dot_x.float()).sum(-1), rtol=2e-2, atol=1.0)
    torch.testing.assert_close(gated, (h.float() * gate[r.slot_N, None]).to(h.dtype), rtol=0, atol=0)


def row_dot():
    from moeut.kernels.expert_mm import row_dot_triton
    a = torch.randn(5000, 128, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(700, 128, device="cuda", dtype=torch.bfloat16)
    rows = torch.randint(0, 700, (5000,), device="cuda")
    s = torch.rand(5000, device="cuda")
    dot, scaled, gated = row_dot_triton(a, b, rows, s, gate_b=True)
    torch.testing.assert_close(dot, (a.float() * b[rows].float()).sum(-1), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(scaled, (a.float() * s[:, None]).to(a.dtype), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gated, (b[rows].float() * s[:, None]).to(b.dtype), rtol=0, atol=0)


def route_small():
    from moeut.ops.expert_mm import route
    from moeut.kernels.route import route_small_triton
    expert = torch.randint(0, 387, (32, 16), device="cuda")
    from moeut.settings import settings
    settings.pytorch_ops = frozenset({"route"})
    want = route(expert, 387)
    settings.pytorch_ops = frozenset()
    got = route_small_triton(expert, 387)
    for a, b in zip(got, (want.offsets_E1, want.rows_N, want.slot_N, want.choice_RK)):
        assert torch.equal(a, b), "route_small differs from the torch sort path"


def expert_gemv():
    from moeut.ops.expert_gemv import expert_gemv_reference
    from moeut.kernels.expert_gemv import expert_gemv_triton
    x = torch.randn(32 * 16, 128, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(387, 128, 1024, device="cuda", dtype=torch.bfloat16) / 11
    expert = torch.randint(0, 387, (32 * 16,), device="cuda")
    gate = torch.rand(32 * 16, device="cuda")
    got = expert_gemv_triton(x, w, expert, gate, 1, 16, 1, 1, 0, False)
    torch.testing.assert_close(got, expert_gemv_reference(x, w, expert, gate, 1, 16), rtol=2e-2, atol=2e-2)


def sum_choices():
    from moeut.kernels.sum_choices import sum_choices_triton
    y = torch.randn(4096 * 16, 1024, device="cuda", dtype=torch.bfloat16)
    got = sum_choices_triton(y, 4096, torch.float32)
    torch.testing.assert_close(got, y.view(4096, 16, 1024).sum(1, dtype=torch.float32), rtol=1e-5, atol=1e-4)


def entropy():
    from moeut.kernels.entropy import prob_sum_backward_triton, prob_sum_triton
    x = (3 * torch.randn(16, 1024, 387, device="cuda")).to(torch.bfloat16)
    g = torch.randn(16, 387, device="cuda")
    p = torch.softmax(x.float(), -1)
    torch.testing.assert_close(prob_sum_triton(x), p.sum(1), rtol=1e-5, atol=1e-4)
    want = (p * (g[:, None] - (p * g[:, None]).sum(-1, keepdim=True))).to(x.dtype)
    torch.testing.assert_close(prob_sum_backward_triton(g, x), want, rtol=2 ** -7, atol=1e-5)


def router_joint_gradient():
    from moeut.ops.router import select_with_prob_sum, sigmoid_topk
    wide = (3 * torch.randn(8, 1024, 392, device="cuda")).to(torch.bfloat16).requires_grad_()
    gate, expert, p_sum = select_with_prob_sum(wide, 16, n_valid=387)
    g = torch.randn_like(gate)
    (got,) = torch.autograd.grad((gate * g).sum() + p_sum.sum(), wide)
    want_gate, _ = sigmoid_topk(wide[..., :387], 16)
    want_sum = torch.softmax(wide[..., :387].float(), -1).sum(1)
    (want,) = torch.autograd.grad((want_gate * g).sum() + want_sum.sum(), wide)
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-5)


def layer_norm():
    import torch.nn.functional as F
    from moeut.ops.norm import layer_norm as fused
    x = torch.randn(4096, 1024, device="cuda", requires_grad=True)
    w = torch.randn(1024, device="cuda", requires_grad=True)
    b = torch.randn(1024, device="cuda", requires_grad=True)
    g = torch.randn(4096, 1024, device="cuda")
    got = torch.autograd.grad(fused(x, w, b), (x, w, b), g)
    want = torch.autograd.grad(F.layer_norm(x, (1024,), w, b), (x, w, b), g)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-3)


def norm_copies():
    from moeut.kernels import norm as triton_norm
    x, w = torch.randn(4096, 1024, device="cuda"), torch.randn(1024, device="cuda")
    _, mean, rstd, x_copy = triton_norm.layer_norm_fwd(x, w, w, 1e-5, torch.bfloat16, copy_dtype=torch.bfloat16)
    dx, _, _, dx_copy = triton_norm.layer_norm_bwd(torch.randn_like(x).bfloat16(), x, w, mean, rstd,
                                                   copy_dtype=torch.bfloat16)
    assert torch.equal(x_copy, x.bfloat16()) and torch.equal(dx_copy, dx.bfloat16())


# (name, check, the operator's name in MOEUT_PYTORCH_OPS, or None: a path with no way around it, reported)
CHECKS = (("expert gemv (decoding)", expert_gemv, "expert_gemv"),
          ("top-k sum", sum_choices, "topk_sum"),
          ("small-input routing", route_small, "route"),
          ("row dot", row_dot, "row_dot"),
          ("fused router", router, "router"),
          ("fused RoPE", rope, "rope"),
          ("entropy regulariser's softmax sums", entropy, "entropy"),
          ("loop-over-N grouped GEMM", loop_n, None),
          ("LayerNorm", layer_norm, "norm"),
          ("LayerNorm's bf16 copies for the expert projections", norm_copies, "norm"),
          ("router's joint gradient", router_joint_gradient, "entropy"))
pytorch_ops = []
for name, check, off in CHECKS:
    try:
        check()
        torch.cuda.synchronize()
        print(f"smoke: {name} OK", file=sys.stderr)
    except Exception as e:  # report and, where it can be, turn it off for the rest of the call
        what = f"MOEUT_PYTORCH_OPS+={off} for this call" if off else "no way around it: the tests will say more"
        print(f"smoke: {name} FAILED ({type(e).__name__}: {str(e)[:300]}); {what}", file=sys.stderr)
        if off:
            pytorch_ops.append(off)
if pytorch_ops:
    print(f"export MOEUT_PYTORCH_OPS={','.join(pytorch_ops)}")
