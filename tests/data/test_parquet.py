"""ParquetFiles: rows as documents read by row group, splits, the full pipeline, bad files."""

import fiddle as fdl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nnxlm.data import ParquetFiles
from nnxlm.errors import UserError
from nnxlm.recipes.directives import resolve
from tests.data import source_checks

FIRST = [f"def first_{i}(x):\n    return x + {i}\n" for i in range(7)]
SECOND = [f"class Second{i}:\n    size = {i * 11}\n" for i in range(5)]


def _write(path, row_group_size=3, **columns):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


@pytest.fixture
def corpus(tmp_path):
    """Two files, several row groups each; documents are FIRST then SECOND."""
    _write(tmp_path / "a.parquet", text=FIRST, n=list(range(7)))
    _write(tmp_path / "sub" / "b.parquet", row_group_size=2, text=SECOND, n=list(range(5)))
    return str(tmp_path / "**" / "*.parquet")


def test_rows_are_documents_in_file_then_row_order(corpus, tmp_path):
    source = ParquetFiles(corpus)
    docs = source.documents()
    assert len(docs) == 12
    assert docs[0] == (str(tmp_path / "a.parquet"), 0) and docs[-1] == (str(tmp_path / "sub" / "b.parquet"), 4)
    assert source_checks.texts(source) == FIRST + SECOND
    assert source.where(docs[8]) == f"{tmp_path / 'sub' / 'b.parquet'}:row 1"
    assert source.load(docs[4]) == FIRST[4]  # random access, out of order: another row group


def test_field_none_gives_whole_rows(corpus):
    source = ParquetFiles(corpus, field=None)
    assert source.load(source.documents()[8]) == {"text": SECOND[1], "n": 1}


def test_splits_are_disjoint_and_cover(corpus):
    source_checks.assert_splits_disjoint_and_cover(lambda **split: ParquetFiles(corpus, **split))


def test_pipeline_resumes_exactly_and_shards_split_one_order(corpus, small_tokenizer):
    source = ParquetFiles(corpus)
    source_checks.assert_pipeline_decodes_the_documents(source, small_tokenizer)
    source_checks.assert_resumes_exactly(source, small_tokenizer)
    source_checks.assert_two_shards_split_one_order(source)
    source_checks.assert_pickles_as_plain_values(source)


def _corrupt_pages(path):
    data = bytearray(path.read_bytes())
    data[4:40] = bytes(36)  # the first page header, after the leading magic bytes
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "write, field, pattern",
    [
        (lambda p: _write(p, body=["x"]), "text", r"bad\.parquet has no column 'text' \(columns: body\)"),
        (lambda p: _write(p, text=[1, 2]), "text", r"bad\.parquet: column 'text' holds int64, not text"),
        (lambda p: _write(p, text=["ok", None]), "text", r"bad\.parquet:row 1: column 'text' is null"),
        (lambda p: _write(p, text=[b"ok", b"\xff no"]), "text", r"bad\.parquet:row 1 is not UTF-8"),
        (
            lambda p: (_write(p, text=FIRST), p.write_bytes(p.read_bytes()[:-30])),
            "text",
            r"bad\.parquet is not a readable Parquet file",
        ),
        (
            lambda p: (_write(p, text=FIRST), _corrupt_pages(p)),
            "text",
            r"bad\.parquet:row 0: row group 0 cannot be read .*corrupt or truncated",
        ),
    ],
    ids=["missing field", "wrong type", "null", "not utf-8", "truncated", "corrupt pages"],
)
def test_bad_files_give_one_line_naming_file_and_row(tmp_path, write, field, pattern):
    path = tmp_path / "bad.parquet"
    write(path)
    source = ParquetFiles(str(path), field=field)
    with pytest.raises(UserError, match=pattern) as error:
        for item in source.documents():
            source.load(item)
    assert "\n" not in str(error.value)


def test_no_matching_files_names_the_pattern(tmp_path):
    with pytest.raises(UserError, match=r"no files match .*nothing\*\.parquet"):
        ParquetFiles(str(tmp_path / "nothing*.parquet")).documents()


def test_parquet_files_fiddler_from_the_command_line(corpus):
    cfg = resolve(["tiny", f"fiddler:parquet_files({corpus!r}, eval_fraction=0.3)"])
    train, held_out = fdl.build(cfg.train_data), fdl.build(cfg.eval_data)
    assert sorted(source_checks.texts(train) + source_checks.texts(held_out)) == sorted(FIRST + SECOND)
