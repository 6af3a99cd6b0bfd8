"""Generation: the KV-cached path produces exactly the tokens of full recomputation."""

import shutil

import pytest
import torch

import moeut
from moeut.generate import _filter_logits, generate


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return moeut.MoEUTLM(64, **moeut.profiles.MoEUT_tiny).eval()


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [7]]


@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=8, top_p=0.9, seed=5)])
def test_cached_generation_equals_recomputation(model, sampling, cache):
    cached = generate(model, PROMPTS, 15, cache=cache, **sampling)
    full = generate(model, PROMPTS, 15, cache="none", **sampling)
    assert cached == full
    assert all(len(c) == 15 for c in cached)


@pytest.mark.parametrize("overlap", [True, False])
def test_overlapped_step_launch_changes_no_token(model, overlap, monkeypatch):
    """The static path launches step i+1 before reading step i's tokens; with or without that, the
    tokens, their count (1 and 0 new tokens included) and the stop at end of text are unchanged."""
    monkeypatch.setattr(moeut.generate, "OVERLAP_HOST", overlap)
    full = generate(model, PROMPTS, 9, cache="none", temperature=1.0, seed=2)
    assert generate(model, PROMPTS, 9, temperature=1.0, seed=2) == full
    assert generate(model, PROMPTS, 1, temperature=1.0, seed=2) == [t[:1] for t in full]
    assert generate(model, PROMPTS, 0) == [[], [], []]
    eos = full[0][3]
    stopped = generate(model, PROMPTS, 9, temperature=1.0, seed=2, eos_id=eos)
    assert stopped == [t[: t.index(eos)] if eos in t else t for t in full]


def test_kept_step_is_reused_only_while_valid():
    """The static path keeps its step and cache per model: a call of the same batch and cache size
    reuses them (new prompts and padding, stale cache slots masked) and sees weights updated in place,
    a nested call from `on_token` gets its own, a replaced weight or a new shape starts afresh, and
    the kept step neither keeps its model alive nor stops it from being deep-copied."""
    import copy
    import gc
    import weakref
    from moeut import generate as gen_module

    torch.manual_seed(1)
    m = moeut.MoEUTLM(64, **moeut.profiles.MoEUT_tiny).eval()
    first, second = [[1, 2, 3], list(range(5, 15))], [list(range(20, 30)), [9, 8]]  # both: longest 10
    assert generate(m, first, 8) == generate(m, first, 8, cache="none")
    kept = gen_module._KEPT_STEPS[m][1]
    nested = []
    inner = lambda row, t: nested or nested.append(generate(m, first, 8))  # noqa: F821 (m is deleted only at the end)
    assert generate(m, second, 8, on_token=inner) == generate(m, second, 8, cache="none")
    assert nested == [generate(m, first, 8, cache="none")]
    assert gen_module._KEPT_STEPS[m][1] is kept  # the outer call's (reused) step is kept again
    assert generate(m, second, 8) == generate(m, second, 8, cache="none")
    assert gen_module._KEPT_STEPS[m][1] is kept
    att = m.transformer.layers[0].attention
    with torch.no_grad():
        att.q.weight.mul_(3.0)
    att.sel_o.data.mul_(-2.0)  # unseen by version counters
    assert generate(m, second, 8) == generate(m, second, 8, cache="none")
    assert gen_module._KEPT_STEPS[m][1] is kept
    assert torch.equal(att._inference_weight, torch.cat(att._inference_parts()))  # refreshed per call
    att.k.weight.data = att.k.weight.data * 2  # replaced: another address
    assert generate(m, second, 8) == generate(m, second, 8, cache="none")
    assert gen_module._KEPT_STEPS[m][1] is not kept
    assert generate(m, second, 9) == generate(m, second, 9, cache="none")  # another cache size
    assert generate(m, second, 0) == [[], []]
    copy.deepcopy(m)
    gen_module.release_decode_graphs(m)
    assert m not in gen_module._KEPT_STEPS
    generate(m, first, 4)
    ref = weakref.ref(m)
    del m, kept
    gc.collect()
    assert ref() is None


def test_static_cache_logits_match_full_forward():
    """Prefill + steps through a preallocated cache give the logits of one full causal forward."""
    from moeut.attention import new_static_cache

    torch.manual_seed(1)
    for m in (
        moeut.MoEUTLM(64, **moeut.profiles.MoEUT_tiny).eval(),
        moeut.DenseLM(64, **moeut.profiles.Dense_tiny).eval(),
    ):
        x = torch.randint(0, 64, (2, 9))
        full = m(x).outputs
        kv = {i: new_static_cache(12) for i in range(m.n_layers)}
        parts = [m(x[:, :5], kv_cache=kv).outputs] + [m(x[:, t : t + 1], kv_cache=kv).outputs for t in range(5, 9)]
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)
        assert int(kv[0]["pos"]) == 9


@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile on CPU needs a C++ compiler"
)
def test_compiled_decoding_equals_recomputation(model):
    """The torch.compile'd decoding step (one graph, no breaks) gives the tokens of recomputation."""
    assert generate(model, PROMPTS, 6, compile=True) == generate(model, PROMPTS, 6, cache="none")
    # Another output length in the same cache-size bucket reuses the compiled step (no recompilation,
    # which took the whole timed run in the first GPU decode benchmark).
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    assert generate(model, PROMPTS, 9, compile=True) == generate(model, PROMPTS, 9, cache="none")
    assert counters["stats"]["unique_graphs"] == graphs


def test_static_cache_rejects_position_masks_before_writing():
    from moeut.attention import new_static_cache

    m = moeut.MoEUTLM(64, **moeut.profiles.MoEUT_tiny).eval()
    kv = {i: new_static_cache(8) for i in range(m.n_layers)}
    m(torch.randint(0, 64, (1, 3)), kv_cache=kv)
    bad = moeut.AttentionMask(None, torch.zeros(1, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="src_length_mask only"):
        m(torch.randint(0, 64, (1, 1)), bad, kv_cache=kv)
    assert int(kv[0]["pos"]) == 3  # the failed call left the cache as it was


def test_bad_generation_options(model):
    with pytest.raises(ValueError, match="cache"):
        generate(model, PROMPTS, 3, cache="paged")
    with pytest.raises(ValueError, match="cuda_graph"):
        generate(model, PROMPTS, 3, cuda_graph=True)
    with pytest.raises(ValueError, match="compile"):
        generate(model, PROMPTS, 3, cache="dynamic", compile=True)


def test_batched_equals_one_by_one(model):
    batched = generate(model, PROMPTS, 10)
    single = [generate(model, [p], 10)[0] for p in PROMPTS]
    assert batched == single


def test_same_seed_same_text_and_eos_stops(model):
    a = generate(model, PROMPTS, 12, temperature=1.0, seed=3)
    assert a == generate(model, PROMPTS, 12, temperature=1.0, seed=3)
    assert a != generate(model, PROMPTS, 12, temperature=1.0, seed=4)
    greedy = generate(model, [PROMPTS[0]], 12)[0]
    eos = greedy[4]
    stopped = generate(model, [PROMPTS[0]], 12, eos_id=eos)[0]
    assert stopped == greedy[: greedy.index(eos)]


def test_streaming_callback_sees_every_token(model):
    seen = []
    out = generate(model, PROMPTS[:2], 6, on_token=lambda row, t: seen.append((row, t)))
    assert sorted(seen) == sorted((r, t) for r, toks in enumerate(out) for t in toks)


def test_top_k_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(_filter_logits(logits, 2, 1.0))[0].tolist() == [False, False, True, True]
    p = logits.softmax(-1)[0]
    kept = ~torch.isinf(_filter_logits(logits, 0, float(p[0]) + 1e-3))[0]
    assert kept.tolist() == [True, True, False, False]


class _OfficialInterfaceAttention(torch.nn.Module):
    """A user-supplied attention class with only the official interface (no preallocated caches)."""

    def __init__(self, state_size, n_heads, n_experts, projection_size=None, moe_k=2, expert_dropout=0.0):
        super().__init__()
        self.inner = moeut.SwitchHeadRope(
            state_size, n_heads, n_experts, projection_size=projection_size, moe_k=moe_k, expert_dropout=expert_dropout
        )

    def forward(self, q_src, k_src, v_src, mask, kv_cache=None):
        if kv_cache and set(kv_cache) != {"k", "v"}:  # knows only the official growing dict
            raise RuntimeError(f"unknown cache entry {sorted(kv_cache)}")
        return self.inner(q_src, k_src, v_src, mask, kv_cache)


def test_user_attention_class_falls_back_to_the_dict_cache():
    torch.manual_seed(2)
    m = moeut.MoEUTLM(64, **moeut.profiles.MoEUT_tiny, attention=_OfficialInterfaceAttention).eval()
    assert generate(m, PROMPTS, 8) == generate(m, PROMPTS, 8, cache="none")
    with pytest.raises(ValueError, match="preallocated"):
        generate(m, PROMPTS, 8, compile=True)


def test_dense_generation_with_padded_ffn_equals_recomputation():
    """The dense baseline decodes with its FFN padded to an aligned width (prepared once per call)."""
    from moeut.dense import DenseLM

    torch.manual_seed(0)
    dense = DenseLM(64, d_model=32, n_layers=2, n_heads=4, d_ff=37).eval()
    for sampling in (dict(temperature=0.0), dict(temperature=1.0, top_k=8, seed=3)):
        assert generate(dense, PROMPTS, 12, **sampling) == generate(dense, PROMPTS, 12, cache="none", **sampling)
    assert dense.layers[0]._inference_weight[0].shape[0] == 40
