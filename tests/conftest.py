"""Test-wide setup: CPU only, absl flags parsed (grain worker processes read them)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Runs the test from an empty directory (run directories default to ./runs/<name>)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
