"""transformers classes around our models: `MoEUTConfig` and `MoEUTForCausalLM`.

The causal LM holds one of our models (`MoEUTLM` or `DenseLM`, built from the recorded model name and
constructor arguments) as `.lm`, so its weights and numerics are the library's own: `forward` returns
exactly our logits. `generate` is not transformers' decoding loop but `moeut.generate.generate` (its
preallocated KV cache and, on CUDA, CUDA graphs) behind transformers' arguments: greedy or sampling
(temperature, top-k, top-p), left-padded batches with an attention mask, eos and padding ids. Beam
search, logits processors and the like are refused by name rather than ignored.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from moeut.attention import AttentionMask
from moeut.generate import generate as moeut_generate
from moeut.hf import MODEL_TYPE
from moeut.models import build_model

# generate() arguments that change nothing here: the cache is always used, and stop strings are left to
# the caller (lm-evaluation-harness cuts its outputs at its stop sequences itself).
TOLERATED_GENERATE_ARGS = {
    "use_cache",
    "stopping_criteria",
    "return_dict_in_generate",
    "output_scores",
    "output_logits",
    "output_attentions",
    "output_hidden_states",
}


class MoEUTConfig(PretrainedConfig):
    """`moeut_model`: "moeut-<size>" or "dense-<size>"; `model_kwargs`: its constructor arguments as
    the run recorded them; `max_position_embeddings`: the training context (RoPE has no limit; tools
    such as lm-evaluation-harness size their windows from it)."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        moeut_model: str = "moeut-44M",
        model_kwargs: Optional[Dict[str, Any]] = None,
        vocab_size: int = 8000,
        max_position_embeddings: int = 1024,
        **kwargs,
    ):
        self.moeut_model = moeut_model
        self.model_kwargs = dict(model_kwargs or {})
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class MoEUTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MoEUTConfig
    base_model_prefix = "lm"
    main_input_name = "input_ids"
    _no_split_modules: List[str] = []

    def __init__(self, config: MoEUTConfig):
        super().__init__(config)
        self.lm = build_model(config.moeut_model, config.vocab_size, dict(config.model_kwargs))
        self.post_init()

    def _init_weights(self, module) -> None:
        """Our modules initialise their weights when built (the paper's scheme) and transformers loads the
        checkpoint over them; only derived buffers, which a model built on the meta device lacks, are
        computed here."""
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()

    def get_input_embeddings(self):
        return self.lm.embedding

    def get_output_embeddings(self):
        return self.lm.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        past_key_values=None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits [B, T, vocab] (fp32 weights: our forward as is). `attention_mask` (1 keep, 0 padding)
        masks padded keys; `labels` give transformers' shifted cross-entropy (-100 ignored)."""
        if past_key_values is not None:
            raise ValueError(
                "past_key_values: this model keeps its KV cache inside generate(); forward takes whole sequences"
            )
        asked = sorted(k for k, v in kwargs.items() if v and k in ("output_attentions", "output_hidden_states"))
        if asked:
            raise ValueError(f"{asked[0]} is not supported by moeut models")
        mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            mask = AttentionMask(~attention_mask.bool(), None, is_causal=True)
        logits = self.lm(input_ids, mask).outputs
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        generation_config: Optional[GenerationConfig] = None,
        seed: Optional[int] = None,
        **kwargs,
    ) -> torch.Tensor:
        """[B, prompt + new] token ids: the (left-padded) prompts, then each row's new tokens, its eos if
        it stopped there, and padding after it, as transformers returns them. `seed` makes sampling
        reproducible as `moeut generate --seed` does; without it sampling draws from torch's global RNG."""
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("generate needs input_ids of shape [batch, prompt length]")
        config = GenerationConfig.from_dict({**(generation_config or self.generation_config).to_dict()})
        explicit_max_length = "max_length" in kwargs and "max_new_tokens" not in kwargs
        unused = config.update(**{k: v for k, v in kwargs.items() if k not in TOLERATED_GENERATE_ARGS})
        if unused:
            raise ValueError(f"generate: {sorted(unused)[0]} is not a generation option moeut models support")
        for name, allowed in (("num_beams", 1), ("num_return_sequences", 1)):
            if (getattr(config, name, None) or 1) != allowed:
                raise ValueError(f"generate: {name}={getattr(config, name)} is not supported (greedy or sampling only)")
        for name in ("logits_processor", "prefix_allowed_tokens_fn", "assistant_model", "streamer"):
            if kwargs.get(name):
                raise ValueError(f"generate: {name} is not supported by moeut models")
        B, L = input_ids.shape
        if config.max_new_tokens is not None and not explicit_max_length:
            max_new = config.max_new_tokens
        else:
            max_new = max((config.max_length or 20) - L, 0)
        keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        starts = (~keep).sum(1).tolist()
        if not torch.equal(
            keep, torch.arange(L, device=keep.device)[None] >= torch.tensor(starts, device=keep.device)[:, None]
        ):
            raise ValueError(
                "generate: the attention mask is not left padding (pad at the start of each row); "
                "tokenize with padding_side='left'"
            )
        prompts = [input_ids[i, s:].tolist() for i, s in enumerate(starts)]
        eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
        pad = config.pad_token_id if config.pad_token_id is not None else (eos if eos is not None else 0)
        sample = bool(config.do_sample)
        new = moeut_generate(
            self.lm,
            prompts,
            max_new,
            temperature=(config.temperature or 1.0) if sample else 0.0,
            top_k=(config.top_k or 0) if sample else 0,
            top_p=(config.top_p or 1.0) if sample else 1.0,
            seed=seed,
            eos_id=eos,
        )
        rows = [row + ([eos] if eos is not None and len(row) < max_new else []) for row in new]
        width = max((len(r) for r in rows), default=0)
        out = torch.full((B, L + width), pad, dtype=input_ids.dtype, device=input_ids.device)
        out[:, :L] = input_ids
        for i, row in enumerate(rows):
            out[i, L : L + len(row)] = torch.tensor(row, dtype=input_ids.dtype)
        return out
