"""Hugging Face `tokenizer.json` files behind nnxlm's tokenizer interface (optional `tokenizers`).

The bos / eos / pad ids come from the special tokens named in tokenizer_config.json (or
special_tokens_map.json, or the model's config.json) beside the file.
"""

import json
import os
from collections.abc import Sequence

from nnxlm.errors import UserError


def _special_tokens(directory: str) -> dict[str, object]:
    found = {}
    for name in ("config.json", "special_tokens_map.json", "tokenizer_config.json"):  # later files win
        path = os.path.join(directory, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            for key in ("bos", "eos", "pad"):
                for field in (f"{key}_token", f"{key}_token_id"):
                    value = data.get(field)
                    if isinstance(value, dict):
                        value = value.get("content")
                    if value is not None:
                        found[key] = value
    return found


class HFTokenizer:
    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError(f"{path} needs the `tokenizers` package: pip install 'nnxlm[hf]'") from None
        try:
            self._tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # the Rust library raises its own exception type
            raise UserError(f"tokenizer file {path} is not a Hugging Face tokenizer.json ({e})") from None
        self.path = path
        special = _special_tokens(os.path.dirname(os.path.abspath(path)))
        self._ids = {key: self._to_id(value) for key, value in special.items()}
        self._skip = {i for i in self._ids.values() if i is not None}

    def _to_id(self, token) -> int | None:
        return token if isinstance(token, int) else self._tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        """None when the model uses no bos token (Qwen): nothing is prepended then."""
        return self._ids.get("bos")

    @property
    def eos_id(self) -> int:
        if self._ids.get("eos") is None:
            raise UserError(f"{self.path}: no eos token is named in tokenizer_config.json or config.json")
        return self._ids["eos"]

    @property
    def pad_id(self) -> int:
        return self._ids.get("pad") if self._ids.get("pad") is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        keep = [int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) not in self._skip]
        return self._tokenizer.decode(keep, skip_special_tokens=False)

    def save(self, path: str) -> None:
        self._tokenizer.save(path)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"
