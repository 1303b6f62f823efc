"""nnxlm never unpickles: a Hugging Face directory with only PyTorch's pickle formats is refused in
one line naming the file and the fix (safetensors), and the pickle is never opened."""

import pickle
import shutil

import fiddle as fdl
import pytest
from flax import nnx

from nnxlm.cli import main
from nnxlm.convert import to_hf
from nnxlm.convert.hf_files import TensorReader
from nnxlm.errors import UserError
from nnxlm.recipes import models


class _WritesAFile:
    """Unpickling this writes its path: what loading a hostile pytorch_model.bin could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "model"
    to_hf(fdl.build(models.llama_tiny(vocab_size=97))(rngs=nnx.Rngs(0)), str(directory))
    return directory


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_a_directory_of_pickled_weights_is_refused_without_opening_them(tmp_path, capsys, hf_model, name):
    source = tmp_path / "theirs"
    shutil.copytree(hf_model, source)
    (source / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (source / name).write_bytes(pickle.dumps(_WritesAFile(marker)))
    assert main(["convert", "from-hf", str(source), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{source / name} is a pickle" in err and "safetensors" in err, err
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_a_peft_adapter_in_pickle_form_is_refused_by_name(tmp_path):
    (tmp_path / "adapter_model.bin").write_bytes(pickle.dumps(_WritesAFile(tmp_path / "unpickled")))
    with pytest.raises(UserError, match=r"adapter_model\.bin is a pickle.*adapter_model\.safetensors") as error:
        TensorReader(str(tmp_path), file="adapter_model.safetensors")
    assert "\n" not in str(error.value) and not (tmp_path / "unpickled").exists()


def test_a_directory_without_weights_still_says_what_it_lacks(tmp_path):
    with pytest.raises(UserError, match="has no model.safetensors or model.safetensors.index.json"):
        TensorReader(str(tmp_path))
