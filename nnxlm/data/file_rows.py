"""Rows of record files (Parquet, ArrayRecord) as one lazy sequence of documents, and the
per-process cache of the readers that load them.

A file source counts each file's rows from its metadata (a Parquet footer, an ArrayRecord index),
never by reading the rows; ``FileRows`` then turns a document number into ``(path, row)`` with a
binary search over cumulative counts. Held-out rows (``eval_fraction > 0``) are chosen by
``split_mask`` in numpy: the index holds one int64 per kept row, and nothing per row otherwise.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from nnxlm.data.sources import PartsIndex, _empty_split, _match_files, split_mask


class FileRows(PartsIndex):
    """The rows of several files as one sequence of ``(path, row)`` items (row numbers from 0).

    ``counts[k]`` documents come from file ``k``: its first ``counts[k]`` rows, or with ``rows``
    (int64, every file's kept row numbers one file after another) the listed ones. Picklable
    (paths and numpy arrays), so grain can send it to worker processes.
    """

    def __init__(self, paths: list[str], counts: list[int], rows: np.ndarray | None = None):
        self.paths = paths
        self.ends = np.cumsum(counts, dtype=np.int64)
        self.rows = rows
        if rows is not None and len(rows) != len(self):
            raise ValueError(f"{len(rows)} row numbers for {len(self)} documents")

    def _item(self, part: int, i: int, local: int) -> tuple[str, int]:
        return (self.paths[part], int(self.rows[i]) if self.rows is not None else local)


def file_rows(
    owner: str, globs: tuple[str, ...], count_rows: Callable[[str], int], split: str, eval_fraction: float
) -> FileRows:
    """The rows of ``split`` of every file the globs match; ``count_rows(path)`` reads a file's
    row count from its metadata (and raises UserError for a bad file)."""
    paths, counts, rows = [], [], []
    for path, key in _match_files(owner, globs):
        count = count_rows(path)
        paths.append(path)
        if eval_fraction > 0.0:
            rows.append(np.flatnonzero(split_mask(key, np.arange(count), split, eval_fraction)))
            counts.append(len(rows[-1]))
        else:
            counts.append(count)
    kept = np.concatenate(rows).astype(np.int64) if rows else None
    index = FileRows(paths, counts, kept)
    if not len(index):
        raise _empty_split(f"{owner}({list(globs)})", split)
    return index


def one_line(error: BaseException, limit: int = 200) -> str:
    """A library's error message on one line (Arrow's and Riegeli's span several), shortened."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class PerProcessCache:
    """Least-recently-used open readers (or loaded blocks) by key, for this process only.

    Sources keep readers here rather than in themselves, so a source pickles as plain values; a
    forked grain worker starts with an empty cache instead of sharing its parent's file handles.
    ``size_of`` and ``max_size`` bound the total (e.g. bytes of cached row groups); the newest
    entry is always kept. grain reads with several threads: one lock guards the entries and the
    making of a missing one, so two threads never read the same block twice. An evicted entry is
    dropped, not closed: a thread may still be reading from it.
    """

    def __init__(self, max_size: int, size_of: Callable[[Any], int] = lambda _: 1):
        self.max_size, self.size_of = max_size, size_of
        self._reset()

    def _reset(self) -> None:
        self.entries: collections.OrderedDict = collections.OrderedDict()
        self.size = 0
        self.lock = threading.Lock()
        self.pid = os.getpid()

    def get(self, key, make: Callable[[], Any]):
        if self.pid != os.getpid():  # a forked child: the parent's readers and lock are not ours
            self._reset()
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return self.entries[key][0]
            value = make()
            size = self.size_of(value)
            self.entries[key] = (value, size)
            self.size += size
            while self.size > self.max_size and len(self.entries) > 1:
                _, (_, old_size) = self.entries.popitem(last=False)
                self.size -= old_size
            return value
