"""Import the paper authors' checkpoints (RobertCsordas/moeut_training_code, e.g. the Hugging Face
repository robertcsordas/moeut_training_checkpoints: `checkpoints/C4_44M.ckpt`, tokenizers under `cache/`)
as a moeut run directory, which `moeut eval`, `moeut generate` and `moeut.runs.load_run` then read.

The training code saves one torch.save file per checkpoint: the model's state dict under "model" and
its command-line arguments under ["run_invariants"]["args"] (dotted names such as
"transformer.encoder_n_layers"). It is read through the restricted unpickler (no code runs).

What maps onto what (the training code's module names on the left):
    embedding.weight                             embedding.weight, times the training code's embedding
                                                 scale when that is not 1 (`embedding_scale`)
    unique_layers.i.self_attn.projections.q / k  transformer.layers.i.attention.q.weight / k.weight
    unique_layers.i.self_attn.projections.v / o  transformer.layers.i.attention.v / o
    unique_layers.i.self_attn.selections.v / o   transformer.layers.i.attention.sel_v / sel_o
    unique_layers.i.self_attn.norm               transformer.layers.i.ln1 (`moe.nonorm`: the norm of
                                                 the attention's selectors, queries and keys)
    unique_layers.i.pkm.keys / values / expert_sel   transformer.layers.i.ffn.*
    unique_layers.i.pkm.norm                     transformer.layers.i.ln2 (the FFN selector's norm)
    out_norm, output                             out_norm, lm_head
and, for the dense baseline (`preln_rope`): self_attn.data_to_q and data_to_kv -> layers.i.qkv (rows q,
k, v), out_proj -> o, linear1 / linear2 -> ff1 / ff2, norm1 / norm2 -> ln1 / ln2.
Statistics buffers of the MoE layers (pkm.iter, pkm.kv_sel_counts_100) are dropped. Any other key,
or a missing one, is an error that names it; so is a setting this library's models do not have.

The file is what the training code's `Saver.save` (framework/helpers/saver.py) writes with torch.save:
a dict of "model", "run_invariants" ({"args", "wandb_id"}), "state" (the training helper's
`DotDict` of iteration and epoch: framework/data_structures/dotdict.py, a plain dict subclass), and
"optimizer", "scaler", "interface", "sampler" when they were registered (the released checkpoints
dropped the optimizer). It is read through PyTorch's restricted unpickler with one addition to its
allow-list: the name `framework.data_structures.dotdict.DotDict` maps to a dict subclass of ours, so
that class's instances load as dicts; every other global is still refused, unexecuted.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from moeut import profiles
from moeut.files import write_json_atomic
from moeut.models import build_model, model_kwargs
from moeut.train import checkpoint as ckpt_lib
from moeut.train.checkpoint import CheckpointError
from moeut.train.legacy import load_pickle_safely
from moeut.train.run_dir import check_new_run_dir
from moeut.train.tokenizer import Tokenizer, save_tokenizer

DROPPED = re.compile(r"unique_layers\.\d+\.pkm\.(iter|kv_sel_counts_100|kv_sel_counts)$")

# Settings the conversion needs at exactly these values (the architecture this library implements);
# a setting absent from an older checkpoint counts as its default in the training code.
MOEUT_FIXED = {
    "transformer.variant": "preln_moe_universal",
    "moe.nonorm": True,
    "moe.att.enable": True,
    "moe.att.q_expert": False,
    "moe.att.k_expert": False,
    "moe.att.v_expert": True,
    "moe.att.o_expert": True,
    "moe.selection_mode": "sigmoid",
    "moe.att.selection_mode": "sigmoid",
    "moe.bias": False,
    "moe.sel_bias": False,
    "moe.activation_after_topk": False,
    "moe.att.same_sel": False,
    "moe.att.v_size": None,
    "transformer.universal.group_type": "abab",
    "transformer.activation": "relu",
    "rope.rotate_fraction": 0.5,
    "rope.base": 10000.0,
    "embedding_size": None,
    "lm.trafo.context_blocks": 0,
    "lm.trafo.norm_input": False,
    "moe.layer_encoding": "none",
}
DENSE_FIXED = {
    "transformer.variant": "preln_rope",
    "transformer.activation": "relu",
    "rope.rotate_fraction": 0.5,
    "rope.base": 10000.0,
    "embedding_size": None,
    "lm.trafo.context_blocks": 0,
    "lm.trafo.norm_input": False,
}
DEFAULTS = {
    "moe.att.same_sel": False,
    "moe.att.v_size": None,
    "transformer.universal.group_type": "abab",
    "moe.activation_after_topk": False,
    "moe.bias": False,
    "moe.sel_bias": False,
    "rope.rotate_fraction": 0.5,
    "rope.base": 10000.0,
    "embedding_size": None,
    "lm.trafo.norm_input": False,
    "transformer.activation": "relu",
    "moe.att.selection_mode": "sigmoid",
    "moe.layer_encoding": "none",
}


def _setting(args: Dict[str, Any], name: str, source: str) -> Any:
    if name in args:
        return args[name]
    if name in DEFAULTS:
        return DEFAULTS[name]
    raise CheckpointError(f"{source}: its arguments lack {name!r}")


def _same(a: Any, b: Any) -> bool:
    if isinstance(b, bool) or b is None:
        return (bool(a) == b) if b is not None else a is None
    if isinstance(b, float):
        return isinstance(a, (int, float)) and math.isclose(float(a), b)
    return a == b


def model_of_args(args: Dict[str, Any], source: str = "checkpoint") -> Tuple[str, Dict[str, Any]]:
    """("moeut" or "dense", our constructor arguments) for the training code's arguments."""
    variant = args.get("transformer.variant")
    if variant not in (MOEUT_FIXED["transformer.variant"], DENSE_FIXED["transformer.variant"]):
        raise CheckpointError(
            f"{source}: transformer.variant {variant!r} is not supported; moeut imports "
            f"'preln_moe_universal' (MoEUT) and 'preln_rope' (the dense baseline)"
        )
    kind = "moeut" if variant == "preln_moe_universal" else "dense"
    for name, want in (MOEUT_FIXED if kind == "moeut" else DENSE_FIXED).items():
        got = _setting(args, name, source)
        if not _same(got, want):
            raise CheckpointError(
                f"{source}: {name} = {got!r} has no counterpart in moeut's {kind} model (it needs {want!r})"
            )
    g = lambda name: _setting(args, name, source)
    d_model, n_layers = int(g("state_size")), int(g("transformer.encoder_n_layers"))
    if kind == "dense":
        d_head = g("transformer.head_projection_size")
        return kind, dict(
            d_model=d_model,
            n_layers=n_layers,
            n_heads=int(g("transformer.n_heads")),
            d_ff=int(d_model * float(g("transformer.ff_multiplier"))),
            d_head=int(d_head) if d_head is not None else None,
            scale_embedding=False,
        )
    d_head = g("transformer.head_projection_size")
    return kind, dict(
        d_model=d_model,
        n_layers=n_layers,
        n_heads=int(g("transformer.n_heads")),
        ff_n_experts=int(g("moe.n_experts")),
        ff_expert_size=int(g("moe.expert_size")),
        ff_k=int(g("pkm.n_heads")),
        att_n_experts=int(g("moe.att.n_experts")),
        att_k=int(g("moe.att.k")),
        d_head=int(d_head) if d_head is not None else d_model // int(g("transformer.n_heads")),
        group_size=int(g("transformer.universal.group_size")),
        entropy_reg=float(g("moe.perplexity_reg")),
        att_entropy_reg=float(g("moe.att.perplexity_reg")),
    )


def embedding_scale(args: Dict[str, Any], d_model: int) -> float:
    """The factor the training code's language model multiplies its embedding by: sqrt(d_model) as
    TransformerLanguageModel initialises it, 1.0 for pre-LN variants (`create_model` in
    tasks/transformer_lm_mixin.py: `if self.is_preln(): model.embedding_scale = 1.0`), and
    `transformer.embedding_scale` instead when that argument is set."""
    given = args.get("transformer.embedding_scale")
    if given is not None:
        return float(given)
    return 1.0 if "preln" in str(args.get("transformer.variant", "")) else math.sqrt(d_model)


def convert_state(
    kind: str, state: Dict[str, torch.Tensor], scale: float, source: str = "checkpoint"
) -> Dict[str, torch.Tensor]:
    """The training code's model state dict as ours (see the module docstring); `scale`: its embedding
    scale (`embedding_scale`), folded into our embedding weights."""
    out: Dict[str, torch.Tensor] = {}
    unknown = []
    qkv: Dict[str, Dict[str, torch.Tensor]] = {}
    moeut_names = {
        "self_attn.projections.q": "attention.q.weight",
        "self_attn.projections.k": "attention.k.weight",
        "self_attn.projections.v": "attention.v",
        "self_attn.projections.o": "attention.o",
        "self_attn.selections.v": "attention.sel_v",
        "self_attn.selections.o": "attention.sel_o",
        "self_attn.norm.weight": "ln1.weight",
        "self_attn.norm.bias": "ln1.bias",
        "pkm.keys": "ffn.keys",
        "pkm.values": "ffn.values",
        "pkm.expert_sel": "ffn.expert_sel",
        "pkm.norm.weight": "ln2.weight",
        "pkm.norm.bias": "ln2.bias",
    }
    dense_names = {
        "self_attn.out_proj.weight": "o.weight",
        "linear1.weight": "ff1.weight",
        "linear1.bias": "ff1.bias",
        "linear2.weight": "ff2.weight",
        "linear2.bias": "ff2.bias",
        "norm1.weight": "ln1.weight",
        "norm1.bias": "ln1.bias",
        "norm2.weight": "ln2.weight",
        "norm2.bias": "ln2.bias",
    }
    prefix = "transformer.layers" if kind == "moeut" else "layers"
    for key, value in state.items():
        if not torch.is_tensor(value):
            unknown.append(key)
            continue
        value = value.detach().float() if value.is_floating_point() else value
        if key == "embedding.weight":  # our models multiply by nothing: the scale goes into the weights
            out[key] = value * scale if scale != 1.0 else value
        elif key in ("output.weight", "output.bias"):
            out["lm_head." + key.split(".")[1]] = value
        elif key in ("out_norm.weight", "out_norm.bias"):
            out[key] = value
        elif DROPPED.match(key):
            continue
        elif m := re.match(r"unique_layers\.(\d+)\.(.+)$", key):
            i, rest = m.group(1), m.group(2)
            names = moeut_names if kind == "moeut" else dense_names
            if rest in names:
                out[f"{prefix}.{i}.{names[rest]}"] = value
            elif kind == "dense" and rest in ("self_attn.data_to_q.weight", "self_attn.data_to_kv.weight"):
                qkv.setdefault(i, {})[rest.split(".")[1]] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    for i, parts in qkv.items():
        if set(parts) != {"data_to_q", "data_to_kv"}:
            unknown.append(f"unique_layers.{i}.self_attn: needs both data_to_q and data_to_kv")
            continue
        out[f"{prefix}.{i}.qkv.weight"] = torch.cat([parts["data_to_q"], parts["data_to_kv"]], 0)
    if unknown:
        raise CheckpointError(
            f"{source}: keys moeut cannot place: {', '.join(sorted(unknown)[:8])}"
            + (f" (and {len(unknown) - 8} more)" if len(unknown) > 8 else "")
        )
    return out


DOTDICT = "framework.data_structures.dotdict.DotDict"  # the training code's only non-builtin class in a checkpoint
# The dataset class each of the paper's tasks trains its tokenizer in (the `dataset.C4(...)` etc. of its
# tasks/*_transformer.py); the tokenizer's cache directory, which SentencePiece records in the model
# as its `model_prefix`, is named after it: ./cache/<class>/<class>[-<variant>]-<pieces>/tokenizer.model.
TASK_DATASETS = {
    "c4_transformer": "C4",
    "slimpajama_transformer": "SlimPajama",
    "pes2o_transformer": "PES2O",
    "thestack_transformer": "TheStack",
}


def read_training_checkpoint(path: Path) -> Dict[str, Any]:
    """The dict the training code's `Saver.save` wrote (see the module docstring), read with nothing
    executed; its structure checked."""
    data = load_pickle_safely(path, extra_globals=((dict, DOTDICT),))
    args = (
        data.get("run_invariants", {}).get("args")
        if isinstance(data, dict) and isinstance(data.get("run_invariants"), dict)
        else None
    )
    if not isinstance(args, dict) or not isinstance(data.get("model"), dict):
        raise CheckpointError(
            f"{path} is not a checkpoint of the training code (no 'model' and 'run_invariants'/'args')"
        )
    if not all(isinstance(k, str) for k in args):
        raise CheckpointError(f"{path}: run_invariants.args has keys that are not names")
    return data


def check_tokenizer(model_bytes: bytes, args: Dict[str, Any], vocab: int, tokenizer: str, source: str) -> None:
    """The tokenizer must be the one the training code trained for this checkpoint's task: BPE with
    split digits (`SentencepieceVocabulary`, framework/dataset/text/tokenizers/sentencepiece.py), the
    checkpoint's vocabulary size, and trained in the cache directory of the task's dataset (its
    recorded `model_prefix`). Checked from the model file's own training record, not its piece count
    alone."""
    from moeut.train.tokenizer import trainer_record

    try:
        record = trainer_record(model_bytes)
    except ValueError as e:
        raise CheckpointError(f"{tokenizer}: {e}") from None
    if record["model_type"] != "BPE" or not record["split_digits"]:
        raise CheckpointError(
            f"{tokenizer} was trained as {record['model_type']} with split_digits "
            f"{record['split_digits']}; the training code trains BPE with split digits"
        )
    if record["vocab_size"] != vocab:
        raise CheckpointError(
            f"{tokenizer} has {record['vocab_size']} pieces but the checkpoint's embedding has "
            f"{vocab} rows: give the tokenizer the model was trained with (the repository's cache/)"
        )
    task = args.get("task")
    dataset = TASK_DATASETS.get(task)
    if dataset is None:
        raise CheckpointError(
            f"{source}: task {task!r} is none of the paper's language-modelling tasks "
            f"({', '.join(TASK_DATASETS)}), so its tokenizer cannot be checked"
        )
    prefix = record["model_prefix"].replace("\\", "/")
    if f"/{dataset}/{dataset}-" not in f"/{prefix}":
        raise CheckpointError(
            f"{tokenizer} was trained as {prefix or 'an unnamed model'}, not in the cache of the "
            f"{dataset} dataset that task {task} trains on: give that task's tokenizer "
            f"(cache/{dataset}/{dataset}-...-{vocab}/tokenizer.model.model)"
        )


def model_name_for(kind: str, kwargs: Dict[str, Any]) -> str:
    """The profile whose arguments these are (e.g. moeut-44M), else the kind's tiny profile: run.json
    then records every argument as an override either way."""
    table = profiles.MOEUT_PROFILES if kind == "moeut" else profiles.DENSE_PROFILES
    for size, prof in table.items():
        if all(kwargs.get(k) == v for k, v in prof.items()):
            return f"{kind}-{size}"
    return f"{kind}-tiny"


def import_official(checkpoint: str | Path, tokenizer: str | Path, out: str | Path, say=print) -> Path:
    """Convert one of the training code's checkpoints, with its SentencePiece tokenizer, into a new run
    directory at `out`; everything is checked (and the converted weights loaded into the model) before
    the directory is created."""
    checkpoint, out = Path(checkpoint), Path(out)
    check_new_run_dir(out)
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint} does not exist")
    tok = Tokenizer(tokenizer)
    data = read_training_checkpoint(checkpoint)
    args, state = data["run_invariants"]["args"], data["model"]
    kind, kwargs = model_of_args(args, str(checkpoint))
    converted = convert_state(kind, state, embedding_scale(args, kwargs["d_model"]), str(checkpoint))
    vocab = converted["embedding.weight"].shape[0] if "embedding.weight" in converted else None
    check_tokenizer(tok.model_bytes(), args, vocab, str(tokenizer), str(checkpoint))
    name = model_name_for(kind, kwargs)
    kwargs = model_kwargs(name, kwargs)
    model = build_model(name, vocab, kwargs)
    own = model.state_dict()
    missing = sorted(set(own) - set(converted))
    if missing:
        raise CheckpointError(f"{checkpoint}: no weights for {', '.join(missing[:8])}")
    ckpt_lib.check_compatible(
        {k: (tuple(v.shape), v.dtype) for k, v in own.items()},
        {k: (tuple(v.shape), v.dtype) for k, v in converted.items()},
        str(checkpoint),
    )
    ckpt_lib.check_finite(converted, str(checkpoint))
    model.load_state_dict(converted)
    iteration = data.get("state", {}).get("iter") if isinstance(data.get("state"), dict) else None
    step = iteration if isinstance(iteration, int) and iteration >= 0 else 0
    out.mkdir(parents=True)
    try:
        save_tokenizer(tok, out)
        source = {
            "checkpoint": str(checkpoint.resolve()),
            "tokenizer": str(Path(tokenizer).resolve()),
            "variant": args.get("transformer.variant"),
            "task": args.get("task"),
        }
        write_json_atomic(
            out / "run.json",
            {"model": name, "model_kwargs": kwargs, "vocab_size": vocab, "config": {}, "imported_from": source},
        )
        training = {"optimizer": None, "scheduler": None, "rng": None, "data_position": None, "config": {}}
        ckpt_lib.save_checkpoint(
            out, step, {k: v.contiguous() for k, v in model.state_dict().items()}, training, keep=1
        )
    except BaseException:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        raise
    say(
        f"imported {checkpoint.name} ({kind}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) "
        f"into {out}"
    )
    return out
