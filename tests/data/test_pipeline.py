"""make_dataset: batch format, packing consistency, resumption, sharding; unigram_entropy."""

import dataclasses
import itertools
import math
import time

import numpy as np
import pytest

from nnxlm.data import Synthetic, TextFiles, make_dataset, unigram_entropy
from nnxlm.errors import UserError


@dataclasses.dataclass(frozen=True)
class Numbered:
    """Document i is ``[100 + i] * lengths[i]``: every token tells which document it came from."""

    lengths: tuple = (3, 9, 2, 14, 5, 1, 7, 20, 4, 6, 8, 2)

    def documents(self):
        return list(range(len(self.lengths)))

    def load(self, i):
        return np.full(self.lengths[i], 100 + i, dtype=np.int32)


def _take(ds, n):
    return list(itertools.islice(iter(ds), n))


def _rows(batch):
    """The packed rows [B, seq_len + 1] a batch was cut from."""
    return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)


def _stream(source):
    """bos + ids + eos of every document, in order."""
    return np.concatenate([np.r_[1, source.load(i), 2] for i in source.documents()])


def test_batch_shapes_and_dtypes():
    ds = make_dataset(Synthetic(num_documents=20), None, seq_len=32, batch_size=4)
    batch = next(iter(ds))
    assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    for key, value in batch.items():
        assert value.shape == (4, 32), key
        want = np.float32 if key == "loss_mask" else np.int32
        assert value.dtype == want, key


def test_rows_are_consecutive_slices_of_the_token_stream():
    """Unshuffled, rows hold the bos/ids/eos stream in order; short documents share rows."""
    src, L = Numbered(), 16
    batches = list(make_dataset(src, None, seq_len=L, batch_size=2, shuffle=False, repeat=False))
    stream = _stream(src)
    rows = [row for b in batches for row in _rows(b)]
    assert len(rows) == len(stream) // (L + 1) // 2 * 2
    for k, row in enumerate(rows):
        np.testing.assert_array_equal(row, stream[k * (L + 1) : (k + 1) * (L + 1)])
    first = batches[0]
    assert list(first["segment_ids"][0, :8]) == [1] * 5 + [2] * 3  # doc 0 (3+2) then doc 1
    assert (first["segment_ids"][0] > 0).all()  # no padding in a full row


def test_segments_positions_targets_and_loss_mask_agree():
    src = Synthetic(num_documents=40, min_length=2, max_length=30)
    for b in _take(make_dataset(src, None, seq_len=24, batch_size=3, seed=5), 6):
        seg, pos, inp, tgt, mask = (b[k] for k in ["segment_ids", "positions", "inputs", "targets", "loss_mask"])
        assert (seg >= 1).all()  # repeat=True: never padded
        starts = np.ones_like(seg, dtype=bool)
        starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
        np.testing.assert_array_equal(pos == 0, starts)  # positions restart with each segment
        cont = ~starts[:, 1:]
        np.testing.assert_array_equal(pos[:, 1:][cont], pos[:, :-1][cont] + 1)
        np.testing.assert_array_equal(tgt[:, :-1][cont], inp[:, 1:][cont])  # next input
        np.testing.assert_array_equal(mask[:, :-1], cont.astype(np.float32))
        assert ((inp == 1) <= starts).all()  # bos only at the start of a segment
        assert not mask[tgt == 1].any()  # never asked to predict a bos


def test_padding_at_the_end_of_a_finite_pass_is_masked():
    src = Numbered(lengths=(3, 4))  # 11 tokens, one row of 17 with padding
    (batch,) = list(make_dataset(src, None, seq_len=16, batch_size=1, shuffle=False, repeat=False))
    seg = batch["segment_ids"][0]
    assert list(seg) == [1] * 5 + [2] * 6 + [0] * 5
    assert batch["loss_mask"][0].sum() == 4 + 5  # ids + eos of each document
    assert not batch["loss_mask"][0, 10:].any()


def test_text_source_with_tokenizer(small_tokenizer, tmp_path):
    texts = ["def a():\n    return 1\n", "x = [1,  2]\t# é\n", "class B:\n    pass\n"]
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.py").write_text(t, encoding="utf-8")
    src = TextFiles(globs=[str(tmp_path / "*.py")])
    (b,) = list(make_dataset(src, small_tokenizer, seq_len=200, batch_size=1, shuffle=False, repeat=False))
    inp, seg = b["inputs"][0], b["segment_ids"][0]
    decoded = [small_tokenizer.decode(inp[seg == s]) for s in (1, 2, 3)]
    assert decoded == texts


def test_text_source_without_tokenizer_is_a_user_error(tmp_path):
    (tmp_path / "a.txt").write_text("hello", encoding="utf-8")
    ds = make_dataset(TextFiles(globs=[str(tmp_path / "a.txt")]), None, seq_len=8, batch_size=1)
    with pytest.raises(UserError, match="no tokenizer"):
        next(iter(ds))


def test_resume_from_state_gives_the_same_batches():
    src = Synthetic(num_documents=12, min_length=3, max_length=50)  # several epochs
    ds = make_dataset(src, None, seq_len=20, batch_size=2, seed=7)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = iter(ds)
    resumed.set_state(state)
    got = [next(resumed) for _ in range(3)]
    for e, g in zip(expected, got, strict=True):
        for key in e:
            np.testing.assert_array_equal(e[key], g[key], err_msg=key)
    fresh = next(iter(ds))
    assert not np.array_equal(fresh["inputs"], expected[0]["inputs"])


def test_shuffle_is_seeded_and_reshuffles_each_epoch():
    src = Numbered()
    n = len(src.lengths)

    def order(seed, epochs):
        ds = make_dataset(src, None, seq_len=4, batch_size=1, seed=seed)
        firsts = []
        for b in ds:
            firsts += [int(t) - 100 for t in _rows(b)[0] if t >= 100]
            if len(firsts) > 200:
                break
        docs = [k for k, _ in itertools.groupby(firsts)]
        return docs[: n * epochs]

    a, b = order(0, 2), order(0, 2)
    assert a == b and a != order(1, 2)
    assert sorted(a[:n]) == list(range(n)) and a[:n] != a[n:]


def test_shards_are_disjoint_and_cover():
    src = Numbered()
    seen = []
    for shard in range(3):
        ds = make_dataset(
            src,
            None,
            seq_len=8,
            batch_size=1,
            seed=3,
            repeat=False,
            shard_index=shard,
            shard_count=3,
        )
        docs = {int(t) - 100 for b in ds for t in _rows(b)[0] if t >= 100}
        seen.append(docs)
    assert all(seen)
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert len(set().union(*seen)) >= len(src.lengths) - 3  # finite pass drops a tail


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"shard_index": 2, "shard_count": 2}, "shard_index 2"),
        ({"seq_len": 0}, "seq_len is 0"),
        ({"batch_size": 0}, "batch_size is 0"),
    ],
)
def test_bad_arguments(kwargs, pattern):
    args = {"seq_len": 8, "batch_size": 1, **kwargs}
    with pytest.raises(UserError, match=pattern):
        make_dataset(Synthetic(num_documents=4), None, **args)


def test_worker_processes_give_the_same_batches(parsed_flags):
    src = Synthetic(num_documents=30)
    want = _take(make_dataset(src, None, seq_len=16, batch_size=2), 4)
    ds = make_dataset(src, None, seq_len=16, batch_size=2, num_workers=1)
    it = iter(ds)
    got = [next(it) for _ in range(4)]
    for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(w["inputs"], g["inputs"])
    del it, ds


def test_unigram_entropy():
    # Tokens predicted: 5, 5, eos | 6, eos -> p = 2/5, 2/5, 1/5.
    src = Numbered(lengths=(2, 1))

    @dataclasses.dataclass(frozen=True)
    class Two(Numbered):
        def load(self, i):
            return np.array([5, 5] if i == 0 else [6], dtype=np.int32)

    h = unigram_entropy(Two(lengths=src.lengths), None)
    assert h == pytest.approx(-(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2)))
    assert unigram_entropy(Two(lengths=src.lengths), None, max_documents=1) == pytest.approx(
        -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    )
    syn = unigram_entropy(Synthetic(num_documents=200, vocab_size=64), None)
    assert 3.0 < syn < math.log(62)


def test_the_loader_reads_a_bounded_number_of_documents_ahead(small_tokenizer, tmp_path, monkeypatch):
    """Read-ahead counts documents, whatever their size: one batch of a 200-file corpus loads a few
    dozen files, not grain's default 500 (a 15 MB text file took 24 GB that way)."""
    for i in range(200):
        (tmp_path / f"{i:03d}.txt").write_text(f"def f{i}(x):\n    return x + {i}\n", encoding="utf-8")
    loads = itertools.count()
    load = TextFiles.load
    monkeypatch.setattr(TextFiles, "load", lambda self, item: (next(loads), load(self, item))[1])
    it = iter(make_dataset(TextFiles(globs=[str(tmp_path / "*.txt")]), small_tokenizer, seq_len=16, batch_size=1))
    next(it)
    time.sleep(1.0)  # the loader's threads fill their buffer meanwhile
    assert next(loads) <= 64  # READ_OPTIONS reads 32 ahead
