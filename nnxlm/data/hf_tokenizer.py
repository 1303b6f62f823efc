"""Hugging Face `tokenizer.json` files behind nnxlm's tokenizer interface (optional `tokenizers`).

The bos / eos / pad ids come from the special tokens named in tokenizer_config.json (or
special_tokens_map.json, or the model's config.json) beside the file (bos only where the
tokenizer's post-processor prepends it, as transformers encodes a text), and the chat template from
chat_template.jinja or tokenizer_config.json (nnxlm.data.chat).
"""

import json
import re
from collections.abc import Sequence

from etils import epath

from nnxlm.errors import UserError
from nnxlm.files import absolute, write_atomically

SPECIAL_NAMES = ("bos", "eos", "pad", "unk", "sep", "cls", "mask")


def _special_tokens(directory: str) -> dict[str, object]:
    found = {}
    for name in ("config.json", "special_tokens_map.json", "tokenizer_config.json"):  # later files win
        path = epath.Path(directory) / name
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise UserError(f"{path} is not readable JSON ({e}): fix or remove it") from None
            for key in SPECIAL_NAMES:
                for field in (f"{key}_token", f"{key}_token_id"):
                    value = data.get(field)
                    if isinstance(value, dict):
                        value = value.get("content")
                    if value is not None:
                        found[key] = value
    return found


def _decoder_steps(decoder: dict | None) -> list[dict]:
    """A tokenizer.json decoder's steps, a Sequence's flattened."""
    if not isinstance(decoder, dict):
        return []
    if decoder.get("type") == "Sequence":
        return [step for inner in decoder.get("decoders", []) for step in _decoder_steps(inner)]
    return [decoder]


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character of each byte -> the byte: printable Latin-1
    bytes stand for themselves, the others for code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF_CHAR = _byte_level_alphabet()


class HFTokenizer:
    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError(f"{path} needs the `tokenizers` package: pip install 'nnxlm[hf]'") from None
        try:  # read through epath (Tokenizer.from_file reads local files only)
            text = epath.Path(path).read_text()
            self._tokenizer = Tokenizer.from_str(text)
        except Exception as e:  # the Rust library raises its own exception type
            raise UserError(f"tokenizer file {path} is not a Hugging Face tokenizer.json ({e})") from None
        from nnxlm.data.chat import find_template

        self.path = path
        directory = absolute(path).parent
        special = _special_tokens(directory)
        self._ids = {key: self._to_id(value) for key, value in special.items()}
        self._skip = {i for key, i in self._ids.items() if i is not None and key in ("bos", "eos", "pad")}
        self.chat_template = find_template(directory)
        # how a token's text is written in the vocabulary, for token_bytes: byte-level BPE's stand-in
        # characters, or SentencePiece's (Llama 2, Mistral) "▁" for a space and <0xE6> byte pieces
        steps = _decoder_steps(json.loads(text).get("decoder"))  # the file as read, not serialized again
        kinds = {step.get("type") for step in steps}
        self._byte_level, self._byte_fallback = "ByteLevel" in kinds, "ByteFallback" in kinds
        self._space_mark = next(
            (
                step.get("replacement") if step["type"] == "Metaspace" else step.get("pattern", {}).get("String")
                for step in steps
                if step.get("type") == "Metaspace" or (step.get("type") == "Replace" and step.get("content") == " ")
            ),
            None,
        )
        self.tool_chat_template = find_template(directory, "tool_use")
        # a bos token is prepended where the tokenizer's own post-processor prepends it, as
        # transformers' tokenizer(text) does: a tokenizer may name a bos token it never adds
        probe = self._tokenizer.encode("a", add_special_tokens=True).ids
        self._adds_bos = self._ids.get("bos") is not None and probe[:1] == [self._ids["bos"]]

    def _to_id(self, token) -> int | None:
        return token if isinstance(token, int) else self._tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        """The token prepended to a text; None when the tokenizer prepends none (Qwen, or a bos
        token named but not added by the tokenizer's post-processor): nothing is prepended then."""
        return self._ids["bos"] if self._adds_bos else None

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

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, [(start, end) character range of each token]); special tokens' texts in `text`
        become those tokens, as transformers tokenizes a rendered chat template."""
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, [tuple(offset) for offset in encoding.offsets]

    def special_tokens(self) -> dict[str, str]:
        """The special tokens' texts, as chat templates name them (bos_token, eos_token, ...)."""
        tokens = {}
        for key, i in self._ids.items():
            if i is not None:
                tokens[f"{key}_token"] = self._tokenizer.id_to_token(i)
        return tokens

    def decode(self, ids: Sequence[int]) -> str:
        keep = [int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) not in self._skip]
        return self._tokenizer.decode(keep, skip_special_tokens=False)

    def token_bytes(self, i: int) -> bytes:
        """The UTF-8 bytes token i stands for (part of a character, for some byte-level tokens)."""
        token = self._tokenizer.id_to_token(int(i))
        if token is None:
            return b""
        if int(i) in self._skip:
            return token.encode("utf-8")  # special tokens are shown by name
        if self._byte_level and all(c in _BYTE_OF_CHAR for c in token):
            return bytes(_BYTE_OF_CHAR[c] for c in token)
        if self._byte_fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            return bytes([int(token[3:5], 16)])
        if self._space_mark:  # decoding the token alone would strip its leading space
            return token.replace(self._space_mark, " ").encode("utf-8")
        return self._tokenizer.decode([int(i)], skip_special_tokens=False).encode("utf-8")

    def serialized(self) -> bytes:
        """The bytes of the tokenizer.json file: what identifies the vocabulary (nnxlm.data.prepared)."""
        return epath.Path(self.path).read_bytes()

    def save(self, path: str) -> None:
        """Writes tokenizer.json atomically (a crash leaves any old file intact)."""
        write_atomically(path, self._tokenizer.to_str(pretty=True))

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"
