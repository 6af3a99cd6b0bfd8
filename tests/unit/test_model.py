"""The model: official API, exact computation, KV cache, masks, configuration and input checks."""

import inspect

import pytest
import torch
import torch.nn.functional as F

import moeut
from moeut import AttentionMask, MoEUT, MoEUTLM, profiles
from moeut.ops import shared_weights
from moeut.router import selection_entropy_loss
from tests.helpers import shared_and_per_application_grads


def small(**over):
    cfg = dict(
        d_model=32,
        n_layers=4,
        n_heads=2,
        ff_n_experts=8,
        att_n_experts=3,
        d_head=12,
        ff_k=2,
        group_size=2,
        ff_expert_size=8,
    )
    cfg.update(over)
    return cfg


def test_public_api_and_signatures_match_official():
    for name in [
        "MoEUTLM",
        "MoEUT",
        "AttentionMask",
        "MoEUTOutput",
        "KVCache",
        "MultilayerKVCache",
        "SwitchHeadRope",
        "profiles",
    ]:
        assert hasattr(moeut, name), name
    sig = inspect.signature(MoEUTLM.__init__).parameters
    params = [k for k, v in sig.items() if v.kind != inspect.Parameter.KEYWORD_ONLY]
    # ours, after the official ones and keyword-only: the paper's ablation axes, defaulting to the paper's model
    assert {k: v.default for k, v in sig.items() if v.kind == inspect.Parameter.KEYWORD_ONLY} == {
        "group_type": "abab",
        "layer_norm": "peri",
        "router_activation": "sigmoid",
    }
    assert params == [
        "self",
        "n_tokens",
        "d_model",
        "n_layers",
        "n_heads",
        "ff_n_experts",
        "att_n_experts",
        "d_head",
        "group_size",
        "ff_k",
        "att_k",
        "ff_expert_dropout",
        "att_expert_dropout",
        "ff_expert_size",
        "dropout",
        "entropy_reg",
        "att_entropy_reg",
        "attention",
    ]
    defaults = {k: v.default for k, v in inspect.signature(MoEUTLM.__init__).parameters.items()}
    assert defaults["group_size"] == 2 and defaults["ff_k"] == 8 and defaults["att_k"] == 2
    assert (
        defaults["ff_expert_size"] == 128 and defaults["entropy_reg"] == 0.01 and defaults["att_entropy_reg"] == 0.001
    )
    assert defaults["attention"] is moeut.SwitchHeadRope
    assert list(inspect.signature(MoEUTLM.forward).parameters) == ["self", "x", "mask", "kv_cache"]
    assert list(inspect.signature(MoEUT.__init__).parameters)[1:6] == [
        "d_model",
        "n_layers",
        "n_heads",
        "ff_expert_size",
        "ff_n_experts",
    ]
    import profiles as root_profiles  # the official example does `import profiles`

    assert root_profiles.MoEUT_244M == profiles.MoEUT_244M


def test_state_dict_names_and_shapes_are_the_official_ones():
    m = MoEUTLM(50, **small())
    sd = m.state_dict()
    H, E, D, Dh = 2, 3, 32, 12
    expected = {
        "embedding.weight": (50, D),
        "lm_head.weight": (50, D),
        "lm_head.bias": (50,),
        "out_norm.weight": (D,),
        "out_norm.bias": (D,),
    }
    for i in range(2):
        p = f"transformer.layers.{i}."
        expected.update(
            {
                p + "attention.q.weight": (H * Dh, D),
                p + "attention.k.weight": (H * Dh, D),
                p + "attention.v": (H * E, D, Dh),
                p + "attention.o": (H * E, Dh, D),
                p + "attention.sel_v": (H * E, D),
                p + "attention.sel_o": (H * E, D),
                p + "ffn.keys": (8, D, 8),
                p + "ffn.values": (8, 8, D),
                p + "ffn.expert_sel": (8, D),
                p + "ln1.weight": (D,),
                p + "ln1.bias": (D,),
                p + "ln2.weight": (D,),
                p + "ln2.bias": (D,),
            }
        )
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    m2 = MoEUTLM(50, **small())
    m2.load_state_dict(sd, strict=True)


@pytest.mark.parametrize(
    "name,count", [("44M", 44.3), ("126M", 125.7), ("244M", 243.3), ("318M", 318.1), ("727M", 727.4), ("1B", 1040.3)]
)
def test_profiles_construct_with_paper_parameter_counts(name, count):
    with torch.device("meta"):
        m = MoEUTLM(8000, **profiles.MOEUT_PROFILES[name])
    assert round(sum(p.numel() for p in m.parameters()) / 1e6, 1) == count


def test_44M_profile_runs_despite_odd_rotary_width():
    torch.manual_seed(0)
    m = MoEUTLM(100, **{**profiles.MoEUT_44M, "n_layers": 2, "ff_n_experts": 16})
    assert m.transformer.layers[0].attention.n_rotate == 40  # 41 rounded down to pairs
    assert m(torch.randint(0, 100, (1, 9))).outputs.shape == (1, 9, 100)


@pytest.mark.parametrize("cfg", [small(), small(att_n_experts=1), small(d_head=9), small(d_head=18, n_heads=3)])
@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_kv_cache_decoding_equals_full_forward(cfg, chunk):
    torch.manual_seed(chunk)
    m = MoEUTLM(60, **cfg).eval()
    x = torch.randint(0, 60, (3, 17))
    with torch.no_grad():
        full = m(x).outputs
        cache, outs = {}, []
        for t in range(0, 17, chunk):
            o = m(x[:, t : t + chunk], kv_cache=cache)
            cache = o.cache
            outs.append(o.outputs)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-5)
    assert set(cache) == set(range(4)) and cache[0]["k"].shape[-2] == 17


def separate_projections(monkeypatch, separate: bool = True) -> None:
    """SwitchHead's joint Q/K/selector product replaced by its definition, four separate products
    (`separate=False` restores the joint one): the reference the joint projection is tested against."""
    from moeut.attention import SwitchHeadRope

    if not hasattr(separate_projections, "joint"):
        separate_projections.joint = SwitchHeadRope._project_joint
    if not separate:
        monkeypatch.setattr(SwitchHeadRope, "_project_joint", separate_projections.joint)
        return
    monkeypatch.setattr(
        SwitchHeadRope,
        "_project_joint",
        lambda self, x: (
            self.q(x),
            self.k(x),
            F.linear(x, self.sel_v) if self.n_experts > 1 else None,
            F.linear(x, self.sel_o),
        ),
    )


@pytest.mark.parametrize("cfg", [small(), small(att_n_experts=1), small(d_head=9)])
def test_inference_projection_equals_training_path_and_follows_weight_updates(cfg, monkeypatch):
    """Without gradients SwitchHead computes Q, K and both selectors in one matmul on a kept
    concatenated weight and rotates q and k in one call; outputs (and the routers' logits) equal the
    separate projections of the gradient-enabled path, also after the weights change in place (through
    an optimizer-like update or through `.data`, which no version counter sees)."""
    torch.manual_seed(1)
    m = MoEUTLM(50, **cfg).eval()
    x = torch.randint(0, 50, (2, 11))
    att = m.transformer.layers[0].attention
    import moeut.attention.cache as attention

    calls = []
    monkeypatch.setattr(attention, "rotate", lambda x, *a: calls.append(x.shape[1]) or real_rotate(x, *a))
    real_rotate = moeut.ops.rope.rotate
    for _ in range(2):
        calls.clear()
        with torch.no_grad():
            fast = m(x).outputs
        assert calls == [2 * cfg["n_heads"]] * cfg["n_layers"]  # q and k rotated in one call per layer
        separate_projections(monkeypatch)
        ref = m(x).outputs  # the four separate projections
        separate_projections(monkeypatch, separate=False)
        torch.testing.assert_close(fast, ref.detach(), rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            for p in (att.q.weight, att.k.weight):
                p.add_(0.5 * torch.randn_like(p))
        att.sel_o.data.mul_(-2.0)
    # inside `frozen_inference_weights` the concatenation is made once on entry, and again on the
    # next entry after any update
    from moeut.attention import frozen_inference_weights

    for _ in range(2):
        with torch.no_grad(), frozen_inference_weights(m):
            frozen = m(x).outputs
            assert att._inference_weight_frozen
        assert not att._inference_weight_frozen
        torch.testing.assert_close(frozen, m(x).outputs.detach(), rtol=1e-5, atol=1e-5)
        att.sel_o.data.mul_(-2.0)
    q_src = torch.randn(2, 5, cfg["d_model"])
    with torch.no_grad():
        q, k, sel_v, sel_o = att._project_joint(q_src)
    torch.testing.assert_close(q, att.q(q_src).detach())
    torch.testing.assert_close(k, att.k(q_src).detach())
    torch.testing.assert_close(sel_o, F.linear(q_src, att.sel_o).detach())
    assert (sel_v is None) == (cfg["att_n_experts"] == 1)


@pytest.mark.parametrize("att_n_experts", [1, 3])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("T", [13, 520])  # 1040 rows: the joint width is padded to a multiple of 8
def test_joint_projection_trains_like_four_matmuls(monkeypatch, att_n_experts, autocast, T):
    """Training with Q, K and both selectors as one matmul on their concatenated weights: the same
    loss and gradients (every parameter, the input embedding) as the four separate matmuls, fp32
    exactly up to summation order, bf16 autocast within its rounding."""
    torch.manual_seed(2)
    m = MoEUTLM(50, **small(att_n_experts=att_n_experts))
    x = torch.randint(0, 50, (2, T))
    width = sum(p.shape[0] for p in m.transformer.layers[0].attention._inference_parts())
    assert width % 8  # misaligned: with 1040 rows the joint weight is zero-padded for the product

    def loss_and_grads(joint):
        separate_projections(monkeypatch, separate=not joint)
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out = m(x)
            loss = out.outputs.float().logsumexp(-1).mean() + out.reg_loss.sum()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    loss_joint, g_joint = loss_and_grads(True)
    loss_sep, g_sep = loss_and_grads(False)
    assert g_joint.keys() == g_sep.keys() and any(".q." in n for n in g_joint)
    tol = 2e-2 if autocast else 1e-5  # relative (norm) error; bf16 rounds at 4e-3
    torch.testing.assert_close(loss_joint, loss_sep, rtol=tol, atol=0)
    for n in g_sep:
        err = ((g_joint[n] - g_sep[n]).norm() / g_sep[n].norm().clamp_min(1e-30)).item()
        assert err < tol, f"{n}: relative gradient error {err:.2e}"


def test_no_cache_returned_unless_asked():
    m = MoEUTLM(20, **small()).eval()
    assert m(torch.randint(0, 20, (1, 4))).cache is None


def test_attention_mask_none_none_disables_masking():
    torch.manual_seed(0)
    m = MoEUTLM(40, **small()).eval()
    x = torch.randint(0, 40, (2, 8))
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % 40
    with torch.no_grad():
        causal_a, causal_b = m(x).outputs, m(x2).outputs
        open_a, open_b = m(x, AttentionMask(None, None)).outputs, m(x2, AttentionMask(None, None)).outputs
    # the future is invisible (up to float rounding: the batch's GEMMs may sum in another order)...
    torch.testing.assert_close(causal_a[:, :-1], causal_b[:, :-1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(open_a[:, 0], open_b[:, 0], atol=1e-6)  # ...unless masking is off
    explicit = AttentionMask(None, m.generate_causal_attention_mask(8))
    with torch.no_grad():
        torch.testing.assert_close(m(x, explicit).outputs, causal_a)


def test_left_padding_with_src_length_mask_matches_unpadded():
    torch.manual_seed(0)
    m = MoEUTLM(40, **small()).eval()
    x = torch.randint(1, 40, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    pad = torch.tensor([[True] * 3 + [False] * 6])
    mask = AttentionMask(pad, m.generate_causal_attention_mask(9))
    with torch.no_grad():
        ref = m(x).outputs
        got = m(padded, mask).outputs
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[:, 3:], ref, rtol=1e-4, atol=1e-5)  # RoPE is relative: shifts don't matter


def test_reg_loss_is_a_scalar_and_zero_in_eval():
    torch.manual_seed(0)
    m = MoEUTLM(30, **small())
    out = m(torch.randint(0, 30, (2, 5)))
    assert out.reg_loss.dim() == 0 and out.reg_loss.item() != 0
    m.eval()
    assert m(torch.randint(0, 30, (2, 5))).reg_loss.item() == 0


def test_selection_entropy_loss_formula():
    logits = torch.randn(3, 5, 7)
    p = logits.softmax(-1).mean(1)  # mean distribution per sequence
    expected = (p * p.log()).sum(-1).mean()  # negative entropy, batch mean
    torch.testing.assert_close(selection_entropy_loss([logits[:, :2], logits[:, 2:]]), expected)


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    m = MoEUTLM(30, **small())
    x = torch.randint(0, 30, (2, 9))
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.transformer.activation_checkpointing = ckpt
        out = m(x)
        (F.cross_entropy(out.outputs.flatten(0, 1), x.flatten()) + out.reg_loss).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_weight_copies_give_the_per_application_gradients(checkpointing, monkeypatch):
    """One bf16 copy per expert weight and forward, with the applications' weight gradients summed
    in place (`ops/shared_weights.py`), computes exactly what casting at every application and letting
    autograd sum did: same outputs, bit-identical fp32 gradients, and every parameter's gradient
    delivered once, as an ordinary `.grad` (what DDP's hooks and clipping see)."""
    torch.manual_seed(0)
    m = MoEUTLM(30, **small(n_layers=6)).train()  # each layer applied 3 times
    m.transformer.activation_checkpointing = checkpointing
    x = torch.randint(0, 30, (2, 9))
    hook_calls = {}
    handles = [
        p.register_post_accumulate_grad_hook(lambda p, n=n: hook_calls.__setitem__(n, hook_calls.get(n, 0) + 1))
        for n, p in m.named_parameters()
    ]
    (out_ref, ref), (out, got) = shared_and_per_application_grads(m, x, monkeypatch)
    for h in handles:
        h.remove()
    assert torch.equal(out, out_ref)
    for n in ref:
        assert got[n].dtype == torch.float32 and torch.equal(got[n], ref[n]), n
    assert hook_calls == {n: 2 for n in ref}  # one gradient per parameter and backward pass
    # gradients accumulate across backward passes (micro-batches) as usual
    with torch.autocast("cpu", torch.bfloat16):
        out2 = m(x)
    (F.cross_entropy(out2.outputs.float().flatten(0, 1), x.flatten()) + out2.reg_loss).backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, 2 * ref[n], rtol=1e-6, atol=1e-9)


def test_shared_weight_copy_with_another_consumer():
    """A shared copy that something other than an expert projection also reads gets both gradients."""
    w = torch.randn(3, 4, 5, requires_grad=True)
    with shared_weights.share_weights(torch.bfloat16):
        copy, sink = shared_weights.shared_operand(w, torch.bfloat16)
        again, _ = shared_weights.shared_operand(w, torch.bfloat16)
        assert again is copy and copy.dtype == torch.bfloat16 and torch.equal(copy, w.detach().bfloat16())
        sink.grad = torch.full((3, 4, 5), 2.0)  # what an expert projection's backward adds
        (copy.float() * 3).sum().backward()  # an ordinary consumer
    assert torch.equal(w.grad, torch.full((3, 4, 5), 5.0))
    assert shared_weights.shared_operand(w, torch.bfloat16) == (None, None)  # scope closed
    with shared_weights.share_weights(torch.bfloat16), torch.no_grad():
        copy, sink = shared_weights.shared_operand(w, torch.bfloat16)
        assert sink is None and not copy.requires_grad


@pytest.mark.parametrize("autocast", [False, True])
def test_compiles_without_graph_breaks(autocast):
    """fullgraph: the whole training forward and backward is one graph, also under bf16 autocast
    (where the expert Functions round fp32 weights and inputs inside)."""
    torch.manual_seed(0)
    m = MoEUTLM(30, **small())
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    x = torch.randint(0, 30, (2, 6))
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = compiled(x)
        ref = m(x)
    (out.outputs.float().mean() + out.reg_loss).backward()
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.outputs.float(), ref.outputs.float(), **tol)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())


def test_moeut_backbone_and_n_layers_grouping():
    torch.manual_seed(0)
    m = MoEUT(32, 6, 2, 8, 8, 3, d_head=12, ff_k=2, group_size=3)
    assert m.n_repeats == 2 and len(m.layers) == 3
    h = torch.randn(2, 5, 32)
    assert m(h).outputs.shape == (2, 5, 32)


@pytest.mark.parametrize(
    "over,word",
    [
        (dict(n_layers=5), "n_layers"),
        (dict(ff_k=9), "ff_k"),
        (dict(att_k=4), "att_k"),
        (dict(d_head=None, d_model=30, n_heads=4), "n_heads"),
        (dict(d_model=0), "d_model"),
        (dict(ff_expert_size=-1), "ff_expert_size"),
        (dict(dropout=1.5), "dropout"),
    ],
)
def test_inconsistent_configuration_is_rejected(over, word):
    with pytest.raises(ValueError, match=word):
        MoEUTLM(10, **small(**over))


def test_bad_inputs_raise_named_errors():
    m = MoEUTLM(10, **small()).eval()
    with pytest.raises(TypeError, match="token"):
        m(torch.rand(1, 4))
    with pytest.raises(ValueError, match="token"):
        m(torch.tensor([[1, 10]]))
    with pytest.raises(ValueError, match="token"):
        m(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="tokens"):
        m(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="mask"):
        m(torch.tensor([[1, 2, 3]]), AttentionMask(torch.zeros(2, 3, dtype=torch.bool), None))
    with pytest.raises(ValueError, match="mask"):
        m(torch.tensor([[1, 2, 3]]), AttentionMask(None, torch.zeros(4, 4, dtype=torch.bool)))
    cache = m(torch.tensor([[1, 2]]), kv_cache={}).cache
    with pytest.raises(ValueError, match="cache"):
        m(torch.tensor([[1], [2]]), kv_cache=cache)
    with pytest.raises(ValueError, match="d_model"):
        m.transformer(torch.randn(1, 3, 7))


def test_dense_baseline_interface_and_cache():
    torch.manual_seed(0)
    d = moeut.DenseLM(40, **profiles.Dense_tiny).eval()
    x = torch.randint(0, 40, (2, 11))
    with torch.no_grad():
        full = d(x)
        assert full.reg_loss.dim() == 0 and full.outputs.shape == (2, 11, 40)
        cache, outs = {}, []
        for t in range(0, 11, 4):
            o = d(x[:, t : t + 4], kv_cache=cache)
            cache = o.cache
            outs.append(o.outputs)
    torch.testing.assert_close(torch.cat(outs, 1), full.outputs, rtol=1e-4, atol=1e-5)


def test_runs_without_triton_installed():
    """Importing and running on a CPU needs neither CUDA nor Triton."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, moeut\n"
        "m = moeut.MoEUTLM(50, **moeut.profiles.MoEUT_tiny)\n"
        "out = m(torch.randint(0, 50, (2, 7)))\n"
        "(out.outputs.mean() + out.reg_loss).backward()\n"
        "assert 'moeut.kernels.expert_mm' not in sys.modules\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.parametrize("share", [True, False], ids=["shared", "per_application"])
def test_no_per_application_weight_copies_saved(share, monkeypatch):
    """Under bf16 autocast a shared layer applied many times must not keep a low-precision copy of
    its expert weights per application (they were 4 GiB of a 244M training step), nor rounded copies
    of inputs that are saved in fp32 anyway: only parameters, needed activations and (shared weights,
    `ops/shared_weights.py`) one bf16 copy of each expert weight for all applications are saved."""
    from moeut.settings import settings

    monkeypatch.setattr(settings, "wgrad_defer", 9 if share else 0)
    torch.manual_seed(0)
    cfg = {**profiles.MoEUT_tiny, "n_layers": 8}  # each of the 2 layers applied 4 times
    m = moeut.MoEUTLM(100, **cfg).train()
    weight_shapes = {tuple(p.shape) for n, p in m.named_parameters() if p.dim() == 3}
    saved, rows_D, weight_copies = [], set(), set()

    def pack(t):
        if not (t.is_leaf and t.requires_grad):
            saved.append(tuple(t.shape))
            if tuple(t.shape) == (32, cfg["d_model"]) and t.dtype == torch.bfloat16:
                rows_D.add(t.untyped_storage().data_ptr())
            if tuple(t.shape) in weight_shapes:
                assert t.dtype == torch.bfloat16
                weight_copies.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", torch.bfloat16):
            out = m(torch.randint(0, 100, (2, 16)))
    n_expert_weights = sum(1 for p in m.parameters() if p.dim() == 3)
    assert len(weight_copies) == (n_expert_weights if share else 0)
    # bf16 [tokens, d_model] copies per application: the normalised attention input once (not once
    # per consumer: Q, K and two routers) and the FFN router's input; +1 for the LM head. The expert
    # projections keep no rounded copy of their fp32 inputs (LayerNorm saves those anyway).
    assert len(rows_D) <= 2 * cfg["n_layers"] + 1
    (out.outputs.float().sum() + out.reg_loss).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("shape", [(2, 7, 5), (3, 4, 2, 6)])
def test_probability_sum_recomputing_backward_matches_autograd(shape):
    """The entropy regulariser's softmax sum saves bf16 logits and recomputes the probabilities in
    backward: the same value and gradient as autograd through the fp32 softmax."""
    from moeut.router import _ProbabilitySum

    logits = (3 * torch.randn(shape)).bfloat16().requires_grad_()
    grad_out = torch.randn(shape[0], *shape[2:])
    got = _ProbabilitySum.apply(logits)
    (g_got,) = torch.autograd.grad(got, logits, grad_out)
    want = F.softmax(logits.float(), dim=-1).sum(1)
    (g_want,) = torch.autograd.grad(want, logits, grad_out)
    assert torch.equal(got, want)
    assert g_got.dtype == torch.bfloat16
    torch.testing.assert_close(g_got.float(), g_want.float(), rtol=1e-2, atol=1e-3)


def test_aligned_matmul_padding_keeps_outputs_and_gradients():
    """MoEUT's router (13 experts here, 387 at 244M) and dense's FFN (d_ff 37 here, 4110 at 244M) pad
    their widths to a multiple of 8 for cuBLAS when there are many rows; the function and the
    parameters' gradients equal those of the same sequences run one at a time (600 rows each: below
    the threshold, unpadded). The loss is the summed token cross-entropy, additive over sequences."""
    from moeut import moe
    from moeut.dense import DenseLM

    torch.manual_seed(0)
    models = [
        MoEUTLM(50, **small(ff_n_experts=13, d_model=24)),
        DenseLM(50, d_model=24, n_layers=2, n_heads=2, d_ff=37),
    ]
    x = torch.randint(0, 50, (2, 600))  # 1200 rows together: over the threshold
    assert 600 < moe.PADDING_MIN_ROWS <= 1200
    for m in models:
        runs = []
        for batches in ([x], [x[:1], x[1:]]):
            m.zero_grad(set_to_none=True)
            outs = []
            for xb in batches:
                out = m(xb).outputs
                F.cross_entropy(out.flatten(0, 1), xb.flatten(), reduction="sum").backward()
                outs.append(out.detach())
            runs.append((torch.cat(outs), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
        torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-5)
        for n in runs[1][1]:
            torch.testing.assert_close(runs[0][1][n], runs[1][1][n], rtol=1e-4, atol=1e-5)
    assert moe.aligned_width_padding(13, torch.zeros(1200, 4)) == 3
    assert moe.aligned_width_padding(16, torch.zeros(1200, 4)) == 0
    assert moe.aligned_width_padding(13, torch.zeros(8, 4)) == 0  # decoding: no copy


def test_dense_frozen_padded_ffn_follows_weight_updates_and_is_released():
    """Inside `frozen_inference_weights` (one `generate` call) the dense FFN reads weights padded to an
    aligned width once on entry: the same logits as the plain path, refreshed in place on the next
    entry (same storage, for kept CUDA graphs), and dropped by `release_decode_graphs`."""
    from moeut.attention import frozen_inference_weights
    from moeut.dense import DenseLM
    from moeut.generate import release_decode_graphs

    torch.manual_seed(0)
    m = DenseLM(40, d_model=16, n_layers=2, n_heads=2, d_ff=37).eval()
    x = torch.randint(0, 40, (2, 5))
    layer = m.layers[0]
    with torch.no_grad():
        want = m(x).outputs
        with frozen_inference_weights(m):
            w1, b1, w2 = layer._inference_weight
            assert w1.shape == (40, 16) and b1.shape == (40,) and w2.shape == (16, 40)
            assert not w1[37:].any() and not b1[37:].any() and not w2[:, 37:].any()
            torch.testing.assert_close(m(x).outputs, want, rtol=1e-5, atol=1e-6)
        assert not layer._inference_weight_frozen
        layer.ff2.weight.data.mul_(2)  # an update no version counter sees
        want2 = m(x).outputs
        with frozen_inference_weights(m):
            assert layer._inference_weight[2] is w2  # refreshed in place
            torch.testing.assert_close(m(x).outputs, want2, rtol=1e-5, atol=1e-6)
    release_decode_graphs(m)
    assert layer._inference_weight is None


def _small_switchhead_layer(seed: int):
    """(layer, x, gy, [x] + parameters): a MoEUTLayer with SwitchHead of 3 experts, initialised at unit
    scale (alone, a layer's experts are not initialised: its model does that), input and output gradient."""
    from moeut.model import MoEUTLayer

    torch.manual_seed(seed)
    layer = MoEUTLayer(32, 2, 8, 6, att_n_experts=3, d_head=8, ff_k=2).train()
    for mod in (layer.attention, layer.ffn):
        mod.reset_parameters(1.0)
    x = torch.randn(2, 7, 32, requires_grad=True)
    return layer, x, torch.randn(2, 7, 32), [x] + list(layer.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_residual_folded_into_the_output_sum_matches_a_separate_add(dtype, monkeypatch):
    """MoEUTLayer adds x + attention inside SwitchHead's output top-k sum (forward; the backward passes
    the gradient through), against the separate add (taken for an attention module that is not
    SwitchHead): outputs and every gradient agree; under bf16 autocast the folded sum skips rounding the attention output to bf16, so
    it is the closer one to fp64. With dropout in training the add stays separate."""
    from moeut.ops import expert_mm
    from moeut.model import MoEUTLayer

    layer, x, gy, params = _small_switchhead_layer(0)
    switchhead = layer.attention

    class NotSwitchHead(torch.nn.Module):  # the same attention, behind a type the layer does not fold for
        def forward_with_logits(self, *a, **kw):
            return switchhead.forward_with_logits(*a, **kw)

    residuals = []
    combine = expert_mm.expert_mm_combine
    from moeut.attention import switchhead as attention_module

    monkeypatch.setattr(
        attention_module,
        "expert_mm_combine",
        lambda *a, residual_XO=None, **kw: (
            residuals.append(residual_XO is not None) or combine(*a, residual_XO=residual_XO, **kw)
        ),
    )

    def run(fold, module=layer):
        module.attention = switchhead if fold else NotSwitchHead()
        residuals.clear()
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = module(x)[0]
        module.attention = switchhead
        folded_here = residuals[-1]  # (V's combine first, O's last)
        return folded_here, (y, *torch.autograd.grad(y, params, gy))

    (on, folded), (off, separate) = run(True), run(False)
    assert on and not off and folded[0].dtype == x.dtype
    for a, b in zip(folded, separate):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2)
    if dtype == torch.bfloat16:
        layer64 = MoEUTLayer(32, 2, 8, 6, att_n_experts=3, d_head=8, ff_k=2).double().train()
        layer64.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
        want = layer64(x.detach().double())[0]
        err = lambda t: (t.double() - want).norm().item()
        assert err(folded[0]) <= err(separate[0])
    layer.drop.p = 0.1  # dropout on the attention output: the add cannot go inside the sum
    assert run(True)[0] is False


@pytest.mark.parametrize("kernels", [False, True], ids=["pytorch", "kernels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_gradient_relayed_into_the_value_projection_matches_autograd_sum(dtype, kernels, monkeypatch):
    """With the attention residual folded into SwitchHead's output sum, x's gradient through the residual
    is summed inside the value projection's backward (`ResidualGradRelay`) instead of by autograd
    (the relay taken away): every gradient agrees, and the backward runs one [R, D] fp32 add
    fewer. "kernels": the Triton kernels, through the interpreter."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from moeut.attention import switchhead as attention_module
    from tests.helpers import switch_kernels

    if kernels:
        pytest.importorskip("triton")
        switch_kernels(monkeypatch, lambda t, switch=None: switch is None)
    layer, x, gy, params = _small_switchhead_layer(1)

    class CountAdds(TorchDispatchMode):  # fp32 adds of x's shape ([B*T, D] or [B, T, D])
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if (
                func.__name__.startswith("add")
                and torch.is_tensor(out)
                and out.dtype == torch.float32
                and out.numel() == x.numel()
            ):
                CountAdds.n += 1
            return out

    relay_class = attention_module.ResidualGradRelay

    def run(relay):
        monkeypatch.setattr(attention_module, "ResidualGradRelay", relay_class if relay else lambda: None)
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = layer(x)[0]
        CountAdds.n = 0
        with CountAdds():
            grads = torch.autograd.grad(y, params, gy)
        return CountAdds.n, (y, *grads)

    (adds_on, on), (adds_off, off) = run(True), run(False)
    assert adds_on == adds_off - 1, (adds_on, adds_off)
    for a, b in zip(on, off):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:  # the same sums in another order
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


def test_residual_grad_relay_refuses_a_gradient_it_was_not_given():
    from moeut.ops.expert_mm import ResidualGradRelay, expert_mm_combine, route

    relay = ResidualGradRelay()
    r = route(torch.randint(0, 3, (4, 2)), 3)
    with pytest.raises(ValueError, match="send_residual_grad needs residual_XO"):
        expert_mm_combine(torch.randn(4, 5), torch.randn(3, 5, 6), r, torch.rand(4, 2), send_residual_grad=relay)
    with pytest.raises(RuntimeError, match="ran before"):
        relay.take()
    g = torch.ones(2)
    relay.put(g)
    assert relay.take() is g
    with pytest.raises(RuntimeError, match="ran before"):
        relay.take()


@pytest.mark.parametrize("model_cls", ["moeut", "dense"])
def test_partial_or_inconsistent_kv_caches_are_refused_by_name(model_cls):
    """A cache holding only some layers would attend to no history in the others (logits silently
    wrong); k and v of different lengths, or junk entries, would attend to a wrong one."""
    from moeut import DenseLM

    torch.manual_seed(0)
    m = (
        MoEUTLM(40, **small()).eval()
        if model_cls == "moeut"
        else DenseLM(40, d_model=32, n_layers=4, n_heads=2, d_ff=64, d_head=16).eval()
    )
    x = torch.randint(0, 40, (1, 5))
    with torch.no_grad():
        full = m(x, kv_cache={}).cache
        partial = {i: full[i] for i in range(m.n_layers - 1)}
        with pytest.raises(ValueError, match=rf"holds {m.n_layers - 1} of this model's {m.n_layers} layers"):
            m(x[:, :1], kv_cache=partial)
        uneven = {i: dict(e) for i, e in full.items()}
        uneven[0]["v"] = uneven[0]["v"][:, :, :-1]
        with pytest.raises(ValueError, match="'k' .* and 'v' .* must"):
            m(x[:, :1], kv_cache=uneven)
        junk = {i: dict(e) for i, e in full.items()}
        junk[1]["position"] = 3
        with pytest.raises(ValueError, match=r"unknown keys \['position'\]"):
            m(x[:, :1], kv_cache=junk)
        with pytest.raises(ValueError, match="must be a dict"):
            m(x[:, :1], kv_cache={0: "k"})
        # the complete cache still decodes as before
        step = m(x[:, :1], kv_cache={i: dict(e) for i, e in full.items()})
        assert step.outputs.shape == (1, 1, 40)
