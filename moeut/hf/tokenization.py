"""A run's SentencePiece model as a transformers tokenizer that encodes and decodes exactly as
`moeut.train.tokenizer.Tokenizer` does.

transformers' Python tokenizers first cut the text at special-token strings, then tokenize the pieces,
and decode by joining token strings with a clean-up of spaces. Both would change what SentencePiece does
with the whole text, so here the whole text goes to SentencePiece (`split_special_tokens=True`) and
decoding is SentencePiece's decode of the ids. No begin/end token is added when encoding, as in training;
the end-of-text id (SentencePiece's eos) is the eos and padding token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import sentencepiece as spm
from transformers import PreTrainedTokenizer

VOCAB_FILE = "tokenizer.model"


class MoEUTTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, **kwargs):
        self.vocab_file = str(vocab_file)
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(Path(vocab_file).read_bytes())
        eos = self.sp.id_to_piece(self.sp.eos_id()) if self.sp.eos_id() >= 0 else None
        unk = self.sp.id_to_piece(self.sp.unk_id()) if self.sp.unk_id() >= 0 else None
        for key, value in (("eos_token", eos), ("pad_token", eos), ("unk_token", unk)):
            kwargs.setdefault(key, value)
        kwargs.setdefault("padding_side", "left")  # batched generation: prompts end at the same column
        kwargs["split_special_tokens"] = True
        kwargs["clean_up_tokenization_spaces"] = False
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def get_vocab(self) -> Dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text: str, **kwargs) -> List[str]:
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        return self.sp.decode_pieces(tokens)

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        return self.sp.decode(ids)

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> Tuple[str]:
        path = Path(save_directory) / ((filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE)
        path.write_bytes(self.sp.serialized_model_proto())
        return (str(path),)
