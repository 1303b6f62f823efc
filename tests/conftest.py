"""Test-wide setup: CPU only, absl flags parsed (grain worker processes read them); a small
SentencePiece tokenizer trained on stdlib code for the tests that need real text."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# the measured CPU peak (for MFU) is cached per machine: here, per test session, not in ~/.cache
os.environ.setdefault("NNXLM_CACHE_DIR", __import__("tempfile").mkdtemp(prefix="nnxlm-cache-"))
# XLA programs are cached on disk for the session, every program however quick to compile: the many
# trainers, engines and subprocesses (restarted runs, fake-device meshes) that build the same
# programs load them instead of compiling again. Tracing is unchanged, so trace counts still count.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", __import__("tempfile").mkdtemp(prefix="nnxlm-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# XLA:CPU's code generation at LLVM's -O0 (XLA's HLO passes, sharding, collectives and buffer
# assignment are unchanged): the suite is mostly compilation of hundreds of small programs, each run
# a few times, and this cuts `make test` by about a third. Results may differ from -O2 programs in
# the last bits (e.g. where -O2 fuses a multiply and an add): within the tests' tolerances, and the
# exact comparisons are between programs compiled alike.
# Subprocesses inherit the flag; the tests that set XLA_FLAGS for fake devices append to it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from absl import flags  # noqa: E402

from tests.fake_gcs import fake_gcs  # noqa: E402, F401 (gs:// paths kept in a local directory)

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Runs the test from an empty directory (run directories default to ./runs/<name>)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def stdlib_files():
    """Paths of the stdlib files of the train split (sorted)."""
    from nnxlm.data import PythonStdlib

    return PythonStdlib(eval_fraction=0.0).documents()


@pytest.fixture(scope="session")
def small_tokenizer(stdlib_files):
    """A vocab-1000 tokenizer trained on ~300 k characters of stdlib code (every 10th file)."""
    from nnxlm.data import SentencePieceTokenizer

    texts = [Path(p).read_text(encoding="utf-8") for p in stdlib_files[::10]]
    return SentencePieceTokenizer.train(texts, 1000, max_chars=300_000)


@pytest.fixture(scope="session")
def text_run(tmp_path_factory):
    """A few steps of a tiny model on Python source with its own 512-token tokenizer."""
    import fiddle as fdl

    import nnxlm
    from nnxlm.data import PythonStdlib
    from nnxlm.recipes import models

    cfg = nnxlm.recipes.tiny()
    cfg.model = models.llama_tiny(vocab_size=512)
    cfg.train_data, cfg.eval_data = fdl.Config(PythonStdlib), None
    cfg.tokenizer_train_chars = 300_000
    cfg.num_steps, cfg.checkpoint_every = 3, 0
    cfg.workdir = str(tmp_path_factory.mktemp("decode") / "run")
    fdl.build(cfg).fit()
    return cfg.workdir
