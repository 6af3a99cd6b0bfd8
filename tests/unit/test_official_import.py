"""Importing the paper authors' checkpoints (`moeut import-official`).

The checkpoints here are built in the training code's format (its parameter names and shapes, its
arguments dict, a torch.save file) with random weights, and a forward pass written from the training
code's layers (TransformerLanguageModel, RelativeMoeTransformerEncoderLayer with `moe.nonorm`,
FullMoeRopeAttention, MoE, FastRopeTransformerEncoderLayer, RotaryPosEncoding) is the ground truth the
converted model must reproduce."""
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from moeut.cli import main
from moeut.runs import load_run
from moeut.train.checkpoint import CheckpointError
from moeut.train.official import import_official
from moeut.train.tokenizer import save_tokenizer, train_paper_tokenizer
from tests.unit.test_tokenizer import english_documents

V = 300
MOEUT_ARGS = {"transformer.variant": "preln_moe_universal", "state_size": 48, "transformer.encoder_n_layers": 4,
              "transformer.n_heads": 2, "transformer.head_projection_size": 12, "moe.n_experts": 6,
              "moe.expert_size": 8, "pkm.n_heads": 2, "moe.att.n_experts": 3, "moe.att.k": 2,
              "transformer.universal.group_size": 2, "transformer.universal.group_type": "abab",
              "moe.perplexity_reg": 0.01, "moe.att.perplexity_reg": 0.001, "moe.nonorm": 1, "moe.att.enable": 1,
              "moe.att.q_expert": 0, "moe.att.k_expert": 0, "moe.att.v_expert": 1, "moe.att.o_expert": 1,
              "moe.selection_mode": "sigmoid", "moe.att.selection_mode": "sigmoid", "moe.bias": False,
              "moe.sel_bias": False, "moe.activation_after_topk": False, "moe.att.same_sel": False,
              "moe.att.v_size": None, "transformer.activation": "relu", "rope.rotate_fraction": 0.5,
              "rope.base": 10000.0, "embedding_size": None, "lm.trafo.context_blocks": 0, "lm.trafo.norm_input": False,
              "moe.layer_encoding": "none", "task": "c4_transformer", "lr": 0.00025}
DENSE_ARGS = {"transformer.variant": "preln_rope", "state_size": 40, "transformer.encoder_n_layers": 3,
              "transformer.n_heads": 4, "transformer.head_projection_size": None, "transformer.ff_multiplier": 2.5,
              "transformer.activation": "relu", "rope.rotate_fraction": 0.5, "rope.base": 10000.0,
              "embedding_size": None, "lm.trafo.context_blocks": 0, "lm.trafo.norm_input": False}


def moeut_state(a, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    d, H, dh, Ea, E, S = (a["state_size"], a["transformer.n_heads"], a["transformer.head_projection_size"],
                          a["moe.att.n_experts"], a["moe.n_experts"], a["moe.expert_size"])
    sd = {"embedding.weight": r(V, d) / math.sqrt(d), "output.weight": r(V, d), "output.bias": r(V),
          "out_norm.weight": 1 + r(d), "out_norm.bias": r(d)}
    for u in range(a["transformer.universal.group_size"]):
        p = f"unique_layers.{u}."
        sd.update({p + "self_attn.projections.q": r(H * dh, d), p + "self_attn.projections.k": r(H * dh, d),
                   p + "self_attn.projections.v": r(H * Ea, d, dh), p + "self_attn.projections.o": r(H * Ea, dh, d),
                   p + "self_attn.selections.v": r(H * Ea, d), p + "self_attn.selections.o": r(H * Ea, d),
                   p + "self_attn.norm.weight": 1 + r(d), p + "self_attn.norm.bias": r(d),
                   p + "pkm.keys": r(E, d, S), p + "pkm.values": r(E, S, d), p + "pkm.expert_sel": r(E, d),
                   p + "pkm.norm.weight": 1 + r(d), p + "pkm.norm.bias": r(d),
                   p + "pkm.iter": torch.tensor(100000), p + "pkm.kv_sel_counts_100": torch.zeros(E, S)})
    return sd


def dense_state(a, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    d = a["state_size"]
    F_ = int(d * a["transformer.ff_multiplier"])
    sd = {"embedding.weight": r(V, d) / math.sqrt(d), "output.weight": r(V, d), "output.bias": r(V),
          "out_norm.weight": 1 + r(d), "out_norm.bias": r(d)}
    for i in range(a["transformer.encoder_n_layers"]):
        p = f"unique_layers.{i}."
        sd.update({p + "self_attn.data_to_q.weight": r(d, d), p + "self_attn.data_to_kv.weight": r(2 * d, d),
                   p + "self_attn.out_proj.weight": r(d, d), p + "linear1.weight": r(F_, d), p + "linear1.bias": r(F_),
                   p + "linear2.weight": r(d, F_), p + "linear2.bias": r(d), p + "norm1.weight": 1 + r(d),
                   p + "norm1.bias": r(d), p + "norm2.weight": 1 + r(d), p + "norm2.bias": r(d)})
    return sd


# ---- the training code's forward pass, written from its layers ------------------------------------

def ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"])


def rope(x, base=10000.0):
    """RotaryPosEncoding on the first half of each head's dims (rotate_fraction 0.5), x: [B, H, T, dh]."""
    dh = x.shape[-1]
    n = int(0.5 * dh)
    n -= n % 2
    inv = 1.0 / (base ** (torch.arange(0, n, 2).float() / n))
    freqs = torch.arange(x.shape[-2]).float()[:, None] * inv[None]
    emb = torch.cat([freqs, freqs], -1)
    r = x[..., :n]
    half = torch.cat([-r[..., n // 2:], r[..., :n // 2]], -1)
    return torch.cat([r * emb.cos() + half * emb.sin(), x[..., n:]], -1)


def causal_attention(q, k, v):
    T = q.shape[-2]
    att = (q @ k.transpose(-1, -2)).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return att.softmax(-1) @ v


def training_code_moeut(sd, a, x):
    d, H, dh, Ea, ka, kf = (a["state_size"], a["transformer.n_heads"], a["transformer.head_projection_size"],
                            a["moe.att.n_experts"], a["moe.att.k"], a["pkm.n_heads"])
    B, T = x.shape
    h = sd["embedding.weight"][x] * math.sqrt(d)                         # TransformerLanguageModel
    for li in range(a["transformer.encoder_n_layers"]):
        p = f"unique_layers.{li % a['transformer.universal.group_size']}."    # ABAB
        n = ln(h, sd, p + "self_attn.norm")                                  # nonorm: selectors, q and k

        def select(w):                                                       # get_sel: top-k of raw scores
            logits = (n @ w.T).view(B, T, H, Ea)
            idx = logits.topk(ka, -1).indices
            return idx, logits.gather(-1, idx).sigmoid()
        iv, gv = select(sd[p + "self_attn.selections.v"])
        io, go = select(sd[p + "self_attn.selections.o"])
        s = (1 / math.sqrt(dh)) ** 0.5
        q = (n @ sd[p + "self_attn.projections.q"].T * s).view(B, T, H, dh).transpose(1, 2)
        k = (n @ sd[p + "self_attn.projections.k"].T * s).view(B, T, H, dh).transpose(1, 2)
        wv = sd[p + "self_attn.projections.v"].view(H, Ea, d, dh)
        heads = torch.arange(H)[None, None, :, None]
        v = torch.einsum("btd,bthjde,bthj->bthe", h, wv[heads, iv], gv).transpose(1, 2)   # values read raw h
        res = causal_attention(rope(q), rope(k), v).transpose(1, 2)                       # [B, T, H, dh]
        wo = sd[p + "self_attn.projections.o"].view(H, Ea, dh, d)
        h = h + torch.einsum("bthe,bthjed,bthj->btd", res, wo[heads, io], go)
        n2 = ln(h, sd, p + "pkm.norm")                                        # MoE: the selector's norm
        gate, idx = (n2 @ sd[p + "pkm.expert_sel"].T).sigmoid().topk(kf, -1)
        hid = torch.einsum("btd,btjds->btjs", h, sd[p + "pkm.keys"][idx]).relu()
        h = h + torch.einsum("btjs,btjsd,btj->btd", hid, sd[p + "pkm.values"][idx], gate)
    return ln(h, sd, "out_norm") @ sd["output.weight"].T + sd["output.bias"]


def training_code_dense(sd, a, x):
    d, H = a["state_size"], a["transformer.n_heads"]
    dh = d // H
    B, T = x.shape
    h = sd["embedding.weight"][x] * math.sqrt(d)
    for i in range(a["transformer.encoder_n_layers"]):
        p = f"unique_layers.{i}."
        n = ln(h, sd, p + "norm1")
        q = (n @ sd[p + "self_attn.data_to_q.weight"].T).view(B, T, H, dh).transpose(1, 2)
        k, v = (n @ sd[p + "self_attn.data_to_kv.weight"].T).split(d, -1)
        k, v = (t.reshape(B, T, H, dh).transpose(1, 2) for t in (k, v))
        res = causal_attention(rope(q) / math.sqrt(dh), rope(k), v).transpose(1, 2).reshape(B, T, d)
        h = h + res @ sd[p + "self_attn.out_proj.weight"].T
        n2 = ln(h, sd, p + "norm2")
        h = h + F.linear(F.linear(n2, sd[p + "linear1.weight"], sd[p + "linear1.bias"]).relu(),
                         sd[p + "linear2.weight"], sd[p + "linear2.bias"])
    return ln(h, sd, "out_norm") @ sd["output.weight"].T + sd["output.bias"]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "sp.model"
    save_tokenizer(train_paper_tokenizer(english_documents(), vocab_size=V), path)
    return path


def write_checkpoint(path, sd, args):
    torch.save({"model": sd, "run_invariants": {"args": args, "wandb_id": None}, "state": {"iter": 12345},
                "scaler": {"scale": 1.0}}, path)
    return path


@pytest.mark.parametrize("kind", ["moeut", "dense"])
def test_the_converted_model_computes_what_the_training_code_computes(kind, tokenizer_file, tmp_path):
    args, sd = (MOEUT_ARGS, moeut_state(MOEUT_ARGS)) if kind == "moeut" else (DENSE_ARGS, dense_state(DENSE_ARGS))
    ckpt = write_checkpoint(tmp_path / "C4_tiny.ckpt", sd, args)
    out = import_official(ckpt, tokenizer_file, tmp_path / "run", say=lambda m: None)
    model, tok, meta = load_run(out)
    assert meta["model"].startswith(kind) and meta["imported_from"]["variant"] == args["transformer.variant"]
    x = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(1))
    want = (training_code_moeut if kind == "moeut" else training_code_dense)(sd, args, x)
    with torch.no_grad():
        got = model(x).outputs
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
    assert tok.vocab_size == V and (out / "checkpoints" / "step_00012345").is_dir()


def test_the_paper_profiles_are_recognised(tokenizer_file, tmp_path):
    from moeut.train.official import model_of_args, model_name_for
    a = {**MOEUT_ARGS, "state_size": 412, "transformer.encoder_n_layers": 16, "transformer.n_heads": 4,
         "transformer.head_projection_size": 82, "moe.n_experts": 155, "moe.expert_size": 128, "pkm.n_heads": 12,
         "moe.att.n_experts": 8}
    kind, kwargs = model_of_args(a)
    assert model_name_for(kind, kwargs) == "moeut-44M"
    d = {**DENSE_ARGS, "state_size": 412, "transformer.encoder_n_layers": 16, "transformer.n_heads": 10,
         "transformer.head_projection_size": 41, "transformer.ff_multiplier": 4.985}
    assert model_name_for(*model_of_args(d)) == "dense-44M"


def test_bad_checkpoints_are_refused_by_name_and_nothing_is_written(tokenizer_file, tmp_path):
    sd = moeut_state(MOEUT_ARGS)
    cases = [
        ({**sd, "unique_layers.0.pkm.bias": torch.zeros(6, 8)}, MOEUT_ARGS, "unique_layers.0.pkm.bias"),
        ({k: v for k, v in sd.items() if k != "unique_layers.1.pkm.values"}, MOEUT_ARGS, "ffn.values"),
        (sd, {**MOEUT_ARGS, "moe.nonorm": 0}, "moe.nonorm"),
        (sd, {**MOEUT_ARGS, "transformer.universal.group_type": "aabb"}, "group_type"),
        (sd, {**MOEUT_ARGS, "transformer.variant": "preln_sut_universal"}, "preln_sut_universal"),
        ({**sd, "embedding.weight": torch.zeros(V + 1, 48)}, MOEUT_ARGS, "301 rows"),
        ({**sd, "unique_layers.0.pkm.keys": torch.zeros(6, 48, 9)}, MOEUT_ARGS, "ffn.keys"),
    ]
    for i, (state, args, named) in enumerate(cases):
        ckpt = write_checkpoint(tmp_path / f"bad{i}.ckpt", state, args)
        with pytest.raises(CheckpointError, match=named):
            import_official(ckpt, tokenizer_file, tmp_path / f"run{i}", say=lambda m: None)
        assert not (tmp_path / f"run{i}").exists()


class Payload:
    def __reduce__(self):
        return (open, ("/tmp/moeut-official-import-payload-ran", "w"))


def test_a_pickle_payload_is_never_run(tokenizer_file, tmp_path):
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"model": Payload(), "run_invariants": {"args": MOEUT_ARGS}}))
    with pytest.raises(CheckpointError, match="nothing in it was run"):
        import_official(path, tokenizer_file, tmp_path / "run", say=lambda m: None)
    assert not (tmp_path / "run").exists()
    import os
    assert not os.path.exists("/tmp/moeut-official-import-payload-ran")


def test_the_command_imports_then_eval_and_generate_read_the_run(tokenizer_file, tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "C4_tiny.ckpt", moeut_state(MOEUT_ARGS), MOEUT_ARGS)
    out = tmp_path / "run"
    assert main(["import-official", str(ckpt), "--tokenizer", str(tokenizer_file), "--out", str(out)]) == 0
    assert main(["import-official", str(ckpt), "--tokenizer", str(tokenizer_file), "--out", str(out)]) == 2
    assert "already" in capsys.readouterr().err
    text = tmp_path / "t.txt"
    text.write_text(" ".join(english_documents(3)))
    assert main(["eval", "--checkpoint", str(out), "--text", str(text), "--context", "32"]) == 0
    assert main(["generate", "--checkpoint", str(out), "--prompt", "The cat", "--max-new-tokens", "3"]) == 0
    assert main(["train", "--resume", str(out)]) == 2
    assert "imported" in capsys.readouterr().err
