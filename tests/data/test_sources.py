"""Document sources: glob matching, file errors, JSONL, splits, stdlib and synthetic corpora."""

import dataclasses
import io
import itertools
import json
import os
import pickle
import sysconfig

import fiddle as fdl
import numpy as np
import pytest

from nnxlm.data import JsonlFiles, PythonStdlib, Synthetic, TextFiles
from nnxlm.errors import UserError


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture
def tree(tmp_path):
    """tmp/a.txt, tmp/b.txt, tmp/sub/c.txt, tmp/sub/deep/d.txt, tmp/x.md."""
    for rel in ["a.txt", "b.txt", "sub/c.txt", "sub/deep/d.txt", "x.md"]:
        _write(tmp_path / rel, f"text of {rel}\n")
    return tmp_path


def test_glob_recursive_sorted_deduplicated(tree):
    src = TextFiles(globs=[f"{tree}/**/*.txt", f"{tree}/*.txt"])
    rel = [os.path.relpath(p, tree) for p in src.documents()]
    assert rel == ["a.txt", "b.txt", "sub/c.txt", "sub/deep/d.txt"]
    assert src.load(src.documents()[2]) == "text of sub/c.txt\n"


def test_single_string_glob_is_accepted(tree):
    assert len(TextFiles(globs=f"{tree}/*.txt").documents()) == 2


def test_no_match_is_a_user_error_naming_the_pattern(tree):
    src = TextFiles(globs=[f"{tree}/*.txt", f"{tree}/nothing/*.txt"])  # no I/O until documents()
    with pytest.raises(UserError, match=r"no files match '.*nothing/\*\.txt'"):
        src.documents()


def test_non_utf8_file_is_a_user_error_naming_it(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n")
    src = TextFiles(globs=[str(tmp_path / "*.txt")])
    with pytest.raises(UserError, match=r"bad\.txt is not UTF-8"):
        src.load(src.documents()[0])


def test_empty_file_is_a_user_error_naming_it(tmp_path):
    _write(tmp_path / "ok.txt", "x")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(UserError, match=r"empty\.txt is empty"):
        TextFiles(globs=[str(tmp_path / "*.txt")]).documents()


def test_jsonl_field_and_blank_lines(tmp_path):
    rows = [{"text": "one", "body": "uno"}, {"text": "two\nlines", "body": "dos"}]
    lines = [json.dumps(r) for r in rows]
    _write(tmp_path / "d.jsonl", lines[0] + "\n\n" + lines[1] + "\n")
    src = JsonlFiles(globs=[str(tmp_path / "*.jsonl")])
    docs = src.documents()
    assert [d[2] for d in docs] == [1, 3]
    assert [src.load(d) for d in docs] == ["one", "two\nlines"]
    body = JsonlFiles(globs=[str(tmp_path / "*.jsonl")], field="body")
    assert [body.load(d) for d in body.documents()] == ["uno", "dos"]


@pytest.mark.parametrize(
    "line, pattern",
    [
        ("{not json", r"d\.jsonl:2 is not valid JSON"),
        ('{"body": "x"}', r"d\.jsonl:2 has no field 'text'"),
        ('{"text": 3}', r"d\.jsonl:2: field 'text' is int"),
        ('["text"]', r"d\.jsonl:2 is an array, not a JSON object: each line must be one object with a 'text' field"),
        ('"text"', r"d\.jsonl:2 is a string, not a JSON object"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, line, pattern):
    _write(tmp_path / "d.jsonl", '{"text": "fine"}\n' + line + "\n")
    src = JsonlFiles(globs=[str(tmp_path / "d.jsonl")])
    docs = src.documents()
    assert src.load(docs[0]) == "fine"
    with pytest.raises(UserError, match=pattern):
        src.load(docs[1])


def test_splits_are_disjoint_and_cover(tmp_path):
    for i in range(60):
        _write(tmp_path / f"f{i:02d}.txt", f"doc {i}")
    _write(tmp_path / "d.jsonl", "".join(json.dumps({"text": str(i)}) + "\n" for i in range(60)))
    makers = [
        lambda s: TextFiles(globs=[str(tmp_path / "*.txt")], split=s, eval_fraction=0.3),
        lambda s: JsonlFiles(globs=[str(tmp_path / "*.jsonl")], split=s, eval_fraction=0.3),
        lambda s: Synthetic(num_documents=60, split=s, eval_fraction=0.3),
    ]
    for make in makers:
        train, evl = make("train").documents(), make("eval").documents()
        assert set(train).isdisjoint(evl)
        full = dataclasses.replace(make("train"), eval_fraction=0.0).documents()
        assert sorted(list(train) + list(evl)) == sorted(full)
        assert 5 <= len(evl) <= 35, len(evl)
    # With eval_fraction 0 every document is in whichever split is asked for.
    all_docs = TextFiles(globs=[str(tmp_path / "*.txt")]).documents()
    assert TextFiles(globs=[str(tmp_path / "*.txt")], split="eval").documents() == all_docs


def test_split_keys_are_relative_to_the_glob(tmp_path):
    """Moving the data directory keeps every document on the same side of the split."""
    for root in ["one", "two/nested"]:
        for i in range(40):
            _write(tmp_path / root / f"f{i:02d}.txt", "x")
    sides = []
    for root in ["one", "two/nested"]:
        src = TextFiles(globs=[str(tmp_path / root / "*.txt")], split="eval", eval_fraction=0.5)
        sides.append([os.path.basename(p) for p in src.documents()])
    assert sides[0] == sides[1]


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"split": "test"}, r"split is 'test': use 'train' or 'eval'"),
        ({"eval_fraction": 1.0}, r"eval_fraction is 1.0"),
        ({"eval_fraction": -0.1}, r"eval_fraction is -0.1"),
    ],
)
def test_bad_split_settings(kwargs, pattern):
    with pytest.raises(UserError, match=pattern):
        TextFiles(globs=["x"], **kwargs)
    with pytest.raises(UserError, match=pattern):
        Synthetic(**kwargs)


def test_sources_are_plain_values_buildable_by_fiddle(tree):
    src = fdl.build(fdl.Config(TextFiles, globs=[f"{tree}/*.txt"], eval_fraction=0.1))
    assert src == TextFiles(globs=(f"{tree}/*.txt",), eval_fraction=0.1)
    assert pickle.loads(pickle.dumps(src)) == src
    with pytest.raises(AttributeError):
        src.split = "eval"


def test_stdlib_finds_many_files_without_tests_or_site_packages():
    root = sysconfig.get_paths()["stdlib"]
    train, evl = PythonStdlib().documents(), PythonStdlib(split="eval").documents()
    assert len(train) > 300 and 1 <= len(evl) < len(train) // 10
    assert set(train).isdisjoint(evl)
    rel = {os.path.relpath(p, root) for p in train + evl}
    assert "os.py" in rel and "json/decoder.py" in rel
    for r in rel:
        parts = r.split(os.sep)
        assert not {"site-packages", "test", "tests", "idlelib"} & set(parts), r
    assert PythonStdlib().load(os.path.join(root, "os.py")).startswith('r"""OS routines')
    with_tests = PythonStdlib(eval_fraction=0.0, include_tests=True).documents()
    assert len(with_tests) > len(train) + len(evl)


def test_synthetic_ids_lengths_determinism_and_bigram_structure():
    src = Synthetic(num_documents=50, vocab_size=64, min_length=5, max_length=40, seed=3)
    docs = src.documents()
    assert list(docs) == list(range(50))
    seqs = [src.load(i) for i in docs]
    for s in seqs:
        assert s.dtype == np.int32 and 5 <= len(s) <= 40
        assert s.min() >= 3 and s.max() < 64
    np.testing.assert_array_equal(
        seqs[7],
        Synthetic(num_documents=50, vocab_size=64, min_length=5, max_length=40, seed=3).load(7),
    )
    assert not np.array_equal(
        seqs[7],
        Synthetic(vocab_size=64, min_length=5, max_length=40, seed=4).load(7)[: len(seqs[7])],
    )
    successors = {}
    for s in seqs:
        for a, b in itertools.pairwise(s):
            successors.setdefault(int(a), set()).add(int(b))
    assert max(len(v) for v in successors.values()) <= 4  # learnable: few successors per token
    assert len(successors) > 20


def test_synthetic_bad_settings():
    with pytest.raises(UserError, match="min_length"):
        Synthetic(min_length=10, max_length=5)
    with pytest.raises(UserError, match="vocab_size"):
        Synthetic(vocab_size=3)


@pytest.mark.parametrize("chunk", [1, 2, 5, 1 << 24])
@pytest.mark.parametrize(
    "data",
    [b'{"text": "a"}\n\n  \n{"text": "b"}\r\n', b'{"text": "x"}', b"", b"\n\n", b' \n{"text": "c"} \n\t', b"\n\n{}"],
)
def test_line_scan_matches_python_line_splitting(tmp_path, monkeypatch, data, chunk):
    """The numpy scan finds the same non-blank lines as `for line in file` + strip(), wherever the
    chunk boundaries fall."""
    from nnxlm.data import sources

    monkeypatch.setattr(sources, "_SCAN_BYTES", chunk)
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    want, offset = [], 0
    for number, line in enumerate(io.BytesIO(data), 1):
        if line.strip():
            want.append((offset, number))
        offset += len(line)
    offsets, lines = sources.scan_lines(str(path))
    assert list(zip(offsets.tolist(), lines.tolist(), strict=True)) == want


def test_jsonl_index_is_lazy_indexable_and_picklable(tmp_path):
    """documents() of JSON Lines is an index of numpy arrays (a few bytes a line, no Python object
    per line) that indexes, slices and iterates like a list and pickles for grain's workers."""
    for name, count in (("a", 3), ("b", 4)):
        _write(tmp_path / f"{name}.jsonl", "".join(json.dumps({"text": f"{name}{i}"}) + "\n" for i in range(count)))
    src = JsonlFiles(globs=[str(tmp_path / "*.jsonl")])
    docs = src.documents()
    assert len(docs) == 7 and not isinstance(docs, list)
    assert [src.load(d) for d in docs] == ["a0", "a1", "a2", "b0", "b1", "b2", "b3"]
    assert docs[-1] == docs[6] and docs[np.int64(3)][0].endswith("b.jsonl") and docs[3][2] == 1
    assert [src.load(d) for d in docs[2:4]] == ["a2", "b0"]
    with pytest.raises(IndexError):
        docs[7]
    assert list(pickle.loads(pickle.dumps(docs))) == list(docs)
    assert docs.offsets.dtype == np.int64 and docs.lines.dtype == np.int32


def test_jsonl_split_of_many_lines_is_stable_and_near_its_fraction(tmp_path):
    """The eval split of a file's lines is hashed from the file's key and line number, so the same
    lines are held out under another directory, at about the asked fraction."""
    for root in ("one", "two/deeper"):
        _write(tmp_path / root / "d.jsonl", "".join('{"text": "x"}\n' for _ in range(5000)))
    held = [
        [
            d[2]
            for d in JsonlFiles(globs=[str(tmp_path / root / "*.jsonl")], split="eval", eval_fraction=0.1).documents()
        ]
        for root in ("one", "two/deeper")
    ]
    assert held[0] == held[1]
    assert 400 < len(held[0]) < 600


def test_a_rewritten_jsonl_file_is_read_anew(tmp_path, monkeypatch):
    """Lines are read through a per-process memory map: a file rewritten in place, or another file
    at the same relative path, is never read through the old map."""
    monkeypatch.chdir(tmp_path)
    for folder, texts in (("a", ["one", "two"]), ("b", ["three", "four", "five"])):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        _write(tmp_path / folder / "d.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts))
        src = JsonlFiles(globs=["d.jsonl"])
        assert [src.load(d) for d in src.documents()] == texts
    _write(tmp_path / "b" / "d.jsonl", json.dumps({"text": "rewritten, longer than before"}) + "\n")
    assert [src.load(d) for d in src.documents()] == ["rewritten, longer than before"]


def test_a_byte_order_mark_starting_a_file_is_not_text(tmp_path):
    """Editors on Windows write one; it was trained on as U+FEFF (text) or refused as bad JSON."""
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfdef f():\n    pass\n")
    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "one"}\n{"text": "\\ufefftwo"}\n')
    text = TextFiles(globs=[str(tmp_path / "a.txt")])
    assert text.load(text.documents()[0]) == "def f():\n    pass\n"
    lines = JsonlFiles(globs=[str(tmp_path / "a.jsonl")])
    assert [lines.load(d) for d in lines.documents()] == ["one", "\ufefftwo"]  # inside a line: text
