"""Fixtures for the data tests: a small SentencePiece model trained on stdlib code."""

from pathlib import Path

import pytest

from nnxlm.data import PythonStdlib, SentencePieceTokenizer


@pytest.fixture(scope="session")
def stdlib_files():
    """Paths of the stdlib files of the train split (sorted)."""
    return PythonStdlib(eval_fraction=0.0).documents()


@pytest.fixture(scope="session")
def small_tokenizer(stdlib_files):
    """A vocab-1000 tokenizer trained on ~300 k characters of stdlib code (every 10th file)."""
    texts = [Path(p).read_text(encoding="utf-8") for p in stdlib_files[::10]]
    return SentencePieceTokenizer.train(texts, 1000, max_chars=300_000)


@pytest.fixture(scope="session")
def parsed_flags():
    """grain's mp_prefetch reads absl flags: mark them parsed outside absl.app.run."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
