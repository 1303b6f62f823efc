"""The grain pipeline: documents -> token ids -> packed rows -> batches.

``make_dataset`` builds::

    MapDataset.source(source.documents())
      .shuffle(seed)                      # if shuffle; a new order every epoch
      .repeat()                           # if repeat: infinite epochs
      [shard_index::shard_count]          # this data-parallel shard's documents
      .map(LoadAndTokenize)               # {"tokens": [bos, *ids, eos]} int32
      .to_iter_dataset(READ_OPTIONS)     # a bounded read-ahead
      ConcatThenSplitIterDataset          # rows of seq_len + 1 tokens + segment ids, positions
      .batch(batch_size, drop_remainder=True)
      .map(ToBatch)                       # the final batch dict below
      .mp_prefetch(num_workers)           # only if num_workers > 0

Each batch is a dict of numpy arrays, all ``[batch_size, seq_len]``:

- ``inputs``  int32: tokens[:, :-1] of each packed row
- ``targets`` int32: tokens[:, 1:]
- ``segment_ids`` int32 of the inputs: 0 is padding, document pieces numbered from 1 in a row
- ``positions`` int32 of the inputs: position within its document piece, from 0
- ``loss_mask`` float32: 1 where the target continues the same document piece (not padding)

A document longer than a row continues in the next row (its piece there starts at position 0).
The iterator supports ``get_state()`` / ``set_state()`` for exact resumption (same worker count).
"""

from __future__ import annotations

import math
from typing import Any

import grain
import numpy as np
from grain import experimental as gx

from nnxlm.data.mixture import Mixture, Tagged
from nnxlm.data.tokenizer import BOS_ID, EOS_ID
from nnxlm.errors import UserError


class LoadAndTokenize(grain.transforms.Map):
    """Document item -> ``{"tokens": int32 [n + 2]}`` = bos, ids, eos (no bos when the tokenizer
    has none, as Qwen's)."""

    def __init__(self, source: Any, tokenizer: Any | None):
        self.source = source
        self.tokenizer = tokenizer
        self.bos = BOS_ID if tokenizer is None else tokenizer.bos_id
        self.eos = EOS_ID if tokenizer is None else tokenizer.eos_id

    def map(self, item: Any) -> dict[str, np.ndarray]:
        ids = document_ids(self.source, self.tokenizer, item)
        bos = [] if self.bos is None else [self.bos]
        tokens = np.concatenate([np.asarray(bos, np.int32), ids.astype(np.int32, copy=False), [self.eos]])
        if isinstance(self.source, Mixture):  # 1 + the source's index on a document's first token
            first = np.zeros(len(tokens), np.int32)
            first[0] = 1 + item[0]
            return {"tokens": tokens.astype(np.int32), "mixture": first}
        return {"tokens": tokens.astype(np.int32)}


def document_ids(source: Any, tokenizer: Any | None, item: Any) -> np.ndarray:
    """int32 token ids [n] of one document of ``source`` (no bos/eos)."""
    doc = source.load(item)
    if isinstance(doc, str):
        if tokenizer is None:
            raise UserError(f"{type(source).__name__} yields text but no tokenizer was given: set one")
        return np.asarray(tokenizer.encode(doc), dtype=np.int32)
    return np.asarray(doc, dtype=np.int32)


class ToBatch(grain.transforms.Map):
    """Packed rows ``[B, L + 1]`` -> the batch dict of ``[B, L]`` arrays (see module doc); from a
    mixture also ``mixture/<name>`` [B]: the documents each row starts from that source."""

    def __init__(self, mixture_names: tuple[str, ...] = ()):
        self.mixture_names = mixture_names

    def map(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = rows["tokens"].astype(np.int32, copy=False)
        seg = rows["tokens_segment_ids"].astype(np.int32, copy=False)
        pos = rows["tokens_positions"].astype(np.int32, copy=False)
        same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
        batch = {
            "inputs": np.ascontiguousarray(tokens[:, :-1]),
            "targets": np.ascontiguousarray(tokens[:, 1:]),
            "segment_ids": np.ascontiguousarray(seg[:, :-1]),
            "positions": np.ascontiguousarray(pos[:, :-1]),
            "loss_mask": same.astype(np.float32),
        }
        for k, name in enumerate(self.mixture_names):  # rows do not overlap: each start counts once
            batch[f"mixture/{name}"] = np.sum(rows["mixture"] == 1 + k, axis=1).astype(np.int32)
        return batch


# How far the loader reads ahead: documents, not bytes, so the bound must be small. grain's
# default (16 threads, 500 documents) held ~300 documents of a 20-file corpus (15 passes with
# repeat) and took 24 GB for one 15 MB text file; 2 threads (the cores of a small host) and 32
# documents keep ahead of a training step by far (bench.data) and bound memory by 32 documents.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=32)


def ordered_documents(
    source: Any,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    repeat: bool = True,
    num_workers: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.MapDataset:
    """The items of ``source``'s documents in training order: shuffled (a new order every epoch),
    repeated, and this data shard's share; UserError for settings no pipeline can use."""
    return ordered_and_counted(
        source, seq_len=seq_len, batch_size=batch_size, seed=seed, shuffle=shuffle, repeat=repeat,
        num_workers=num_workers, shard_index=shard_index, shard_count=shard_count,
    )[0]  # fmt: skip


def ordered_and_counted(
    source: Any, *, seq_len, batch_size, seed, shuffle, repeat, num_workers, shard_index, shard_count
) -> tuple[grain.MapDataset, int]:
    """(ordered_documents, how many documents one pass over this shard's share holds)."""
    for name, value, low in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1)):
        if int(value) < low:
            raise UserError(f"{name} is {value}: use a positive integer")
    if num_workers < 0:
        raise UserError(f"num_workers is {num_workers}: use 0 (in process) or more")
    if not 0 <= shard_index < shard_count:
        raise UserError(
            f"shard_index {shard_index} is outside [0, shard_count={shard_count}): "
            "check the data-parallel process index and count"
        )
    if not 0 <= seed < 2**32:
        raise UserError(f"data seed is {seed}: use an integer in [0, 2**32)")
    if isinstance(source, Mixture):  # each source ordered on its own, then drawn by weight
        documents = [Tagged(k, inner.documents()) for k, inner in enumerate(source.sources)]
        parts = [
            _order(docs, type(inner).__name__, (seed + k) % 2**32, shuffle, repeat, shard_index, shard_count)
            for k, (inner, docs) in enumerate(zip(source.sources, documents, strict=True))
        ]
        return grain.MapDataset.mix(parts, source.proportions), sum(map(len, documents)) // shard_count
    documents = source.documents()
    ds = _order(documents, type(source).__name__, seed, shuffle, repeat, shard_index, shard_count)
    return ds, len(documents) // shard_count


def _order(docs, owner: str, seed: int, shuffle: bool, repeat: bool, shard_index: int, shard_count: int):
    if len(docs) < shard_count:  # docs is a lazy sequence: nothing here is per document
        raise UserError(
            f"{owner} has {len(docs)} documents for {shard_count} shards: add data or use fewer data-parallel processes"
        )
    ds = grain.MapDataset.source(docs)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat()
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    return ds


def make_dataset(
    source: Any,
    tokenizer: Any | None,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    repeat: bool = True,
    num_workers: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.IterDataset:
    """Packed, batched language-model data from ``source`` (see module docstring for the batch).

    ``tokenizer`` may be None when the source yields token ids (``Synthetic``). With
    ``repeat=False`` the data ends after one pass; the last partial batch is dropped.
    ``num_workers > 0`` uses grain worker processes (``mp_prefetch``): outside ``absl.app.run``
    call ``absl.flags.FLAGS.mark_as_parsed()`` first.
    """
    ds = ordered_documents(
        source, seq_len=seq_len, batch_size=batch_size, seed=seed, shuffle=shuffle, repeat=repeat,
        num_workers=num_workers, shard_index=shard_index, shard_count=shard_count,
    )  # fmt: skip
    if hasattr(source, "check_tokenizer"):  # data tokenized ahead of time, by one tokenizer
        source.check_tokenizer(tokenizer)
    mixed = isinstance(source, Mixture)
    ds = ds.map(LoadAndTokenize(source, tokenizer))
    lengths = {"tokens": seq_len + 1, **({"mixture": seq_len + 1} if mixed else {})}
    it = gx.ConcatThenSplitIterDataset(ds.to_iter_dataset(READ_OPTIONS), length_struct=lengths)
    it = it.batch(batch_size, drop_remainder=True).map(ToBatch(source.names if mixed else ()))
    if num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it


class ShardedBatches:
    """Batches of several data shards side by side: each next() concatenates one batch of each.

    A run's global batch is made of ``data_shards`` shard batches and each process loads the shards
    it owns. With the shard count fixed, the global batches (and a checkpoint's data position) do
    not depend on how many processes load them.
    """

    def __init__(self, datasets: list[grain.IterDataset]):
        self.iterators = [iter(dataset) for dataset in datasets]

    def __iter__(self) -> ShardedBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(iterator) for iterator in self.iterators]
        if len(batches) == 1:
            return batches[0]
        return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}

    def get_state(self) -> list[dict]:
        return [iterator.get_state() for iterator in self.iterators]

    def set_state(self, states: list[dict]) -> None:
        for iterator, state in zip(self.iterators, states, strict=True):
            iterator.set_state(state)


def unigram_entropy(source: Any, tokenizer: Any | None, max_documents: int | None = None) -> float:
    """Entropy in nats/token of the unigram distribution of the tokens the model predicts.

    Counts each document's ids plus its eos (bos is never a target), over the first
    ``max_documents`` documents of the source's split. A model whose eval loss is not well below
    this has learned no more than token frequencies.
    """
    eos = EOS_ID if tokenizer is None else tokenizer.eos_id
    docs = source.documents()
    counts = np.zeros(0, dtype=np.int64)
    for i in range(len(docs) if max_documents is None else min(max_documents, len(docs))):
        ids = document_ids(source, tokenizer, docs[i])
        c = np.bincount(np.append(ids, eos).astype(np.int64))
        if len(c) > len(counts):
            c[: len(counts)] += counts
            counts = c
        else:
            counts[: len(c)] += c
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum()) if len(p) else math.nan
