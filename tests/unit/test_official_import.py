"""Importing the paper authors' checkpoints (`moeut import-official`).

The checkpoints here are written as the training code's `Saver.save` writes them (framework/helpers/
saver.py: torch.save of {"state": its `DotDict`, "run_invariants", "model", "optimizer", "scaler",
"interface", "sampler"}, through a temporary file renamed into place) with random weights in its
parameter names and shapes; the tokenizers are trained as its `SentencepieceVocabulary` trains them,
in its cache directory layout. A forward pass written from the training code's layers
(TransformerLanguageModel with the embedding scale `create_model` sets, RelativeMoeTransformerEncoderLayer
with `moe.nonorm`, FullMoeRopeAttention, MoE, FastRopeTransformerEncoderLayer, RotaryPosEncoding) is the
ground truth the converted model must reproduce."""

import math
import os
import pickle
import sys
import types
from pathlib import Path

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
MOEUT_ARGS = {
    "transformer.variant": "preln_moe_universal",
    "state_size": 48,
    "transformer.encoder_n_layers": 4,
    "transformer.n_heads": 2,
    "transformer.head_projection_size": 12,
    "moe.n_experts": 6,
    "moe.expert_size": 8,
    "pkm.n_heads": 2,
    "moe.att.n_experts": 3,
    "moe.att.k": 2,
    "transformer.universal.group_size": 2,
    "transformer.universal.group_type": "abab",
    "moe.perplexity_reg": 0.01,
    "moe.att.perplexity_reg": 0.001,
    "moe.nonorm": 1,
    "moe.att.enable": 1,
    "moe.att.q_expert": 0,
    "moe.att.k_expert": 0,
    "moe.att.v_expert": 1,
    "moe.att.o_expert": 1,
    "moe.selection_mode": "sigmoid",
    "moe.att.selection_mode": "sigmoid",
    "moe.bias": False,
    "moe.sel_bias": False,
    "moe.activation_after_topk": False,
    "moe.att.same_sel": False,
    "moe.att.v_size": None,
    "transformer.activation": "relu",
    "rope.rotate_fraction": 0.5,
    "rope.base": 10000.0,
    "embedding_size": None,
    "lm.trafo.context_blocks": 0,
    "lm.trafo.norm_input": False,
    "moe.layer_encoding": "none",
    "task": "c4_transformer",
    "lr": 0.00025,
}
DENSE_ARGS = {
    "transformer.variant": "preln_rope",
    "state_size": 40,
    "transformer.encoder_n_layers": 3,
    "transformer.n_heads": 4,
    "transformer.head_projection_size": None,
    "transformer.ff_multiplier": 2.5,
    "transformer.activation": "relu",
    "rope.rotate_fraction": 0.5,
    "rope.base": 10000.0,
    "embedding_size": None,
    "lm.trafo.context_blocks": 0,
    "lm.trafo.norm_input": False,
    "task": "c4_transformer",
}


def moeut_state(a, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3
    d, H, dh, Ea, E, S = (
        a["state_size"],
        a["transformer.n_heads"],
        a["transformer.head_projection_size"],
        a["moe.att.n_experts"],
        a["moe.n_experts"],
        a["moe.expert_size"],
    )
    sd = {
        "embedding.weight": r(V, d) / math.sqrt(d),
        "output.weight": r(V, d),
        "output.bias": r(V),
        "out_norm.weight": 1 + r(d),
        "out_norm.bias": r(d),
    }
    for u in range(a["transformer.universal.group_size"]):
        p = f"unique_layers.{u}."
        sd.update(
            {
                p + "self_attn.projections.q": r(H * dh, d),
                p + "self_attn.projections.k": r(H * dh, d),
                p + "self_attn.projections.v": r(H * Ea, d, dh),
                p + "self_attn.projections.o": r(H * Ea, dh, d),
                p + "self_attn.selections.v": r(H * Ea, d),
                p + "self_attn.selections.o": r(H * Ea, d),
                p + "self_attn.norm.weight": 1 + r(d),
                p + "self_attn.norm.bias": r(d),
                p + "pkm.keys": r(E, d, S),
                p + "pkm.values": r(E, S, d),
                p + "pkm.expert_sel": r(E, d),
                p + "pkm.norm.weight": 1 + r(d),
                p + "pkm.norm.bias": r(d),
                p + "pkm.iter": torch.tensor(100000),
                p + "pkm.kv_sel_counts_100": torch.zeros(E, S),
            }
        )
    return sd


def dense_state(a, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3
    d = a["state_size"]
    F_ = int(d * a["transformer.ff_multiplier"])
    sd = {
        "embedding.weight": r(V, d) / math.sqrt(d),
        "output.weight": r(V, d),
        "output.bias": r(V),
        "out_norm.weight": 1 + r(d),
        "out_norm.bias": r(d),
    }
    for i in range(a["transformer.encoder_n_layers"]):
        p = f"unique_layers.{i}."
        sd.update(
            {
                p + "self_attn.data_to_q.weight": r(d, d),
                p + "self_attn.data_to_kv.weight": r(2 * d, d),
                p + "self_attn.out_proj.weight": r(d, d),
                p + "linear1.weight": r(F_, d),
                p + "linear1.bias": r(F_),
                p + "linear2.weight": r(d, F_),
                p + "linear2.bias": r(d),
                p + "norm1.weight": 1 + r(d),
                p + "norm1.bias": r(d),
                p + "norm2.weight": 1 + r(d),
                p + "norm2.bias": r(d),
            }
        )
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
    half = torch.cat([-r[..., n // 2 :], r[..., : n // 2]], -1)
    return torch.cat([r * emb.cos() + half * emb.sin(), x[..., n:]], -1)


def causal_attention(q, k, v):
    T = q.shape[-2]
    att = (q @ k.transpose(-1, -2)).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return att.softmax(-1) @ v


def embedding_scale(a):
    """TransformerLanguageModel's `embedding_scale` as `create_model` leaves it: 1.0 for pre-LN variants
    (both of ours), `transformer.embedding_scale` when given."""
    if a.get("transformer.embedding_scale") is not None:
        return a["transformer.embedding_scale"]
    return 1.0 if "preln" in a["transformer.variant"] else math.sqrt(a["state_size"])


def training_code_moeut(sd, a, x):
    d, H, dh, Ea, ka, kf = (
        a["state_size"],
        a["transformer.n_heads"],
        a["transformer.head_projection_size"],
        a["moe.att.n_experts"],
        a["moe.att.k"],
        a["pkm.n_heads"],
    )
    B, T = x.shape
    h = sd["embedding.weight"][x] * embedding_scale(a)  # TransformerLanguageModel
    for li in range(a["transformer.encoder_n_layers"]):
        p = f"unique_layers.{li % a['transformer.universal.group_size']}."  # ABAB
        n = ln(h, sd, p + "self_attn.norm")  # nonorm: selectors, q and k

        def select(w):  # get_sel: top-k of raw scores
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
        v = torch.einsum("btd,bthjde,bthj->bthe", h, wv[heads, iv], gv).transpose(1, 2)  # values read raw h
        res = causal_attention(rope(q), rope(k), v).transpose(1, 2)  # [B, T, H, dh]
        wo = sd[p + "self_attn.projections.o"].view(H, Ea, dh, d)
        h = h + torch.einsum("bthe,bthjed,bthj->btd", res, wo[heads, io], go)
        n2 = ln(h, sd, p + "pkm.norm")  # MoE: the selector's norm
        gate, idx = (n2 @ sd[p + "pkm.expert_sel"].T).sigmoid().topk(kf, -1)
        hid = torch.einsum("btd,btjds->btjs", h, sd[p + "pkm.keys"][idx]).relu()
        h = h + torch.einsum("btjs,btjsd,btj->btd", hid, sd[p + "pkm.values"][idx], gate)
    return ln(h, sd, "out_norm") @ sd["output.weight"].T + sd["output.bias"]


def training_code_dense(sd, a, x):
    d, H = a["state_size"], a["transformer.n_heads"]
    dh = d // H
    B, T = x.shape
    h = sd["embedding.weight"][x] * embedding_scale(a)
    for i in range(a["transformer.encoder_n_layers"]):
        p = f"unique_layers.{i}."
        n = ln(h, sd, p + "norm1")
        q = (n @ sd[p + "self_attn.data_to_q.weight"].T).view(B, T, H, dh).transpose(1, 2)
        k, v = (n @ sd[p + "self_attn.data_to_kv.weight"].T).split(d, -1)
        k, v = (t.reshape(B, T, H, dh).transpose(1, 2) for t in (k, v))
        res = causal_attention(rope(q) / math.sqrt(dh), rope(k), v).transpose(1, 2).reshape(B, T, d)
        h = h + res @ sd[p + "self_attn.out_proj.weight"].T
        n2 = ln(h, sd, p + "norm2")
        h = h + F.linear(
            F.linear(n2, sd[p + "linear1.weight"], sd[p + "linear1.bias"]).relu(),
            sd[p + "linear2.weight"],
            sd[p + "linear2.bias"],
        )
    return ln(h, sd, "out_norm") @ sd["output.weight"].T + sd["output.bias"]


def training_code_tokenizer(root, dataset="C4", variant="C4-en", vocab=V, **options):
    """A tokenizer trained as the training code's SentencepieceVocabulary trains it: BPE with split
    digits, model_prefix in the dataset's cache directory (the file is <prefix>.model)."""
    import sentencepiece as spm

    prefix = root / "cache" / dataset / f"{variant}-{vocab}" / "tokenizer.model"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(root)  # the training code trains with a relative ./cache/... prefix
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(english_documents()),
            minloglevel=2,
            model_prefix=f"./cache/{dataset}/{variant}-{vocab}/tokenizer.model",
            vocab_size=vocab,
            **{"split_digits": True, "model_type": "bpe", **options},
        )
    finally:
        os.chdir(cwd)
    return Path(str(prefix) + ".model")


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    return training_code_tokenizer(tmp_path_factory.mktemp("tok"))


def _training_code_modules():
    """The training code's DotDict (framework/data_structures/dotdict.py), importable only while a
    checkpoint is written: the reader must not need it."""
    names = ["framework", "framework.data_structures", "framework.data_structures.dotdict"]
    mods = {n: types.ModuleType(n) for n in names}

    class DotDict(dict):
        def __getattr__(self, item):
            if item not in self:
                raise AttributeError(f"Key {item} not found")
            return self.get(item)

        __setattr__ = dict.__setitem__
        __delattr__ = dict.__delitem__

    DotDict.__module__, DotDict.__qualname__ = names[-1], "DotDict"
    mods[names[-1]].DotDict = DotDict
    mods["framework"].data_structures = mods["framework.data_structures"]
    mods["framework.data_structures"].dotdict = mods[names[-1]]
    return mods, DotDict


def write_checkpoint(path, sd, args, extra=None):
    """What Saver.save writes: every registered saver's state, torch.save'd to save_tmp and renamed."""
    from collections import OrderedDict

    mods, DotDict = _training_code_modules()
    sys.modules.update(mods)
    try:
        state = DotDict()
        state.iter = 12345
        state.epoch = 0
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=2.5e-4)
        model(torch.randn(2, 3)).sum().backward()
        opt.step()
        data = {
            "state": state,
            "run_invariants": {"args": args, "wandb_id": None},
            "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
            "model": OrderedDict(sd),
            "optimizer": opt.state_dict(),
            "interface": {"state": [None]},
            "sampler": {"pos": 1234},
            **(extra or {}),
        }
        tmp = path.parent / "save_tmp"
        torch.save(data, tmp)
        os.rename(tmp, path)
    finally:
        for n in mods:
            sys.modules.pop(n, None)
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


def test_a_given_embedding_scale_is_folded_into_the_weights(tokenizer_file, tmp_path):
    args = {**MOEUT_ARGS, "transformer.embedding_scale": 3.0}
    sd = moeut_state(args)
    out = import_official(
        write_checkpoint(tmp_path / "c.ckpt", sd, args), tokenizer_file, tmp_path / "run", say=lambda m: None
    )
    model, _, _ = load_run(out)
    x = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(2))
    want = training_code_moeut(sd, args, x)
    with torch.no_grad():
        got = model(x).outputs
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
    assert torch.allclose(model.embedding.weight, sd["embedding.weight"] * 3.0)


@pytest.mark.parametrize(
    "fault,named",
    [
        ("our paper tokenizer", "not in the cache of the C4 dataset"),
        ("another dataset's", "SlimPajama"),
        ("unigram", "UNIGRAM"),
        ("no digit split", "split_digits False"),
        ("other vocabulary", "has 280 pieces"),
    ],
)
def test_the_tokenizer_is_checked_by_what_it_records_of_its_training(fault, named, tmp_path):
    ckpt = write_checkpoint(tmp_path / "c.ckpt", moeut_state(MOEUT_ARGS), MOEUT_ARGS)
    if fault == "our paper tokenizer":  # right kind and size, but not the training code's file
        tok = tmp_path / "ours.model"
        save_tokenizer(train_paper_tokenizer(english_documents(), vocab_size=V), tok)
    elif fault == "another dataset's":
        tok = training_code_tokenizer(tmp_path, "SlimPajama", "SlimPajama")
    elif fault == "unigram":
        tok = training_code_tokenizer(tmp_path, vocab=100, model_type="unigram")  # (checked before the size)
    elif fault == "no digit split":
        tok = training_code_tokenizer(tmp_path, split_digits=False)
    else:
        tok = training_code_tokenizer(tmp_path, vocab=280)
    with pytest.raises(CheckpointError, match=named):
        import_official(ckpt, tok, tmp_path / "run", say=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_the_paper_profiles_are_recognised(tokenizer_file, tmp_path):
    from moeut.train.official import model_of_args, model_name_for

    a = {
        **MOEUT_ARGS,
        "state_size": 412,
        "transformer.encoder_n_layers": 16,
        "transformer.n_heads": 4,
        "transformer.head_projection_size": 82,
        "moe.n_experts": 155,
        "moe.expert_size": 128,
        "pkm.n_heads": 12,
        "moe.att.n_experts": 8,
    }
    kind, kwargs = model_of_args(a)
    assert model_name_for(kind, kwargs) == "moeut-44M"
    d = {
        **DENSE_ARGS,
        "state_size": 412,
        "transformer.encoder_n_layers": 16,
        "transformer.n_heads": 10,
        "transformer.head_projection_size": 41,
        "transformer.ff_multiplier": 4.985,
    }
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
    # the same payload beside the DotDict, in a file otherwise written as Saver.save writes it
    evil = write_checkpoint(tmp_path / "evil2.ckpt", moeut_state(MOEUT_ARGS), MOEUT_ARGS, extra={"x": Payload()})
    with pytest.raises(CheckpointError, match="nothing in it was run"):
        import_official(evil, tokenizer_file, tmp_path / "run", say=lambda m: None)
    assert not (tmp_path / "run").exists()
    assert not os.path.exists("/tmp/moeut-official-import-payload-ran")


def test_the_dotdict_is_read_as_data_and_its_iteration_becomes_the_step(tokenizer_file, tmp_path):
    """The stand-in is for that one name: the reader never imports the training code (its modules are
    absent here) and the state arrives as a plain dict."""
    from moeut.train.official import read_training_checkpoint

    ckpt = write_checkpoint(tmp_path / "c.ckpt", moeut_state(MOEUT_ARGS), MOEUT_ARGS)
    assert "framework" not in sys.modules
    data = read_training_checkpoint(ckpt)
    assert type(data["state"]) is dict and data["state"] == {"iter": 12345, "epoch": 0}
    assert data["sampler"] == {"pos": 1234} and set(data) >= {"optimizer", "scaler", "interface"}


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
