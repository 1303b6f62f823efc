import json

import fiddle as fdl
import numpy as np
from flax import nnx

import nnxlm
from nnxlm.convert import from_hf, to_hf
from nnxlm.convert.hf_files import TensorReader, write_tensors
from nnxlm.recipes import models


def test_sharded_safetensors_round_trip_one_tensor_at_a_time(tmp_path):
    tensors = {f"t{i}": np.full((10, 10), i, np.float32) for i in range(5)}  # 400 bytes each
    write_tensors(str(tmp_path), iter(tensors.items()), shard_bytes=900)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    reader = TensorReader(str(tmp_path))
    assert reader.names() == set(tensors)
    for name, array in tensors.items():
        np.testing.assert_array_equal(reader.get(name), array)


def test_an_unscanned_model_exports_and_comes_back_with_the_same_logits(tmp_path):
    cfg = models.llama_tiny(vocab_size=97)
    cfg.scan_layers = False
    model = fdl.build(cfg)(rngs=nnx.Rngs(3))
    to_hf(model, str(tmp_path / "hf"))
    from_hf(str(tmp_path / "hf"), str(tmp_path / "run"))
    ids = np.array([[5, 1, 4, 1, 5, 9, 2, 6]], np.int32)
    np.testing.assert_allclose(nnxlm.load_model(str(tmp_path / "run"))(ids), model(ids), atol=1e-5, rtol=1e-5)
