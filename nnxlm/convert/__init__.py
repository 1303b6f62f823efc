"""Hugging Face interop: `from_hf` turns an HF model directory into an nnxlm run directory,
`to_hf` writes an nnxlm model as config.json + safetensors that transformers loads.

Both stream tensor by tensor: peak memory is about the converted model plus its largest tensor.
"""

import json
import os
import shutil

import fiddle as fdl
import jax
import numpy as np
from flax import nnx

from nnxlm.checkpointing import ModelReader, save_model_checkpoint, stack_layers
from nnxlm.convert.families import family_of_config, family_of_model
from nnxlm.convert.hf_files import TensorReader, read_config, write_tensors
from nnxlm.errors import UserError
from nnxlm.modules.moe import RoutingBias
from nnxlm.recipes.serialization import to_json

# HF tensors that hold nothing a model needs (buffers recomputed from the config).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def from_hf(source: str, destination: str) -> str:
    """Converts the HF model directory `source` into the nnxlm run directory `destination`
    (checkpoint step 0 with the recipe, and the tokenizer files) and returns destination."""
    from nnxlm.recipes import experiments

    config = read_config(source)
    family = family_of_config(config)
    if config.get("quantization_config"):  # e.g. DeepSeek-V3's published fp8 weights with their scales
        method = config["quantization_config"].get("quant_method", "quantized")
        raise UserError(
            f"config.json quantization_config ({method}) is not supported: convert the unquantized "
            "(bf16 or fp32) weights of the model"
        )
    reader = TensorReader(source)
    if family.complete_config is not None:
        config = family.complete_config(config, reader.names())
    model_recipe = family.recipe(config)
    abstract = nnx.eval_shape(lambda: fdl.build(model_recipe)(rngs=nnx.Rngs(0)))
    target = stack_layers(nnx.to_pure_dict(nnx.state(abstract)))
    params = _read_params(family.tensors(config), reader, target)
    if os.path.exists(os.path.join(destination, "checkpoints")):
        raise UserError(f"{destination} already holds checkpoints: convert into a new directory")
    os.makedirs(destination, exist_ok=True)
    copied = [name for name in TOKENIZER_FILES if os.path.exists(os.path.join(source, name))]
    for name in copied:
        shutil.copy(os.path.join(source, name), os.path.join(destination, name))
    recipe = experiments.trainer(model_recipe, name=os.path.basename(os.path.normpath(destination)))
    tokenizers = [name for name in ("tokenizer.model", "tokenizer.json") if name in copied]
    if tokenizers:  # the model's own tokenizer, wherever the run directory later trains
        recipe.tokenizer_path = os.path.join(os.path.abspath(destination), tokenizers[0])
    save_model_checkpoint(os.path.join(destination, "checkpoints"), 0, params, to_json(recipe))
    with open(os.path.join(destination, "recipe.json"), "w", encoding="utf-8") as f:
        json.dump(to_json(recipe), f, indent=1)
    return destination


def _read_params(tensors, reader: TensorReader, target: dict) -> dict:
    global_tensors, layer_tensors = tensors
    params = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), target)
    used = set()
    for tensor in global_tensors:
        _set(params, tensor.path, tensor.to_nnx(reader.get(tensor.hf), _get(params, tensor.path).shape))
        used.add(tensor.hf)
    for tensor in layer_tensors:
        count = _stack_size(_get(params, tensor.stack))
        if tensor.shared:  # a copy of a model-level parameter, which is read once, above
            used.update(name for _, name in _layer_names(tensor, count, ()) if name in reader.names())
            continue
        stacked = _get(params, (*tensor.stack, *tensor.path))
        for index, name in _layer_names(tensor, count, stacked.shape[1:]):
            stacked[index] = tensor.to_nnx(reader.get(name), stacked[index].shape)
            used.add(name)
    unused = sorted(n for n in reader.names() - used if not n.endswith(IGNORED_SUFFIXES))
    if unused:
        raise UserError(
            f"tensor {unused[0]} (and {len(unused) - 1} more) has no place in the nnxlm model: "
            "this variant of the architecture is not supported"
        )
    return params


def _layer_names(tensor, num_layers: int, layer_shape) -> list[tuple[tuple[int, ...], str]]:
    """(index into the stacked parameter, HF name) for every layer (and expert) of a tensor rule's
    stack of num_layers; layer_shape is one layer's shape (its first axis counts the experts of an
    {e} rule). HF numbers the stack's layers from tensor.first."""
    first = tensor.first
    if "{e}" not in tensor.hf:
        return [((i,), tensor.hf.format(i=first + i)) for i in range(num_layers)]
    experts = layer_shape[0]
    return [((i, e), tensor.hf.format(i=first + i, e=e)) for i in range(num_layers) for e in range(experts)]


def _is_list(node) -> bool:
    """An unscanned model's layer stack: a pure dict keyed by layer number."""
    return isinstance(node, dict) and bool(node) and all(isinstance(key, int) for key in node)


def _stack_size(node) -> int:
    return len(node) if _is_list(node) else jax.tree.leaves(node)[0].shape[0]


def _get(tree: dict, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path, value) -> None:
    _get(tree, path[:-1])[path[-1]][...] = value


def to_hf(model_or_path, destination: str) -> str:
    """Writes an nnxlm model (or the model of a run directory / checkpoint) as an HF model directory.
    From a checkpoint it reads one parameter at a time, so memory stays near the largest parameter
    (the model is never built); from a model, near the model plus one tensor."""
    if not isinstance(model_or_path, str):
        _write_hf(model_or_path, None, destination)
        return destination
    with ModelReader(model_or_path) as reader:
        _write_hf(reader.model, reader, destination)
    run_dir = model_or_path
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(run_dir, name)):
            shutil.copy(os.path.join(run_dir, name), os.path.join(destination, name))
    return destination


def _write_hf(model: nnx.Module, reader: ModelReader | None, destination: str) -> None:
    """config.json and the safetensors of `model`, whose parameters come from `reader` where given
    (model is then abstract and layer stacks are read stacked, as checkpoints hold them)."""
    family = family_of_model(model)
    config = family.hf_config(model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Any(nnx.Param, RoutingBias)))
    if reader is not None:
        params = stack_layers(params)
    global_tensors, layer_tensors = family.tensors(config)

    def parameter(path):  # the whole parameter at path (a stacked one for a layer tensor)
        return reader.read(path) if reader is not None else _get(params, path)

    def tensors():  # one at a time: memory holds one parameter (and one of its tensors) beside the model
        for tensor in global_tensors:
            yield tensor.hf, tensor.to_hf(np.asarray(parameter(tensor.path)))
        for tensor in layer_tensors:
            stack = _get(params, tensor.stack)
            count = _stack_size(stack)
            if tensor.shared:
                shared = np.asarray(parameter(tensor.path))
                for _, name in _layer_names(tensor, count, ()):
                    yield name, tensor.to_hf(shared)
                continue
            if _is_list(stack):  # an unscanned model: each layer holds its own parameters
                layer_shape = _get(stack[0], tensor.path).shape
                for index, name in _layer_names(tensor, count, layer_shape):
                    yield name, tensor.to_hf(np.asarray(_get(stack[index[0]], tensor.path)[index[1:]]))
                continue
            stacked = parameter((*tensor.stack, *tensor.path))
            for index, name in _layer_names(tensor, count, stacked.shape[1:]):
                yield name, tensor.to_hf(np.asarray(stacked[index]))
            stacked = None  # freed before the next parameter is read

    os.makedirs(destination, exist_ok=True)
    write_tensors(destination, tensors())
    with open(os.path.join(destination, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)


__all__ = ["from_hf", "to_hf"]
