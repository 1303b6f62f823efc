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
