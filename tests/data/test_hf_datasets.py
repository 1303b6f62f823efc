"""HFDataset: saved datasets, Parquet and JSON through load_dataset, filters, splits, the pipeline,
bad data, and the hf_dataset fiddler as a command line gives it."""

import json
import sys

import datasets  # in the test extra: a missing one fails here, never skips
import fiddle as fdl
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nnxlm.data import HFDataset
from nnxlm.errors import UserError
from nnxlm.recipes.directives import resolve
from tests.data import source_checks

TEXTS = [f"def f_{i}(x):\n    return x * {i}\n" + "# pad\n" * (i % 3) for i in range(24)]
LANGS = ["en", "de", "en", "fr"] * 6


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A DatasetDict saved to disk: train holds TEXTS, validation two more rows."""
    path = tmp_path_factory.mktemp("hf") / "saved"
    train = datasets.Dataset.from_dict({"text": TEXTS, "lang": LANGS, "n": list(range(24))})
    validation = datasets.Dataset.from_dict({"text": ["held 1", "held 2"], "lang": ["en", "en"], "n": [0, 1]})
    datasets.DatasetDict({"train": train, "validation": validation}).save_to_disk(str(path))
    return str(path)


def test_saved_dataset_rows_in_order(saved):
    source = HFDataset(saved)
    assert list(source.documents()) == list(range(24))
    assert source_checks.texts(source) == TEXTS
    assert source_checks.texts(HFDataset(saved, hf_split="validation")) == ["held 1", "held 2"]
    assert source.where(3) == f"HFDataset({saved!r})['train'] row 3"
    assert HFDataset(saved, field=None).load(5) == {"text": TEXTS[5], "lang": "de", "n": 5}


def test_parquet_and_json_files_through_load_dataset(tmp_path):
    pq.write_table(pa.table({"text": TEXTS[:5]}), tmp_path / "part.parquet")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in TEXTS[5:]))
    cache = str(tmp_path / "cache")
    from_parquet = HFDataset("parquet", data_files=str(tmp_path / "*.parquet"), cache_dir=cache)
    from_json = HFDataset("json", data_files=[str(tmp_path / "rows.jsonl")], field="content", cache_dir=cache)
    assert source_checks.texts(from_parquet) == TEXTS[:5]
    assert source_checks.texts(from_json) == TEXTS[5:]


def test_filters_and_min_chars_keep_matching_rows(saved):
    def kept(**filters):
        return list(HFDataset(saved, **filters).documents())

    assert kept(filters={"lang": "en"}) == list(range(0, 24, 2))
    assert kept(filters={"lang": ["de", "fr"]}) == list(range(1, 24, 2))
    assert kept(filters={"lang": "en", "n": 4}) == [4]
    long_ones = [i for i, t in enumerate(TEXTS) if len(t) >= 40]
    assert 0 < len(long_ones) < 24 and kept(min_chars=40) == long_ones
    assert kept(filters={"lang": "en"}, min_chars=40) == [i for i in long_ones if LANGS[i] == "en"]


def test_bad_filters(saved):
    with pytest.raises(UserError, match=r"has no column 'language' \(columns: text, lang, n\)"):
        HFDataset(saved, filters={"language": "en"}).documents()
    with pytest.raises(UserError, match=r"filters\['n'\] = 'x' cannot be compared with column 'n' of type int64"):
        HFDataset(saved, filters={"n": "x"}).documents()
    with pytest.raises(UserError, match="no rows of .* pass filters"):
        HFDataset(saved, filters={"lang": "xx"}).documents()
    with pytest.raises(UserError, match=r"filters\['lang'\] is \{'a': 1\}: use a string, number or bool"):
        HFDataset(saved, filters={"lang": {"a": 1}})


def test_splits_are_disjoint_and_cover_and_filters_move_no_row_between_them(saved):
    source_checks.assert_splits_disjoint_and_cover(lambda **split: HFDataset(saved, **split))
    held_out = set(HFDataset(saved, split="eval", eval_fraction=0.3).documents())
    filtered = set(HFDataset(saved, split="eval", eval_fraction=0.3, filters={"lang": "en"}).documents())
    assert filtered == {i for i in held_out if LANGS[i] == "en"}


def test_pipeline_resumes_exactly_and_shards_split_one_order(saved, small_tokenizer):
    source = HFDataset(saved)
    source_checks.assert_pipeline_decodes_the_documents(source, small_tokenizer)
    source_checks.assert_resumes_exactly(source, small_tokenizer)
    source_checks.assert_two_shards_split_one_order(HFDataset(saved, filters={"lang": ["en", "fr"]}))
    source_checks.assert_pickles_as_plain_values(source)


def test_bad_data_gives_one_line_naming_dataset_and_row(tmp_path, saved):
    columns = {"body": ["x"], "number": [1], "nulls": ["ok", None], "raw": [b"ok", b"\xff no"]}
    path = tmp_path / "bad"
    for name, values in columns.items():
        datasets.Dataset.from_dict({name: values}).save_to_disk(str(path / name))
    cases = [
        (HFDataset(str(path / "body")), r"HFDataset\(.*body'\) has no column 'text' \(columns: body\)"),
        (HFDataset(str(path / "number"), field="number"), r"column 'number' holds Value\('int64'\), not text"),
        (HFDataset(str(path / "nulls"), field="nulls"), r"\['train'\] row 1: field 'nulls' is NoneType, not a string"),
        (HFDataset(str(path / "raw"), field="raw"), r"raw'\)\['train'\] row 1 is not UTF-8"),
        (HFDataset(saved, hf_split="test"), r"has no split 'test' \(train, validation\): set HFDataset.hf_split"),
        (HFDataset(str(tmp_path / "missing")), r"HFDataset\(.*missing'\) cannot be loaded \(.*\): check path"),
    ]
    for source, pattern in cases:
        with pytest.raises(UserError, match=pattern) as error:
            for item in source.documents():
                source.load(item)
        assert "\n" not in str(error.value)


def test_without_the_datasets_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'nnxlm\[data\]'"):
        HFDataset(str(tmp_path / "never-loaded")).documents()


def test_hf_dataset_fiddler_from_the_command_line(saved):
    fiddler = f"fiddler:hf_dataset({saved!r}, filters={{'lang': 'en'}}, eval_fraction=0.3)"
    cfg = resolve(["tiny", fiddler, "set:train_data.min_chars=40"])
    train, held_out = fdl.build(cfg.train_data), fdl.build(cfg.eval_data)
    assert (train.split, held_out.split, held_out.filters) == ("train", "eval", {"lang": "en"})
    assert all(LANGS[i] == "en" and len(TEXTS[i]) >= 40 for i in train.documents())
    assert not set(np.asarray(train.documents())) & set(np.asarray(held_out.documents()))
    cfg = resolve(["tiny", f"fiddler:hf_dataset({saved!r}, eval_split='validation')"])
    assert source_checks.texts(fdl.build(cfg.eval_data)) == ["held 1", "held 2"]
