"""`moeut export RUN --out DIR`: a run's newest intact checkpoint as a Hugging Face model directory.

    config.json               MoEUTConfig (model name, constructor arguments, context) + auto_map
    model.safetensors         the weights, under `lm.` (our module names)
    generation_config.json    eos and padding: the end-of-text id, as `moeut generate` uses it
    tokenizer.json, tokenizer_config.json   transformers' fast tokenizer: the run's tokenizer.json, or,
                              for a SentencePiece run, its conversion when exact (`fast_tokenizer`)
    tokenizer.model, special_tokens_map.json   a SentencePiece run's model and MoEUTTokenizer, whose
                              class AutoTokenizer loads when the conversion is not exact
    moeut_remote.py           what `trust_remote_code=True` imports: the classes of the installed moeut
    README.md                 a model card: model, data, steps, validation perplexity, zero-shot scores

The directory is built beside DIR under a temporary name and renamed into place when complete, so an
interrupted export leaves no half-written model; an existing non-empty DIR is refused.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from moeut.evaluate import PAPER_TABLE
from moeut.hf.fast_tokenizer import exact_fast_tokenizer
from moeut.models import model_kwargs_of_run
from moeut.runs import load_run

REMOTE_MODULE = "moeut_remote"
REMOTE_CODE = '''"""transformers' `trust_remote_code=True` entry point of a moeut export: the classes come from the
installed moeut package (pip install moeut[hf]); nothing else is defined here."""
from moeut.hf.modeling import MoEUTConfig, MoEUTForCausalLM  # noqa: F401
from moeut.hf.tokenization import MoEUTTokenizer  # noqa: F401
'''


def check_export_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty directory; choose a new one")
    if not os.access(out.parent if out.parent.exists() else Path("."), os.W_OK):
        raise ValueError(f"--out {out}: its directory is not writable")


def read_eval_json(path: Optional[Path]) -> Optional[Dict[str, Any]]:
    """The JSON `moeut eval --json` wrote, checked for its shape."""
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--eval {path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ValueError(f"--eval {path}: not the JSON of `moeut eval --json` (no 'results')")
    return data


def export_run(run: str | Path, out: str | Path, eval_json: Optional[str | Path] = None) -> Path:
    from moeut.hf import register

    register()
    from transformers import GenerationConfig
    from moeut.hf.modeling import MoEUTConfig, MoEUTForCausalLM
    from moeut.hf.tokenization import MoEUTTokenizer

    out = Path(out)
    check_export_target(out)
    scores = read_eval_json(Path(eval_json) if eval_json else None)
    lm, tok, meta = load_run(run, "cpu")
    context = int(meta.get("config", {}).get("context") or 1024)
    config = MoEUTConfig(
        moeut_model=meta["model"],
        model_kwargs=model_kwargs_of_run(meta),
        vocab_size=tok.vocab_size,
        max_position_embeddings=context,
        eos_token_id=tok.eot_id,
        pad_token_id=tok.eot_id,
    )
    config.auto_map = {
        "AutoConfig": f"{REMOTE_MODULE}.MoEUTConfig",
        "AutoModelForCausalLM": f"{REMOTE_MODULE}.MoEUTForCausalLM",
    }
    with torch.device("meta"):  # the wrapper's own model is replaced by the loaded one
        model = MoEUTForCausalLM(config)
    model.lm = lm
    model.generation_config = GenerationConfig(eos_token_id=tok.eot_id, pad_token_id=tok.eot_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))  # exclusive, unpredictable
    try:
        model.save_pretrained(tmp)
        fast_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "padding_side": "left",
            "model_max_length": context,
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": True,
        }  # text that spells a special token is text
        if tok.kind == "hf":  # a Hugging Face tokenizer: transformers' own fast class reads it
            (tmp / "tokenizer.json").write_bytes(tok.json_bytes)
            tok_config = {**fast_config, "eos_token": tok.eos_token, "pad_token": tok.eos_token}
            fast_note = ""
        else:  # SentencePiece: our slow class, which encodes exactly as training did
            (tmp / "source.model").write_bytes(tok.model_bytes())
            hf_tok = MoEUTTokenizer(str(tmp / "source.model"))
            hf_tok.model_max_length = context
            hf_tok.save_pretrained(tmp)
            (tmp / "source.model").unlink()
            tok_config = json.loads((tmp / "tokenizer_config.json").read_text())
            fast, fast_note = exact_fast_tokenizer(tok.model_bytes())
            if fast is not None:  # AutoTokenizer gives the fast tokenizer; MoEUTTokenizer still loads
                fast.save(str(tmp / "tokenizer.json"))
                tok_config = {
                    **fast_config,
                    **{k: tok_config[k] for k in ("eos_token", "pad_token", "unk_token") if k in tok_config},
                }
            else:
                tok_config["auto_map"] = {"AutoTokenizer": [f"{REMOTE_MODULE}.MoEUTTokenizer", None]}
                tok_config["tokenizer_class"] = "MoEUTTokenizer"
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
        (tmp / f"{REMOTE_MODULE}.py").write_text(REMOTE_CODE)
        fast_tokenizer = (tmp / "tokenizer.json").exists()
        (tmp / "README.md").write_text(
            model_card(Path(run), meta, lm, tok.kind, scores, out.name, fast_tokenizer, fast_note)
        )
        _readable(tmp)  # mkdtemp made it private; an exported model is for others to read
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _readable(root: Path) -> None:
    """Directories 0755 and files 0644, less the umask, under `root`."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, (0o755 if p.is_dir() else 0o644) & ~umask)


def _tokenizer_note(kind: str, fast: bool, why_not_fast: str) -> str:
    if kind == "hf":
        return "is transformers' own fast tokenizer (tokenizer.json) and needs only transformers."
    if fast:
        return (
            "is transformers' fast tokenizer (tokenizer.json, converted from the SentencePiece model and checked "
            "to encode and decode as it does at export) and needs only transformers; `tokenizer.model` is the "
            "SentencePiece original. One difference remains: ids whose byte pieces are not valid UTF-8 (no text "
            "encodes to them) decode with one U+FFFD per byte piece, where SentencePiece keeps the valid bytes."
        )
    return (
        "is SentencePiece through moeut's tokenizer class (sentencepiece and moeut installed): the fast "
        f"conversion was not exact ({why_not_fast})."
    )


def _last_validation(run_dir: Path, step: int) -> Optional[float]:
    from moeut.train.run_dir import metric_records

    best = None
    for record in metric_records(run_dir):
        v = record.get("val_ppl")
        if (
            isinstance(v, (int, float))
            and not isinstance(v, bool)
            and math.isfinite(v)
            and v > 0
            and record["step"] <= step
        ):
            best = float(v)
    return best


def model_card(
    run: Path,
    meta: Dict[str, Any],
    lm,
    tokenizer_kind: str,
    scores: Optional[Dict[str, Any]],
    name: str,
    fast_tokenizer: bool = False,
    fast_note: str = "",
) -> str:
    run_dir = run.parent.parent if run.parent.name == "checkpoints" else run
    cfg = meta.get("config", {})
    step = meta["loaded_checkpoint"]["step"]
    params = sum(p.numel() for p in lm.parameters())
    tokens = step * int(cfg.get("batch_size") or 0) * int(cfg.get("context") or 0)
    data = ", ".join(Path(str(d)).name for d in cfg.get("data") or []) or "not recorded"
    ppl = _last_validation(run_dir, step)
    lines = [
        "---",
        "library_name: transformers",
        "tags: [moeut, mixture-of-experts, universal-transformer]",
        "---",
        f"# {name}",
        "",
        f"A `{meta['model']}` model ({params / 1e6:.1f}M parameters) trained with "
        f"moeut (MoEUT: Mixture-of-Experts Universal Transformers, Csordás et al., "
        f"NeurIPS 2024).",
        "",
        "| | |",
        "|---|---|",
        f"| training data | {data} |",
        f"| steps | {step:,} ({tokens / 1e6:,.1f}M tokens of context {cfg.get('context', '?')}) |",
        f"| tokenizer | {'Hugging Face tokenizers' if tokenizer_kind == 'hf' else 'SentencePiece'}, "
        f"{meta.get('vocab_size', '?')} pieces ({tokenizer_kind}) |",
        f"| validation perplexity | {f'{ppl:.2f}' if ppl is not None else 'not measured'} |",
        "",
    ]
    if scores:
        lines += [
            f"Zero-shot ({scores.get('protocol', 'moeut eval')}, limit {scores.get('limit') or 'none'}):",
            "",
            "| task | accuracy |",
            "|---|---|",
        ]
        for task, _ in PAPER_TABLE + (("arc_challenge", "accuracy"),):
            r = scores["results"].get(task)
            if isinstance(r, dict) and r.get("accuracy") is not None:
                err = f" ± {r['accuracy_stderr']:.3f}" if r.get("accuracy_stderr") is not None else ""
                lines.append(f"| {task} | {r['accuracy']:.3f}{err} |")
        lines.append("")
    lines += [
        "## Use",
        "",
        "```python",
        "import moeut  # registers the model type with transformers",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tok = AutoTokenizer.from_pretrained("path/to/{name}")   # this directory (or its Hub id)',
        f'model = AutoModelForCausalLM.from_pretrained("path/to/{name}")',
        'ids = tok(["The"], return_tensors="pt")',
        "print(tok.decode(model.generate(**ids, max_new_tokens=40)[0]))",
        "```",
        "",
        "Without `import moeut`, pass `trust_remote_code=True`. Either way the model needs moeut installed "
        "(pip install 'moeut[hf]'); the tokenizer " + _tokenizer_note(tokenizer_kind, fast_tokenizer, fast_note),
        "",
    ]
    return "\n".join(lines)
