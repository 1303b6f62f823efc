"""Fixtures for the data tests."""

import pytest


@pytest.fixture(scope="session")
def parsed_flags():
    """grain's mp_prefetch reads absl flags: mark them parsed outside absl.app.run."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
