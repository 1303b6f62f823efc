"""Document sources: where the training text comes from.

A source is a small frozen dataclass of plain values (recipes build it with Fiddle, e.g.
``fdl.Config(TextFiles, globs=["data/**/*.txt"])``). Constructing one touches no files; the
scanning happens in ``documents()``. Every source has:

- ``documents() -> list``: cheap items, one per document (paths, ``(path, offset, line)`` tuples
  or integers), sorted and deterministic. Raises ``UserError`` when nothing matches.
- ``load(item) -> str | np.ndarray | dict``: the text of one document (``Synthetic``: int32 token
  ids; ``JsonlFiles(field=None)``: the whole JSON record, e.g. a fine-tuning example).
- ``where(item) -> str``: where the document is, for error messages (``path:line``).
- ``split`` ("train" or "eval") and ``eval_fraction``: a document is held out for eval when a
  stable hash of its key (its path relative to the glob's fixed prefix, plus the line number for
  JSONL) falls below ``eval_fraction``. With ``eval_fraction == 0`` every document is in the split
  asked for (no holdout). The two splits are disjoint and together cover every document.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Sequence

import numpy as np

from nnxlm.errors import UserError

SPLITS = ("train", "eval")
_WILDCARDS = frozenset("*?[")


def in_eval_split(key: str, eval_fraction: float) -> bool:
    """True when the document with this key is held out for eval (stable across machines)."""
    if eval_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < eval_fraction


def _keep(key: str, split: str, eval_fraction: float) -> bool:
    if eval_fraction <= 0.0:
        return True
    return in_eval_split(key, eval_fraction) == (split == "eval")


def _check_split(owner: str, split: str, eval_fraction: float) -> None:
    if split not in SPLITS:
        raise UserError(f"{owner}.split is {split!r}: use 'train' or 'eval'")
    if not 0.0 <= eval_fraction < 1.0:
        raise UserError(f"{owner}.eval_fraction is {eval_fraction}: use a number in [0, 1)")


def _as_tuple(owner: str, globs: Sequence[str] | str) -> tuple[str, ...]:
    out = (globs,) if isinstance(globs, (str, os.PathLike)) else tuple(globs)
    if not out:
        raise UserError(f"{owner}.globs is empty: give at least one file pattern")
    return tuple(os.fspath(g) for g in out)


def _glob_base(pattern: str) -> str:
    """The directory part of a glob before its first wildcard ('data/**/*.txt' -> 'data')."""
    parts = pattern.split(os.sep)
    fixed = []
    for part in parts[:-1]:
        if _WILDCARDS & set(part):
            break
        fixed.append(part)
    return os.sep.join(fixed) or ("/" if pattern.startswith(os.sep) else ".")


def _match_files(owner: str, globs: tuple[str, ...]) -> list[tuple[str, str]]:
    """Sorted, de-duplicated ``(path, key)`` pairs for every file the globs match."""
    found: dict[str, str] = {}
    for pattern in globs:
        expanded = os.path.expanduser(pattern)
        paths = [p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p)]
        if not paths:
            raise UserError(f"no files match {pattern!r} ({owner}.globs): check the path")
        base = _glob_base(expanded)
        for path in paths:
            key = os.path.relpath(path, base).replace(os.sep, "/")
            found.setdefault(os.path.normpath(path), key)
    return sorted(found.items())


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"data file {where} is not UTF-8 text (bad byte at offset {e.start}): "
            "convert it to UTF-8 or leave it out of the globs"
        ) from None


def _empty_split(owner: str, split: str) -> UserError:
    return UserError(f"the {split!r} split of {owner} has no documents: change eval_fraction or add data")


def read_text_file(path: str) -> str:
    """The UTF-8 text of a file; ``UserError`` naming the file when empty or not UTF-8."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"cannot read data file {path}: {e.strerror}") from None
    if not data:
        raise UserError(f"data file {path} is empty: delete it or leave it out of the globs")
    return _decode(data, path)


@dataclasses.dataclass(frozen=True)
class TextFiles:
    """Each file matching ``globs`` (recursive ``**`` allowed) is one UTF-8 document."""

    globs: Sequence[str]
    split: str = "train"
    eval_fraction: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "globs", _as_tuple("TextFiles", self.globs))
        _check_split("TextFiles", self.split, self.eval_fraction)

    def documents(self) -> list[str]:
        """File paths of this split, sorted."""
        docs = []
        for path, key in _match_files("TextFiles", self.globs):
            if os.path.getsize(path) == 0:
                raise UserError(f"data file {path} is empty: delete it or leave it out of the globs")
            if _keep(key, self.split, self.eval_fraction):
                docs.append(path)
        if not docs:
            raise _empty_split(f"TextFiles({list(self.globs)})", self.split)
        return docs

    def load(self, item: str) -> str:
        return read_text_file(item)


@dataclasses.dataclass(frozen=True)
class JsonlFiles:
    """Each non-blank line of the matching JSONL files is one document: ``json[field]``, or with
    ``field=None`` the whole JSON object (supervised fine-tuning examples: nnxlm.data.sft)."""

    globs: Sequence[str]
    field: str | None = "text"
    split: str = "train"
    eval_fraction: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "globs", _as_tuple("JsonlFiles", self.globs))
        _check_split("JsonlFiles", self.split, self.eval_fraction)

    def documents(self) -> list[tuple[str, int, int]]:
        """``(path, byte offset, 1-based line number)`` of every line of this split."""
        docs = []
        for path, key in _match_files("JsonlFiles", self.globs):
            offset = 0
            with open(path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip() and _keep(f"{key}:{lineno}", self.split, self.eval_fraction):
                        docs.append((path, offset, lineno))
                    offset += len(line)
        if not docs:
            raise _empty_split(f"JsonlFiles({list(self.globs)})", self.split)
        return docs

    def where(self, item: tuple[str, int, int]) -> str:
        return f"{item[0]}:{item[2]}"

    def load(self, item: tuple[str, int, int]) -> str | dict:
        path, offset, _ = item
        where = self.where(item)
        with open(path, "rb") as f:
            f.seek(offset)
            line = _decode(f.readline(), where)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where} is not valid JSON ({e.msg}): fix or remove the line") from None
        if self.field is None:
            if not isinstance(record, dict):
                raise UserError(f"{where} is not a JSON object: each line must be one example object")
            return record
        if not isinstance(record, dict) or self.field not in record:
            raise UserError(f"{where} has no field {self.field!r}: set JsonlFiles.field to the text field")
        text = record[self.field]
        if not isinstance(text, str):
            raise UserError(
                f"{where}: field {self.field!r} is {type(text).__name__}, not a string: "
                "set JsonlFiles.field to the text field"
            )
        return text


# encodings/ is mostly generated codec tables (cp720.py, ...): thousands of hex literals that
# would dominate a small eval split and teach nothing about Python.
_STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "__pycache__", "idlelib", "encodings"})
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})


@dataclasses.dataclass(frozen=True)
class PythonStdlib:
    """The running interpreter's own standard library ``.py`` files: a demo corpus, no download.

    Skips site-packages, idlelib and empty files, and test directories unless ``include_tests``.
    Keys are paths relative to the stdlib directory, so the split is the same on every machine
    with the same Python version.
    """

    split: str = "train"
    eval_fraction: float = 0.02
    include_tests: bool = False

    def __post_init__(self):
        _check_split("PythonStdlib", self.split, self.eval_fraction)

    def documents(self) -> list[str]:
        """Absolute paths of this split's files, sorted by relative path."""
        root = sysconfig.get_paths()["stdlib"]
        skip = _STDLIB_SKIP if self.include_tests else _STDLIB_SKIP | _TEST_DIRS
        docs = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in skip)
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if not name.endswith(".py") or os.path.getsize(path) == 0:
                    continue
                key = os.path.relpath(path, root).replace(os.sep, "/")
                if _keep(key, self.split, self.eval_fraction):
                    docs.append(path)
        if not docs:
            raise UserError(f"no Python standard library files found under {root}")
        return docs

    def load(self, item: str) -> str:
        return read_text_file(item)


_BRANCHING = 4  # successors per token in Synthetic's bigram table


@functools.lru_cache(maxsize=8)
def _bigram_table(seed: int, vocab_size: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 0x5EED])
    return rng.integers(3, vocab_size, size=(vocab_size, _BRANCHING), dtype=np.int32)


@dataclasses.dataclass(frozen=True)
class Synthetic:
    """Random documents of token ids from a fixed random bigram table (no tokenizer needed).

    Each token is followed by one of ``_BRANCHING`` (4) successors fixed by ``seed``, chosen
    uniformly, so the best achievable loss is about ln 4 ≈ 1.39 nats/token while the unigram
    entropy is about ln(vocab_size - 3): a tiny model's loss falls fast. Ids are in
    ``[3, vocab_size)``; 0, 1, 2 are pad, bos, eos. Lengths are uniform in
    ``[min_length, max_length]``. Document ``i`` depends only on ``(seed, i)``.
    """

    num_documents: int = 1000
    vocab_size: int = 256
    min_length: int = 16
    max_length: int = 256
    seed: int = 0
    split: str = "train"
    eval_fraction: float = 0.0

    def __post_init__(self):
        _check_split("Synthetic", self.split, self.eval_fraction)
        if self.vocab_size < 4:
            raise UserError(f"Synthetic.vocab_size is {self.vocab_size}: use at least 4")
        if not 1 <= self.min_length <= self.max_length:
            raise UserError(
                f"Synthetic lengths [{self.min_length}, {self.max_length}] are invalid: "
                "use 1 <= min_length <= max_length"
            )
        if self.num_documents < 1:
            raise UserError(f"Synthetic.num_documents is {self.num_documents}: use at least 1")

    def documents(self) -> list[int]:
        """Document indices of this split."""
        docs = [i for i in range(self.num_documents) if _keep(f"synthetic/{i}", self.split, self.eval_fraction)]
        if not docs:
            raise _empty_split("Synthetic", self.split)
        return docs

    def load(self, item: int) -> np.ndarray:
        """int32 token ids [length] of document ``item``."""
        table = _bigram_table(self.seed, self.vocab_size)
        rng = np.random.default_rng([self.seed, int(item)])
        length = int(rng.integers(self.min_length, self.max_length + 1))
        choices = rng.integers(0, _BRANCHING, size=length)
        ids = np.empty(length, dtype=np.int32)
        token = int(rng.integers(3, self.vocab_size))
        for t in range(length):
            ids[t] = token
            token = int(table[token, choices[t]])
        return ids
