"""Mixture: weighted, deterministic, resumable mixtures of sources, with the realised shares logged."""

import dataclasses
import json

import fiddle as fdl
import numpy as np
import pytest

import nnxlm
from nnxlm.data import JsonlFiles, Mixture, Synthetic, make_dataset
from nnxlm.errors import UserError
from nnxlm.metrics import read_metrics


@dataclasses.dataclass(frozen=True)
class Tokens:
    """Document i is ``[base + i % 50] * (1 + i % 7)``: its tokens tell the source and document."""

    base: int
    count: int = 300

    def documents(self):
        return range(self.count)

    def load(self, i):
        return np.full(1 + i % 7, self.base + i % 50, dtype=np.int32)


def _mixture(weights=(7.0, 3.0)):
    return Mixture([Tokens(100), Tokens(200, count=40)], weights, names=["code", "text"])


def test_the_realised_shares_match_the_weights_and_the_counts_match_the_tokens():
    it = iter(make_dataset(_mixture(), None, seq_len=32, batch_size=4, seed=3))
    counted, seen, starts = np.zeros(2), np.zeros(2), 0
    for _ in range(200):
        batch = next(it)
        counted += [batch["mixture/code"].sum(), batch["mixture/text"].sum()]
        rows = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
        starts += np.sum(rows == 1)  # every document starts with bos
        after_bos = rows[:, 1:][rows[:, :-1] == 1]  # its first id tells the source (bos at a row's end: unseen)
        seen += [np.sum((after_bos >= 100) & (after_bos < 200)), np.sum(after_bos >= 200)]
    assert counted.sum() == starts  # the logged counts are the documents that start in the batch
    assert np.all(counted >= seen) and seen.sum() >= starts - 200 * 4  # at most one unseen a row
    assert seen[0] / seen.sum() == pytest.approx(counted[0] / counted.sum(), abs=0.01)
    share = counted[0] / counted.sum()
    assert abs(share - 0.7) < 0.02, share  # 3,000+ documents: the share is near 70 %
    # The smaller source (40 documents) repeats, reshuffled: every one of its documents appears.
    assert seen[1] > 40


def test_a_mixture_resumes_exactly_and_is_deterministic():
    ds = make_dataset(_mixture(), None, seq_len=16, batch_size=2, seed=5)
    it = iter(ds)
    for _ in range(7):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(4)]
    resumed = iter(ds)
    resumed.set_state(state)
    again = iter(make_dataset(_mixture(), None, seq_len=16, batch_size=2, seed=5))
    for _ in range(7):
        next(again)
    for w, r, a in zip(want, [next(resumed) for _ in range(4)], [next(again) for _ in range(4)], strict=True):
        for key in w:
            np.testing.assert_array_equal(w[key], r[key], err_msg=key)
            np.testing.assert_array_equal(w[key], a[key], err_msg=key)


def test_data_shards_split_each_source():
    """Two data shards read disjoint documents of each source."""
    docs = []
    for shard in range(2):
        it = iter(make_dataset(_mixture(), None, seq_len=8, batch_size=1, repeat=False, shuffle=False,
                               shard_index=shard, shard_count=2))  # fmt: skip
        tokens = np.concatenate([b["inputs"][b["loss_mask"] > 0] for b in it])
        docs.append(set(tokens.tolist()) - {1, 2})
    assert docs[0] and docs[1] and docs[0].isdisjoint(docs[1])


def test_weights_need_not_sum_to_one_and_items_load_through_the_mixture(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "alpha"}\n{"text": "beta"}\n')
    mixture = Mixture([JsonlFiles(globs=[str(tmp_path / "a.jsonl")]), Synthetic(num_documents=3)], [2, 6])
    assert mixture.proportions == (0.25, 0.75) and mixture.names == ("source0", "source1")
    docs = mixture.documents()
    assert len(docs) == 5 and docs[0][0] == 0 and docs[4] == (1, 2)
    assert mixture.load(docs[1]) == "beta" and mixture.where(docs[1]).endswith("a.jsonl:2")


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(sources=[], weights=[]), r"Mixture.sources is empty"),
        (dict(sources=[Tokens(1)], weights=[0.5, 0.5]), r"1 sources, 2 weights"),
        (dict(sources=[Tokens(1), Tokens(2)], weights=[1.0, 0.0]), r"weights \[1.0, 0.0\] must all be positive"),
        (dict(sources=[Tokens(1), Tokens(2)], weights=[1.0, "x"]), r"weights \[1.0, 'x'\] must all be positive"),
        (dict(sources=[Tokens(1), Tokens(2)], weights=[1, 1], names=["a", "a"]), r"names .* distinct"),
    ],
)
def test_bad_mixtures_are_one_line_errors(kwargs, pattern):
    with pytest.raises(UserError, match=pattern):
        Mixture(**kwargs)


def test_training_on_a_mixture_logs_its_shares_and_saves_its_recipe(tmp_path):
    cfg = nnxlm.recipes.tiny()
    cfg.workdir, cfg.num_steps, cfg.eval_every = str(tmp_path), 4, 0
    vocab = cfg.model.vocab_size
    cfg.train_data = fdl.Config(
        Mixture,
        sources=[fdl.Config(Synthetic, vocab_size=vocab, seed=1), fdl.Config(Synthetic, vocab_size=vocab, seed=2)],
        weights=[0.8, 0.2],
        names=["web", "books"],
    )
    cfg.eval_data = None
    fdl.build(cfg).fit()
    records = read_metrics(str(tmp_path))
    web, books = (sum(r[f"mixture/{n}"] for r in records) for n in ("web", "books"))
    assert web > books > 0
    recipe = nnxlm.recipes.serialization.from_json(json.loads((tmp_path / "recipe.json").read_text()))
    assert list(recipe.train_data.names) == ["web", "books"]
