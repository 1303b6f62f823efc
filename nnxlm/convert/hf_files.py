"""Reading and writing Hugging Face model directories: config.json plus safetensors files,
sharded (model.safetensors.index.json) or not, one tensor at a time."""

import json
import os

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from nnxlm.errors import UserError

SHARD_BYTES = 4 * 2**30  # transformers' default shard size for save_pretrained is about this


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{directory} has no config.json: give a Hugging Face model directory") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}): re-download the model") from None


class TensorReader:
    """Tensors of an HF checkpoint by name, read lazily from their safetensors file (memory-mapped)."""

    def __init__(self, directory: str):
        index_path = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index_path):
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        else:
            single = os.path.join(directory, "model.safetensors")
            if not os.path.exists(single):
                raise UserError(
                    f"{directory} has no model.safetensors or model.safetensors.index.json: "
                    "only safetensors checkpoints convert (save the model with safe_serialization)"
                )
            with safe_open(single, framework="np") as f:
                weight_map = {name: "model.safetensors" for name in f.keys()}
        self.directory, self.weight_map = directory, weight_map
        self._open = {}

    def names(self) -> set[str]:
        return set(self.weight_map)

    def get(self, name: str) -> np.ndarray:
        if name not in self.weight_map:
            raise UserError(
                f"the checkpoint in {self.directory} lacks tensor {name!r}: its config.json and weights disagree"
            )
        file = self.weight_map[name]
        if file not in self._open:
            self._open[file] = safe_open(os.path.join(self.directory, file), framework="np")
        return self._open[file].get_tensor(name)


def write_tensors(directory: str, tensors, shard_bytes: int = SHARD_BYTES) -> None:
    """Writes (name, array) pairs as safetensors shards of at most shard_bytes (with an index when
    there is more than one), holding at most one shard in memory."""
    parts = []  # (temporary path, tensor names)
    current, size = {}, 0
    for name, array in tensors:
        if current and size + array.nbytes > shard_bytes:
            parts.append(_save_part(directory, current, len(parts)))
            current, size = {}, 0
        current[name] = np.ascontiguousarray(array)
        size += array.nbytes
    parts.append(_save_part(directory, current, len(parts)))
    if len(parts) == 1:
        os.replace(parts[0][0], os.path.join(directory, "model.safetensors"))
        return
    weight_map = {}
    for number, (path, names) in enumerate(parts, start=1):
        final = f"model-{number:05d}-of-{len(parts):05d}.safetensors"
        os.replace(path, os.path.join(directory, final))
        weight_map.update(dict.fromkeys(names, final))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)


def _save_part(directory: str, tensors: dict, number: int) -> tuple[str, list[str]]:
    path = os.path.join(directory, f"part-{number:05d}.safetensors.tmp")
    save_file(tensors, path, metadata={"format": "pt"})  # "pt": transformers checks the format tag
    return path, list(tensors)
