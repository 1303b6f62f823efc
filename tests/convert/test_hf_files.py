import json

import fiddle as fdl
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import nnxlm
from nnxlm.checkpointing import Checkpointer
from nnxlm.convert import from_hf, to_hf
from nnxlm.convert.hf_files import TensorReader, write_tensors
from nnxlm.errors import UserError
from nnxlm.recipes import models
from nnxlm.recipes.serialization import to_json


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


MIXED = {
    "bf16": np.arange(24).astype(ml_dtypes.bfloat16).reshape(2, 3, 4),
    "scalar": np.array(7, np.int64),
    "transposed": np.arange(12, dtype=np.float32).reshape(3, 4).T,  # not C-contiguous
    "empty": np.zeros((0, 4), np.float16),
    "mask": np.array([True, False, True]),
}


@pytest.mark.parametrize("header_reserve", [2**20, 16])  # 16: every header outgrows its space
def test_streamed_shards_read_back_with_safetensors_and_the_reader(tmp_path, header_reserve):
    write_tensors(str(tmp_path), iter(MIXED.items()), shard_bytes=50, header_reserve=header_reserve)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 4 and not list(tmp_path.glob("*.tmp*"))
    loaded = {}
    for file in files:
        loaded.update(load_file(tmp_path / file))
    reader = TensorReader(str(tmp_path))
    for name, array in MIXED.items():
        for got in (loaded[name], reader.get(name)):
            assert got.dtype == array.dtype and got.shape == array.shape
            np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize("shard_bytes", [50, 2**30])
def test_shards_stream_into_and_out_of_a_bucket(fake_gcs, shard_bytes):
    write_tensors("gs://bucket/hf", iter(MIXED.items()), shard_bytes=shard_bytes)  # staged, then uploaded
    stored = fake_gcs / "bucket" / "hf"
    files = sorted(p.name for p in stored.iterdir())
    assert len(files) == (5 if shard_bytes == 50 else 1) and not [f for f in files if ".tmp" in f]
    loaded = {}
    for file in (f for f in files if f.endswith(".safetensors")):
        loaded.update(load_file(stored / file))
    reader = TensorReader("gs://bucket/hf")
    for name, array in MIXED.items():
        for got in (loaded[name], reader.get(name)):
            assert got.dtype == array.dtype and got.shape == array.shape
            np.testing.assert_array_equal(got, array)


def test_a_damaged_safetensors_file_is_named_in_one_line(tmp_path):
    write_tensors(str(tmp_path), iter(MIXED.items()))
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # truncated inside the last tensor
    with pytest.raises(UserError, match="model.safetensors .*truncated.*re-download") as error:
        TensorReader(str(tmp_path))
    assert "\n" not in str(error.value)
    path.write_bytes(b"\x0a\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(UserError, match="bad header"):
        TensorReader(str(tmp_path))
    path.write_bytes(data[:5])
    with pytest.raises(UserError, match="shorter than its header"):
        TensorReader(str(tmp_path))


def test_a_training_checkpoint_exports_one_parameter_at_a_time(tmp_path):
    cfg = models.llama_tiny(vocab_size=97)
    cfg.scan_layers = False
    model = fdl.build(cfg)(rngs=nnx.Rngs(5))
    params = nnx.to_pure_dict(nnx.state(model))
    checkpointer = Checkpointer(str(tmp_path / "run" / "checkpoints"))
    state = {"model": params, "optimizer": {"count": jnp.zeros((), jnp.int32)}}  # saved as training saves it
    checkpointer.save(3, state, to_json(fdl.Config(dict, model=cfg)))
    checkpointer.wait()
    checkpointer.close()
    to_hf(str(tmp_path / "run"), str(tmp_path / "from_checkpoint"))
    to_hf(model, str(tmp_path / "from_model"))
    exported = load_file(tmp_path / "from_checkpoint" / "model.safetensors")
    expected = load_file(tmp_path / "from_model" / "model.safetensors")
    assert exported.keys() == expected.keys()
    for name, array in expected.items():
        np.testing.assert_array_equal(exported[name], array)
    assert (tmp_path / "from_checkpoint" / "config.json").read_text() == (
        tmp_path / "from_model" / "config.json"
    ).read_text()
