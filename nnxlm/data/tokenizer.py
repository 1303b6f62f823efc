"""Tokenizers: a small protocol and a SentencePiece BPE tokenizer that round-trips code exactly.

Special ids of ``SentencePieceTokenizer.train``: pad = 0, bos = 1, eos = 2, unk = 3 (never
produced: unknown characters fall back to byte pieces), then "\\n" = 4, then 256 byte pieces
``<0x00>``..``<0xFF>``, then the learned pieces. ``encode`` adds no bos/eos; the data pipeline
adds them.

Exact round trip (``decode(encode(s)) == s`` for any str) comes from: identity normalization,
no whitespace stripping or dummy prefix, byte fallback for unseen characters, newline as a
user-defined piece (training sees one line a sentence, so no piece crosses a line end),
whitespace-only pieces for indentation, and a literal "▁" (which SentencePiece uses for space)
encoded as its three byte pieces.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, runtime_checkable

import sentencepiece as spm
from etils import epath

from nnxlm.errors import UserError
from nnxlm.files import absolute, write_atomically

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
_SPACE_MARK = "\u2581"  # "▁": SentencePiece's escape for " "
# The files of a tokenizer: the vocabulary (one of the first two) and what travels with it.
# (transformers saves a tokenizer's named chat templates as chat_template.jinja, the default, and
# additional_chat_templates/<name>.jinja; nnxlm reads "tool_use", see nnxlm.data.chat)
COMPANION_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "additional_chat_templates/tool_use.jinja",
)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", *COMPANION_FILES)


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and generation need from a tokenizer (HF adapters can follow)."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    @property
    def bos_id(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]: ...
    def special_tokens(self) -> dict[str, str]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def save(self, path: str) -> None: ...


class SentencePieceTokenizer:
    """A SentencePiece model held in memory (picklable, so grain workers can use it).

    chat_template: the Jinja chat template kept beside the model file, if any (nnxlm.data.chat).
    """

    def __init__(self, model_proto: bytes, chat_template: str | None = None, tool_chat_template: str | None = None):
        """Wraps a serialized SentencePiece ModelProto; ``ValueError`` when it is not one."""
        self.chat_template, self.tool_chat_template = chat_template, tool_chat_template
        self._proto = bytes(model_proto)
        if not self._proto:  # SentencePiece takes an empty proto, then fails at its first use
            raise ValueError("it is empty")
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
            self._n = self._sp.get_piece_size()
        except (RuntimeError, OSError, TypeError) as e:
            raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        byte_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_MARK.encode("utf-8")]
        self._mark_ids = byte_ids if self._sp.unk_id() not in byte_ids else None
        self._skip = {i for i in (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()) if i >= 0}

    # -- properties ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of pieces (model embedding tables may be padded beyond it)."""
        return self._n

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    # -- encode / decode ----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos)."""
        if _SPACE_MARK not in text or self._mark_ids is None:
            return self._sp.encode(text)
        out: list[int] = []
        for i, part in enumerate(text.split(_SPACE_MARK)):
            if i:
                out.extend(self._mark_ids)
            if part:
                out.extend(self._sp.encode(part))
        return out

    def special_tokens(self) -> dict[str, str]:
        """The special tokens' texts, as chat templates name them (bos_token, eos_token, ...)."""
        ids = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id, "unk_token": self.unk_id}
        return {name: self._sp.id_to_piece(i) for name, i in ids.items() if i >= 0}

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, [(start, end) character range of each token]) of text in which the special tokens'
        texts (bos, eos, pad: "<s>", "</s>", ...) stand for those tokens, as a chat template writes them."""
        specials = {piece: self._sp.piece_to_id(piece) for piece in self.special_tokens().values()}
        specials.pop(self._sp.id_to_piece(self.unk_id), None)
        ids, offsets, start = [], [], 0
        while start < len(text):
            found = [(text.find(piece, start), piece) for piece in specials if piece]
            found = [(at, piece) for at, piece in found if at >= 0]
            end = min(found)[0] if found else len(text)
            if end > start:
                part_ids = self.encode(text[start:end])
                ids += part_ids
                offsets += _char_offsets(text[start:end], [self._piece_bytes(i) for i in part_ids], start)
            if found:
                at, piece = min(found)
                ids.append(specials[piece])
                offsets.append((at, at + len(piece)))
                end = at + len(piece)
            start = end
        return ids, offsets

    def _piece_bytes(self, i: int) -> int:
        """How many UTF-8 bytes of text token i stands for."""
        piece = self._sp.id_to_piece(i)
        if self._sp.is_byte(i):
            return 1
        return len(piece.replace(_SPACE_MARK, " ").encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, skipping pad/bos/eos, negative ids and ids >= ``vocab_size``."""
        keep = [int(i) for i in ids]
        keep = [i for i in keep if 0 <= i < self._n and i not in self._skip]
        return self._sp.decode(keep)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def token_bytes(self, i: int) -> bytes:
        """The UTF-8 bytes token i stands for (one byte of a character, for a byte token)."""
        piece = self._sp.id_to_piece(int(i))
        if self._sp.is_byte(int(i)):  # "<0xF0>"
            return bytes([int(piece[3:5], 16)])
        if int(i) in self._skip or self._sp.is_control(int(i)):
            return piece.encode("utf-8")  # "</s>": special tokens are shown by name
        return piece.replace(_SPACE_MARK, " ").encode("utf-8")

    # -- persistence --------------------------------------------------------------------------
    def serialized(self) -> bytes:
        """The model as its ``.model`` file holds it: what identifies the vocabulary (a hash of it
        tells prepared data which tokenizer made its ids, nnxlm.data.prepared)."""
        return self._proto

    def save(self, path: str) -> None:
        """Writes the ``.model`` file (atomically: a crash leaves any old file intact)."""
        write_atomically(path, self._proto)

    @classmethod
    def load(cls, path: str) -> SentencePieceTokenizer:
        """Reads a ``.model`` file (and the chat template beside it); ``UserError`` when missing or
        not a SentencePiece model."""
        try:
            data = epath.Path(path).read_bytes()
        except FileNotFoundError:
            raise UserError(
                f"tokenizer file {path} does not exist: fix the path or train one with `nnxlm tokenizer train`"
            ) from None
        except OSError as e:
            raise UserError(f"cannot read tokenizer file {path}: {e.strerror}") from None
        from nnxlm.data.chat import find_template

        try:
            directory = absolute(path).parent
            return cls(data, find_template(directory), find_template(directory, "tool_use"))
        except ValueError as e:
            raise UserError(
                f"tokenizer file {path} is not a SentencePiece model: {e}; point to a .model file or train a new one"
            ) from None

    def __getstate__(self):
        return {
            "proto": self._proto,
            "chat_template": self.chat_template,
            "tool_chat_template": self.tool_chat_template,
        }

    def __setstate__(self, state):
        self.__init__(state["proto"], state.get("chat_template"), state.get("tool_chat_template"))

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(vocab_size={self._n})"

    # -- training -----------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, max_chars: int = 20_000_000) -> SentencePieceTokenizer:
        """Trains a byte-fallback BPE model in memory on the first ``max_chars`` of ``texts``.

        ``vocab_size`` counts every piece, including the 4 specials, "\\n" and the 256 bytes, so
        it must exceed ~261 plus the number of distinct characters kept (use >= 512). A small
        corpus may give fewer pieces than asked (``hard_vocab_limit=False``). About 0.5 s for
        5 M characters of Python at vocab 8192 on 2 CPU cores.
        """
        if vocab_size < 262:
            raise UserError(
                f"tokenizer vocab_size {vocab_size} is too small: use at least 512 "
                "(261 ids go to specials, newline and the 256 bytes)"
            )
        seen, failed = [0], []
        writer = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_lines(texts, max_chars, seen, failed),
                model_writer=writer,
                model_type="bpe",
                vocab_size=vocab_size,
                hard_vocab_limit=False,
                pad_id=PAD_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                unk_id=UNK_ID,
                user_defined_symbols=["\n"],
                byte_fallback=True,
                character_coverage=0.9995,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                allow_whitespace_only_pieces=True,
                split_digits=False,
                max_sentence_length=1 << 16,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as e:
            if failed:  # the texts themselves raised (a bad data file): that error, not SentencePiece's
                raise failed[0] from None
            if seen[0] == 0:
                raise UserError("no text to train the tokenizer on: give non-empty texts") from None
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown error"
            raise UserError(f"SentencePiece training failed ({msg}): check vocab_size and the texts") from None
        return cls(writer.getvalue())


def _lines(texts: Iterable[str], max_chars: int, seen: list[int], failed: list) -> Iterator[str]:
    """Lines of ``texts`` without their "\\n" (one sentence each), stopping after ``max_chars``; an
    error raised by ``texts`` is kept in ``failed`` (SentencePiece would replace it by its own)."""
    total = 0
    try:
        for text in texts:
            for line in text.split("\n"):
                if line:
                    seen[0] += 1
                    yield line
            total += len(text)
            if total >= max_chars:
                return
    except Exception as e:
        failed.append(e)
        raise


def _char_offsets(text: str, byte_lengths: list[int], base: int) -> list[tuple[int, int]]:
    """Character ranges (plus base) of consecutive tokens covering text's UTF-8 bytes in order; a
    token inside one character (a byte piece) gets that character's range."""
    char_of_byte = []
    for index, char in enumerate(text):
        char_of_byte += [index] * len(char.encode("utf-8"))
    char_of_byte.append(len(text))
    offsets, position = [], 0
    for length in byte_lengths:
        first = char_of_byte[min(position, len(char_of_byte) - 1)]
        last = char_of_byte[min(position + length, len(char_of_byte)) - 1] + 1 if length else first
        offsets.append((base + first, base + max(last, first)))
        position += length
    return offsets


def find_tokenizer(run_dir: str, tokenizer_path: str | None = None) -> str:
    """The tokenizer file of a run: `tokenizer_path` if given, else the run directory's
    tokenizer.model or tokenizer.json (the default path tokenizer.model when neither exists)."""
    if tokenizer_path:
        return tokenizer_path
    for name in ("tokenizer.model", "tokenizer.json"):
        if (epath.Path(run_dir) / name).exists():
            return str(epath.Path(run_dir) / name)
    return str(epath.Path(run_dir) / "tokenizer.model")


def load_tokenizer(path: str):
    """A SentencePiece ``.model`` file, or a Hugging Face ``tokenizer.json`` (needs ``tokenizers``)."""
    if os.fspath(path).endswith(".json"):
        from nnxlm.data.hf_tokenizer import HFTokenizer

        if not epath.Path(path).exists():
            raise UserError(f"tokenizer file {path} does not exist: fix the path")
        return HFTokenizer(os.fspath(path))
    return SentencePieceTokenizer.load(path)
