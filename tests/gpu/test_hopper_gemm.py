"""quack's Hopper GEMM behind `moeut::grouped_mm` (`kernels/hopper_gemm.py`) against the reference and the
Triton kernel: values, empty experts and no rows at all, determinism, CUDA-graph replay, and the σ-MoE
MLP's gradients with it on and off. Runs on an sm90 GPU with `moeut[hopper]` installed; skipped
elsewhere (the selection logic is tested on every machine in tests/unit/test_hopper_gemm.py)."""
import pytest
import torch

if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
    pytest.skip("needs an sm90 GPU", allow_module_level=True)

from moeut.kernels import hopper_gemm  # noqa: E402
from moeut.kernels.expert_mm import grouped_mm_triton  # noqa: E402
from moeut.ops.expert_mm import route  # noqa: E402
from moeut.ops.grouped_mm import grouped_mm_reference  # noqa: E402
from moeut.settings import settings  # noqa: E402
from tests.helpers import rel  # noqa: E402

if hopper_gemm._quack_interface() is None:
    pytest.skip("quack (moeut[hopper]) is not installed", allow_module_level=True)


def down_dx_operands(T=2048, D=1024, S=128, E=32, K=4, used_experts=None, seed=0):
    """dy [T, D], W2^T as the transposed view the FFN backward passes ([E, D, S]), the routing (all
    experts, or only the first `used_experts`: the others get no row)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dy = torch.randn(T, D, device="cuda", generator=g).bfloat16()
    w2 = (torch.randn(E, S, D, device="cuda", generator=g) / S ** 0.5).bfloat16()
    n = used_experts or E
    expert = torch.rand(T, n, device="cuda", generator=g).topk(K, dim=-1).indices
    r = route(expert, E)
    return dy, w2.transpose(1, 2), r.offsets_E1, r.rows_N


@pytest.mark.parametrize("shape", [dict(), dict(D=1536, E=48, T=1024, K=8), dict(used_experts=10)])
def test_gathered_product_matches_the_reference_as_closely_as_triton(shape):
    dy, w, offsets, rows = down_dx_operands(**shape)
    assert hopper_gemm.handles(dy, w, rows, None, None, False)
    want = grouped_mm_reference(dy.float(), w.float(), offsets, rows)
    got = hopper_gemm.gather_mm_hopper(dy, w, offsets, rows)
    triton = grouped_mm_triton(dy, w, offsets, rows, None, None, False, False)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert rel(got, want) < 5e-3 and rel(got, want) <= 1.5 * rel(triton, want) + 1e-4


def test_no_rows_and_determinism():
    dy, w, offsets, rows = down_dx_operands()
    empty = hopper_gemm.gather_mm_hopper(dy, w, torch.zeros_like(offsets), rows[:0])
    assert empty.shape == (0, w.shape[2])
    a = hopper_gemm.gather_mm_hopper(dy, w, offsets, rows)
    b = hopper_gemm.gather_mm_hopper(dy, w, offsets, rows)
    assert torch.equal(a, b)


def test_replays_from_a_cuda_graph_with_new_inputs():
    dy, w, offsets, rows = down_dx_operands()
    hopper_gemm.gather_mm_hopper(dy, w, offsets, rows)   # compiled before the capture, as the trainer's warm-up does
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        out = hopper_gemm.gather_mm_hopper(dy, w, offsets, rows)
    torch.cuda.current_stream().wait_stream(stream)
    dy2, _, offsets2, rows2 = down_dx_operands(used_experts=10, seed=1)
    dy.copy_(dy2)
    offsets.copy_(offsets2)
    rows.copy_(rows2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, hopper_gemm.gather_mm_hopper(dy, w, offsets, rows))


def test_expert_mlp_gradients_with_and_without_quack(monkeypatch):
    """The FFN's down-projection input gradient is the pass quack takes: forward unchanged, every
    gradient within bf16 rounding of the Triton-only run."""
    from moeut.ops.expert_mlp import expert_mlp
    torch.manual_seed(0)
    R, D, S, E, K = 1024, 1024, 128, 32, 4
    x = torch.randn(R, D, device="cuda", requires_grad=True)
    w1 = (torch.randn(E, D, S, device="cuda") / D ** 0.5).requires_grad_()
    w2 = (torch.randn(E, S, D, device="cuda") / S ** 0.5).requires_grad_()
    scores = torch.randn(R, E, device="cuda")
    gate, expert = scores.sigmoid().topk(K, dim=-1)
    gate.requires_grad_()
    grad_out = torch.randn(R, D, device="cuda")
    calls = []
    kernel = hopper_gemm.gather_mm_hopper
    monkeypatch.setattr(hopper_gemm, "gather_mm_hopper", lambda *a: calls.append(1) or kernel(*a))
    results = []
    for on in (True, False):
        monkeypatch.setattr(settings, "hopper_gemm", on)
        for t in (x, w1, w2, gate):
            t.grad = None
        with torch.autocast("cuda", torch.bfloat16):
            out = expert_mlp(x, w1, w2, route(expert, E), gate)
        out.backward(grad_out)
        results.append((out.detach(), x.grad, w1.grad, w2.grad, gate.grad))
    assert len(calls) == 1   # the down projection's input gradient, in the run with quack on
    (out_q, *grads_q), (out_t, *grads_t) = results
    assert torch.equal(out_q, out_t)
    for name, a, b in zip(("x", "w1", "w2", "gate"), grads_q, grads_t):
        assert rel(a, b) < 1e-2, name
