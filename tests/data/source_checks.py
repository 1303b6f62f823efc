"""Checks every document source must pass, shared by the tests of the file and dataset sources."""

import pickle

import numpy as np

from nnxlm.data import make_dataset
from nnxlm.data.pipeline import ordered_documents


def texts(source) -> list:
    """Every document of the source, loaded, in documents() order."""
    docs = source.documents()
    return [source.load(docs[i]) for i in range(len(docs))]


def take(dataset, n: int) -> list:
    """The first n batches of a fresh iterator (dropped after, so worker processes end)."""
    it = iter(dataset)
    batches = [next(it) for _ in range(n)]
    del it
    return batches


def assert_splits_disjoint_and_cover(make_source, eval_fraction: float = 0.3) -> None:
    """train and eval documents are disjoint, cover the whole, both non-empty, and stable."""
    everything = texts(make_source(split="train", eval_fraction=0.0))
    train = texts(make_source(split="train", eval_fraction=eval_fraction))
    held_out = texts(make_source(split="eval", eval_fraction=eval_fraction))
    assert train and held_out
    assert not set(train) & set(held_out)
    assert sorted(train + held_out) == sorted(everything)
    assert texts(make_source(split="eval", eval_fraction=eval_fraction)) == held_out  # deterministic
    # each split keeps the documents' order
    assert [t for t in everything if t in set(train)] == train


def assert_pipeline_decodes_the_documents(source, tokenizer) -> None:
    """Unshuffled, one pass: the packed segments decode back to the documents, in order."""
    (batch,) = make_dataset(source, tokenizer, seq_len=4000, batch_size=1, shuffle=False, repeat=False)
    inputs, segments = batch["inputs"][0], batch["segment_ids"][0]
    want = texts(source)
    decoded = [tokenizer.decode(inputs[segments == s]) for s in range(1, len(want) + 1)]
    assert decoded == want


def assert_resumes_exactly(source, tokenizer) -> None:
    """get_state mid-epoch, set_state on a new iterator: the same next batches."""
    dataset = make_dataset(source, tokenizer, seq_len=16, batch_size=2, seed=3)
    it = iter(dataset)
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(4)]
    resumed = iter(dataset)
    resumed.set_state(state)
    got = [next(resumed) for _ in range(4)]
    for w, g in zip(want, got, strict=True):
        for key in w:
            np.testing.assert_array_equal(w[key], g[key], err_msg=key)


def assert_two_shards_split_one_order(source) -> None:
    """With two data shards, shard i reads documents i, i + 2, ... of the one-shard order."""
    one = ordered_documents(source, seq_len=8, batch_size=1, seed=5, repeat=False)
    order = [one[i] for i in range(len(one))]
    for shard in range(2):
        part = ordered_documents(
            source, seq_len=8, batch_size=1, seed=5, repeat=False, shard_index=shard, shard_count=2
        )
        assert [part[i] for i in range(len(part))] == order[shard::2]
    docs = source.documents()
    assert sorted(order) == sorted(docs[i] for i in range(len(docs)))  # one pass: every document once


def assert_pickles_as_plain_values(source) -> None:
    """After loading (readers open and cached), the source and its documents still pickle small:
    grain sends them to worker processes; the open readers stay behind."""
    docs = source.documents()
    source.load(docs[0])
    assert len(pickle.dumps(source)) < 2000
    restored = pickle.loads(pickle.dumps(docs))
    assert [restored[i] for i in range(len(docs))] == [docs[i] for i in range(len(docs))]
