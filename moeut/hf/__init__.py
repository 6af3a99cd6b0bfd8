"""Hugging Face transformers for moeut runs (optional: needs `pip install moeut[hf]`).

    moeut export runs/44m --out hf/44m                 # a model directory transformers reads
    model = AutoModelForCausalLM.from_pretrained("hf/44m")                            # after `import moeut`
    model = AutoModelForCausalLM.from_pretrained("hf/44m", trust_remote_code=True)   # without it

`modeling` holds the config and the causal-LM class (our model inside, our KV cache in `generate`),
`tokenization` the run's SentencePiece model as a transformers tokenizer, `export` the writer of the
directory. Importing this package imports nothing from transformers; `register()` does, and
`import moeut` calls it once transformers is imported (see `moeut/__init__.py`).
"""

from __future__ import annotations

MODEL_TYPE = "moeut"
_registered = False


def register() -> None:
    """Make AutoConfig, AutoModelForCausalLM and AutoTokenizer know `model_type: moeut`. Idempotent."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from moeut.hf.modeling import MoEUTConfig, MoEUTForCausalLM
    from moeut.hf.tokenization import MoEUTTokenizer

    AutoConfig.register(MODEL_TYPE, MoEUTConfig, exist_ok=True)
    AutoModelForCausalLM.register(MoEUTConfig, MoEUTForCausalLM, exist_ok=True)
    AutoTokenizer.register(MoEUTConfig, slow_tokenizer_class=MoEUTTokenizer, exist_ok=True)
    _registered = True
