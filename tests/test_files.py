import os

import pytest

from nnxlm import files


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "recipe.json"
    path.write_text("old")

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        files.write_atomically(str(path), "new")
    with pytest.raises(OSError):
        files.copy_atomically(str(path), str(tmp_path / "copy.json"))
    assert path.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["recipe.json"]
    monkeypatch.undo()
    files.write_atomically(str(tmp_path / "new" / "a.json"), "new")
    files.copy_atomically(str(tmp_path / "new" / "a.json"), str(path))
    assert path.read_text() == "new"


def test_writes_to_a_bucket_are_atomic_too_and_copies_cross_file_systems(fake_gcs, tmp_path, monkeypatch):
    from etils.epath import backend

    files.write_atomically("gs://bucket/run/recipe.json", "old")
    stored = fake_gcs / "bucket" / "run"

    def unavailable(*_):
        raise OSError("503 Service Unavailable")

    with monkeypatch.context() as patch, pytest.raises(OSError):
        patch.setattr(backend.fsspec_backend, "replace", unavailable)  # the step that publishes the file
        files.write_atomically("gs://bucket/run/recipe.json", "new")
    assert (stored / "recipe.json").read_text() == "old" and os.listdir(stored) == ["recipe.json"]
    (tmp_path / "tokenizer.model").write_bytes(b"\0local")
    files.copy_atomically(str(tmp_path / "tokenizer.model"), "gs://bucket/run/tokenizer.model")
    files.copy_atomically("gs://bucket/run/recipe.json", str(tmp_path / "recipe.json"))
    assert (stored / "tokenizer.model").read_bytes() == b"\0local" and (tmp_path / "recipe.json").read_text() == "old"
