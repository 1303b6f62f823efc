"""Document sources: where the training text comes from.

A source is a small frozen dataclass of plain values (recipes build it with Fiddle, e.g.
``fdl.Config(TextFiles, globs=["data/**/*.txt"])``). Constructing one touches no files; the
scanning happens in ``documents()``. Every source has:

- ``documents() -> Sequence``: cheap items, one per document (paths, ``(path, offset, line)``
  tuples or integers), in a deterministic order. It supports ``len`` and indexing and may be lazy
  (a ``range``, a numpy array, an index over files): nothing here holds a Python object per
  document, so start-up time and memory stay small for millions of documents. Raises
  ``UserError`` when nothing matches.
- ``load(item) -> str | np.ndarray | dict``: the text of one document (``Synthetic``: int32 token
  ids; ``JsonlFiles(field=None)``: the whole JSON record, e.g. a fine-tuning example).
- ``where(item) -> str``: where the document is, for error messages (``path:line``).
- ``split`` ("train" or "eval") and ``eval_fraction``: a document is held out for eval when a
  stable hash of its key (its path relative to the glob's fixed prefix; for rows of a file, that
  path and the row number, see ``split_mask``) falls below ``eval_fraction``. With
  ``eval_fraction == 0`` every document is in the split asked for (no holdout). The two splits
  are disjoint and together cover every document.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import glob
import hashlib
import json
import mmap
import operator
import os
import sysconfig
from collections.abc import Sequence

import numpy as np
from etils import epath

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


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a bijective scramble of uint64 values."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def split_mask(key: str, rows: np.ndarray, split: str, eval_fraction: float) -> np.ndarray:
    """bool [n]: which rows of the file with this key belong to ``split``.

    For sources with many documents a file (JSON Lines, Parquet, ArrayRecord): the row numbers
    (JSONL: 1-based line numbers) are hashed with the file's key in numpy, so ten million rows
    take well under a second. Stable across machines; held out when the hash < eval_fraction.
    """
    rows = np.asarray(rows, dtype=np.uint64)
    if eval_fraction <= 0.0:
        return np.ones(rows.shape, dtype=bool)
    seed = np.uint64(int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big"))
    with np.errstate(over="ignore"):
        hashed = _mix64(seed ^ _mix64(rows + np.uint64(0x9E3779B97F4A7C15)))
    held_out = (hashed >> np.uint64(11)).astype(np.float64) / 2.0**53 < eval_fraction
    return held_out if split == "eval" else ~held_out


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
    """The directory part of a glob before its first wildcard ('data/**/*.txt' -> 'data',
    'gs://bucket/c4/*.json' -> 'gs://bucket/c4')."""
    parts = pattern.split("/")
    fixed = []
    for part in parts[:-1]:
        if _WILDCARDS & set(part):
            break
        fixed.append(part)
    return "/".join(fixed) or ("/" if pattern.startswith("/") else ".")


def _is_remote(path: str) -> bool:
    return "://" in path


def _glob(pattern: str) -> list[str]:
    """Files matching ``pattern``, local or any filesystem ``etils.epath`` reaches (``gs://``...)."""
    if not _is_remote(pattern):  # the standard glob: hidden files stay out of wildcards, as in a shell
        return [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    base = _glob_base(pattern)
    parts = [part for part in pattern[len(base) :].split("/") if part]
    return [os.fspath(p) for p in _walk(epath.Path(base), parts) if p.is_file()]


def _walk(folder: epath.Path, parts: list[str]) -> list[epath.Path]:
    """Paths under ``folder`` matching the glob ``parts`` ("**" = any depth), listing one folder at
    a time (epath's own glob refuses "**" on object stores)."""
    if not parts:
        return [folder]
    head, rest = parts[0], parts[1:]
    if not _WILDCARDS & set(head):
        child = folder / head
        return _walk(child, rest) if child.exists() else []
    if not folder.is_dir():
        return []
    children = sorted(folder.iterdir())
    if head == "**":  # zero folders, or one more and still "**"
        return _walk(folder, rest) + [p for c in children if c.is_dir() for p in _walk(c, parts)]
    hits = [c for c in children if fnmatch.fnmatchcase(c.name, head) and not c.name.startswith(".")]
    return [p for c in hits for p in _walk(c, rest)]


def _match_files(owner: str, globs: tuple[str, ...]) -> list[tuple[str, str]]:
    """Sorted, de-duplicated ``(path, key)`` pairs for every file the globs match; the key is the
    path relative to the glob's fixed prefix (what the eval split hashes)."""
    found: dict[str, str] = {}
    for pattern in globs:
        expanded = pattern if _is_remote(pattern) else os.path.expanduser(pattern)
        paths = _glob(expanded)
        if not paths:
            raise UserError(f"no files match {pattern!r} ({owner}.globs): check the path")
        base = _glob_base(expanded)
        for path in paths:
            if _is_remote(path):
                found.setdefault(path, path[len(base) :].lstrip("/"))
            else:
                found.setdefault(os.path.normpath(path), os.path.relpath(path, base).replace(os.sep, "/"))
    return sorted(found.items())


# A byte order mark some editors write at the start of a UTF-8 file: a mark, not text (Python's
# utf-8-sig reading), so it is left out of the first document or line.
BOM = "\ufeff"


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"data file {where} is not UTF-8 text (bad byte at offset {e.start}): "
            "convert it to UTF-8 or leave it out of the globs"
        ) from None


def _empty_split(owner: str, split: str) -> UserError:
    fix = "raise eval_fraction or add data" if split == "eval" else "add data (or lower eval_fraction, if set)"
    return UserError(f"the {split!r} split of {owner} has no documents: {fix}")


def read_text_file(path: str) -> str:
    """The UTF-8 text of a file; ``UserError`` naming the file when empty or not UTF-8."""
    try:
        data = epath.Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read data file {path}: {e.strerror or e}") from None
    if not data:
        raise UserError(f"data file {path} is empty: delete it or leave it out of the globs")
    return _decode(data, path).removeprefix(BOM)


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
            if epath.Path(path).stat().length == 0:
                raise UserError(f"data file {path} is empty: delete it or leave it out of the globs")
            if _keep(key, self.split, self.eval_fraction):
                docs.append(path)
        if not docs:
            raise _empty_split(f"TextFiles({list(self.globs)})", self.split)
        return docs

    def load(self, item: str) -> str:
        return read_text_file(item)


_SCAN_BYTES = 1 << 24  # JSONL files are scanned 16 MiB at a time
_BLANK = np.zeros(256, dtype=bool)
_BLANK[list(b" \t\n\r\x0b\x0c")] = True  # what bytes.strip() removes


def _filled(data: np.ndarray) -> bool:
    """Whether bytes hold anything but whitespace."""
    return bool(len(data)) and not bool(np.all(_BLANK[data]))


def scan_lines(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(byte offsets int64 [n], 1-based line numbers int32 [n]) of the non-blank lines of a file,
    found with numpy a chunk at a time: ten million short lines take a few seconds."""
    offsets, lines = [], []
    base = line = 0
    tail_start, tail_filled = 0, False  # the line still open at the end of the last chunk
    with epath.Path(path).open("rb") as f:
        while chunk := f.read(_SCAN_BYTES):
            data = np.frombuffer(chunk, dtype=np.uint8)
            ends = np.flatnonzero(data == 10)  # each "\n"
            if len(ends):
                starts = np.concatenate([[0], ends[:-1] + 1])
                # A line is filled when its first byte is (JSON lines start with "{"); the few that
                # start with whitespace, and the first (it began in the last chunk), are checked whole.
                nonblank = (starts < ends) & ~_BLANK[data[np.minimum(starts, len(data) - 1)]]
                for j in np.flatnonzero(~nonblank & (starts < ends)):
                    nonblank[j] = _filled(data[starts[j] : ends[j]])
                nonblank[0] = tail_filled or _filled(data[: ends[0]])
                offsets.append((base + np.concatenate([[tail_start - base], ends[:-1] + 1]))[nonblank])
                lines.append((line + 1 + np.arange(len(ends), dtype=np.int32))[nonblank])
                tail_start, tail_filled = base + int(ends[-1]) + 1, False
                line += len(ends)
            tail_filled = tail_filled or _filled(data[int(ends[-1]) + 1 if len(ends) else 0 :])
            base += len(chunk)
    if tail_filled:  # a last line without a newline
        offsets.append(np.array([tail_start], dtype=np.int64))
        lines.append(np.array([line + 1], dtype=np.int32))
    return _joined(offsets, np.int64), _joined(lines, np.int32)


def _joined(parts: list[np.ndarray], dtype) -> np.ndarray:
    """One array of the parts (the part itself when there is one: no copy of a large index)."""
    if len(parts) == 1:
        return parts[0].astype(dtype, copy=False)
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


def _map(path: str) -> mmap.mmap:
    with open(path, "rb") as f:  # a local file (remote ones are read line by line below)
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


_mapped = None  # open memory maps of local JSON Lines files, by path, per process


def _read_line(path: str, offset: int) -> bytes:
    """The bytes of the line at ``offset``: from a memory map of a local file (reads from several
    grain threads need no shared file position), else by opening the file there."""
    global _mapped
    if _is_remote(path):
        with epath.Path(path).open("rb") as f:
            f.seek(offset)
            return f.readline()
    if _mapped is None:
        from nnxlm.data.file_rows import PerProcessCache

        _mapped = PerProcessCache(max_size=64)
    stat = os.stat(path)  # a file rewritten (or another one at this relative path) is mapped anew
    mapped = _mapped.get((os.path.abspath(path), stat.st_size, stat.st_mtime_ns), lambda: _map(path))
    end = mapped.find(b"\n", offset)
    return mapped[offset : len(mapped) if end < 0 else end + 1]


class PartsIndex(Sequence):
    """A lazy sequence of the documents of several parts (files, sources) one after another:
    ``ends`` holds the cumulative counts, and a subclass says what item ``i`` (the ``local``-th
    of part ``part``) is. Plain values and numpy arrays only, so grain can send it to workers."""

    ends: np.ndarray

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = operator.index(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} of {len(self)}")
        part = int(np.searchsorted(self.ends, i, side="right"))
        return self._item(part, i, i - (int(self.ends[part - 1]) if part else 0))

    def _item(self, part: int, i: int, local: int):
        raise NotImplementedError


class LineIndex(PartsIndex):
    """The lines of several files as one lazy sequence of ``(path, offset, line)`` items."""

    def __init__(self, paths: list[str], offsets: list[np.ndarray], lines: list[np.ndarray]):
        self.paths = paths
        self.ends = np.cumsum([len(o) for o in offsets], dtype=np.int64)
        self.offsets, self.lines = _joined(offsets, np.int64), _joined(lines, np.int32)

    def _item(self, part: int, i: int, local: int) -> tuple[str, int, int]:
        return (self.paths[part], int(self.offsets[i]), int(self.lines[i]))


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

    def documents(self) -> LineIndex:
        """``(path, byte offset, 1-based line number)`` of every non-blank line of this split,
        indexed lazily (numpy arrays of offsets and line numbers, ~12 bytes a line)."""
        paths, offsets, lines = [], [], []
        for path, key in _match_files("JsonlFiles", self.globs):
            file_offsets, file_lines = scan_lines(path)
            if self.eval_fraction > 0.0:
                keep = split_mask(key, file_lines, self.split, self.eval_fraction)
                file_offsets, file_lines = file_offsets[keep], file_lines[keep]
            paths.append(path)
            offsets.append(file_offsets)
            lines.append(file_lines)
        index = LineIndex(paths, offsets, lines)
        if not len(index):
            raise _empty_split(f"JsonlFiles({list(self.globs)})", self.split)
        return index

    def where(self, item: tuple[str, int, int]) -> str:
        return f"{item[0]}:{item[2]}"

    def load(self, item: tuple[str, int, int]) -> str | dict:
        path, offset, _ = item
        where = self.where(item)
        line = _decode(_read_line(path, offset), where)
        if offset == 0:
            line = line.removeprefix(BOM)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where} is not valid JSON ({e.msg}): fix or remove the line") from None
        if self.field is None:
            if not isinstance(record, dict):
                raise UserError(f"{where} is not a JSON object: each line must be one example object")
            return record
        if not isinstance(record, dict):
            kind = {list: "an array", str: "a string", bool: "a boolean"}.get(type(record), "a number or null")
            raise UserError(
                f"{where} is {kind}, not a JSON object: each line must be one object with a {self.field!r} field"
            )
        if self.field not in record:
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

    yields_token_ids = True  # no tokenizer: the run needs none

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

    def documents(self) -> Sequence[int]:
        """Document indices of this split (a range, or the kept indices)."""
        if self.eval_fraction <= 0.0:
            return range(self.num_documents)
        docs = np.flatnonzero(split_mask("synthetic", np.arange(self.num_documents), self.split, self.eval_fraction))
        if not len(docs):
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
