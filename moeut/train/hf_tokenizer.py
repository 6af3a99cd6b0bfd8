"""A Hugging Face tokenizer (`tokenizer.json`, the `tokenizers` library) as a run's tokenizer, with the
interface of `tokenizer.Tokenizer`: `--tokenizer path/to/tokenizer.json` or a directory holding one
(and optionally its tokenizer_config.json), read from disk, never from the network.

Special tokens written in a document's text are tokenized as text (`encode_special_tokens`), as the
SentencePiece path does: only the separator the data pipeline adds is the separator. Documents are
separated by the tokenizer's end-of-text token: tokenizer_config.json's `eos_token`
when the directory has one, else the first of EOS_NAMES the vocabulary holds; a tokenizer with
neither is refused by name. Token ids are cached as uint16, so the vocabulary (added tokens counted)
must be at most 65535. A run keeps the tokenizer as `tokenizer.json` and the chosen end-of-text token
in `tokenizer_config.json` (`save`), which `moeut export` hands on, so that `AutoTokenizer` loads the
same tokenizer, fast, with transformers alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from moeut.files import FileProblem, parse_json, read_bytes, write_file_atomic

JSON_FILE, CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>", "[SEP]")
MAX_BYTES = 256 << 20
MAX_VOCAB = 65535
_PROBE = " a  b\n\tc 12 \ufb01"


def is_hf_tokenizer(path: str | Path) -> bool:
    """A tokenizer.json file, or a directory holding one."""
    path = Path(path)
    return (path.is_file() and path.name.endswith(".json")) or (path.is_dir() and (path / JSON_FILE).is_file())


def _eos_of_config(config: dict) -> Optional[str]:
    eos = config.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


class HFTokenizer:
    """A `tokenizers` tokenizer with the interface of `tokenizer.Tokenizer` (kind "hf")."""

    kind = "hf"

    def __init__(
        self, path: Optional[str | Path] = None, json_bytes: Optional[bytes] = None, eos_token: Optional[str] = None
    ):
        from tokenizers import Tokenizer as Backend

        if (path is None) == (json_bytes is None):
            raise ValueError("give exactly one of path and json_bytes")
        where = str(path) if path is not None else "tokenizer.json"
        try:
            if path is not None:
                path = Path(path)
                file = path / JSON_FILE if path.is_dir() else path
                json_bytes = read_bytes(file, MAX_BYTES, what=f"tokenizer {file}")
                config = path / CONFIG_FILE if path.is_dir() else path.with_name(CONFIG_FILE)
                if eos_token is None and config.is_file():
                    eos_token = _eos_of_config(parse_json(read_bytes(config, 1 << 20), str(config), 1 << 20) or {})
            parse_json(json_bytes, where, MAX_BYTES, max_depth=32)  # bounded before the Rust parser sees it
            self.backend = Backend.from_str(json_bytes.decode("utf-8"))
            self.backend.encode_special_tokens = True  # a document's literal "</s>" is text, not a separator
        except FileProblem as e:
            raise ValueError(str(e)) from None
        except Exception as e:  # the library's parse errors
            raise ValueError(f"{where} is not a Hugging Face tokenizer.json ({str(e)[:200]})") from None
        self.json_bytes = json_bytes
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        if self.vocab_size > MAX_VOCAB:
            raise ValueError(
                f"{where} has {self.vocab_size} tokens; moeut caches token ids as 16-bit numbers, so at "
                f"most {MAX_VOCAB} (train a smaller tokenizer, or use --tokenizer code)"
            )
        vocab = self.backend.get_vocab(with_added_tokens=True)
        names = [eos_token] if eos_token else [n for n in EOS_NAMES if n in vocab]
        if not names or names[0] not in vocab:
            raise ValueError(
                f"{where}: no end-of-text token to separate documents (no eos_token in its "
                f"{CONFIG_FILE}, none of {', '.join(EOS_NAMES)} in its vocabulary)"
            )
        self.eos_token = names[0]
        self.eot_id = vocab[self.eos_token]
        self.lossless = self.decode(self.encode(_PROBE)) == _PROBE

    def encode(self, text: str) -> List[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode_documents(self, texts: Sequence[str]) -> List[List[int]]:
        """Each document's ids followed by the end-of-text id."""
        return [ids + [self.eot_id] for ids in self.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([int(i) for i in ids if int(i) != self.eot_id], skip_special_tokens=False)

    def model_bytes(self) -> bytes:
        """What names this tokenizer in the token cache's key: its JSON and its end-of-text token."""
        return self.json_bytes + b"\0eos:" + self.eos_token.encode()

    def save(self, run_dir: Path) -> None:
        """tokenizer.json and a tokenizer_config.json naming the end-of-text token, into a run directory."""
        write_file_atomic(Path(run_dir) / JSON_FILE, self.json_bytes)
        write_file_atomic(
            Path(run_dir) / CONFIG_FILE,
            json.dumps(
                {
                    "eos_token": self.eos_token,
                    "pad_token": self.eos_token,
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "clean_up_tokenization_spaces": False,
                    "split_special_tokens": True,
                },
                indent=2,
            ).encode()
            + b"\n",
        )
