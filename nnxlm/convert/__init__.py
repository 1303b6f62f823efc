"""Hugging Face interop: `from_hf` turns an HF model directory into an nnxlm run directory,
`to_hf` writes an nnxlm model as config.json + safetensors that transformers loads.

Both stream tensor by tensor: peak memory is about the converted model plus its largest tensor.
"""

import json
import sys

import fiddle as fdl
import jax
import ml_dtypes
import numpy as np
from etils import epath
from flax import nnx

from nnxlm.checkpointing import ModelReader, collapse_kernels, save_model_checkpoint, stored_layout
from nnxlm.convert import peft
from nnxlm.convert.families import family_of_config, family_of_model
from nnxlm.convert.hf_files import TensorReader, read_config, write_tensors
from nnxlm.data.tokenizer import TOKENIZER_FILES, find_tokenizer, load_tokenizer
from nnxlm.errors import UserError
from nnxlm.files import absolute, copy_atomically, require_empty_directory, write_atomically
from nnxlm.modules.moe import RoutingBias
from nnxlm.modules.quantization import quantized
from nnxlm.recipes.serialization import as_config, to_json
from nnxlm.recipes.validation import check_recipe

# HF tensors that hold nothing a model needs (buffers recomputed from the config).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# What to-hf writes weights as (default: as the run holds them, usually float32).
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def from_hf(source: str, destination: str, base: str | None = None) -> str:
    """Converts the HF model directory `source` into the nnxlm run directory `destination`
    (checkpoint step 0 with the recipe, and the tokenizer files) and returns destination.

    A `source` holding a peft LoRA adapter (adapter_config.json) is imported with its base model:
    `base`, else the adapter's base_model_name_or_path when that is a local directory, else
    source itself when it also holds config.json. The run's model then has the adapters (and
    trains them alone: trainable="lora")."""
    from nnxlm.recipes import experiments

    out = absolute(destination)  # checked before any tensor is read
    if out.exists() and not out.is_dir():
        raise UserError(f"the destination {destination} is a file: give a new directory")
    if (out / "checkpoints").exists():
        raise UserError(f"{destination} already holds checkpoints: convert into a new directory")
    adapter = source if (epath.Path(source) / peft.CONFIG_FILE).exists() else None
    model_dir = _base_directory(adapter, base) if adapter else source
    config, family, reader = _open_hf(model_dir)
    try:
        model_recipe = family.recipe(config)
    except (TypeError, ValueError, KeyError) as e:  # e.g. "rope_theta": "abc" (a UserError passes)
        raise UserError(
            f"{model_dir}/config.json holds a field nnxlm cannot read ({type(e).__name__}: {e}): "
            "the config is malformed, or not the architecture it names"
        ) from None
    model_recipe.context_length = _context_length(config, model_dir)
    if adapter:
        adapter_config = peft.read_adapter_config(adapter)
        linear = [t for ts in family.tensors(config) for t in ts if _is_linear(t)]
        rules = peft.targeted(adapter_config, linear, int(config.get("num_hidden_layers", 0)))
        if not rules:
            raise UserError(f"{adapter}: target_modules {adapter_config.get('target_modules')} match no module")
        model_recipe.lora = as_config(peft.lora_of(adapter_config, sorted({r.path[-1] for r in rules})))
    check_recipe(model_recipe, "model")
    abstract = nnx.eval_shape(lambda: fdl.build(model_recipe)(rngs=nnx.Rngs(0)))
    target = stored_layout(nnx.to_pure_dict(nnx.state(abstract)))
    params = _read_params(family.tensors(config), reader, target)
    if adapter:
        _read_adapter(rules, peft.adapter_reader(adapter), params, reader)
    out.mkdir(parents=True, exist_ok=True)
    copied = [name for name in TOKENIZER_FILES if (epath.Path(model_dir) / name).exists()]
    for name in copied:
        copy_atomically(epath.Path(model_dir) / name, out / name)
    if not {"tokenizer.json", "tokenizer.model"} & set(copied):  # the weights alone are a valid conversion
        print(
            f"nnxlm: {model_dir} has no tokenizer.json or tokenizer.model, so {destination} has no tokenizer: "
            "decode, serve, chat and fine-tuning on text need the model's tokenizer files copied into it",
            file=sys.stderr,
        )
    recipe = experiments.trainer(model_recipe, name=out.name)
    recipe.train_data = recipe.eval_data = None  # the user's data: a fiddler (text_files, sft) sets it
    if adapter:
        recipe.trainable = "lora"
    # no tokenizer_path: the run directory's own copy is found there, wherever the directory moves,
    # and a run that starts from it (load_parameters_path) copies it into its own directory
    save_model_checkpoint(out / "checkpoints", 0, params, to_json(recipe))
    write_atomically(out / "recipe.json", json.dumps(to_json(recipe), indent=1))
    return destination


def _context_length(config: dict, model_dir: str) -> int | None:
    """config.json's max_position_embeddings: the context the model was made for (None: not given)."""
    length = config.get("max_position_embeddings")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 2):
        raise UserError(
            f"{model_dir}/config.json max_position_embeddings={length!r} is not a context length: "
            "give the model's context in tokens (a whole number of at least 2)"
        )
    return length


def _base_directory(adapter: str, base: str | None) -> str:
    named = peft.read_adapter_config(adapter).get("base_model_name_or_path")
    for candidate in (base, named if named and epath.Path(named).is_dir() else None, adapter):
        if candidate and (epath.Path(candidate) / "config.json").exists():
            return candidate
    raise UserError(
        f"{adapter} holds a LoRA adapter whose base model ({named!r}) is not a local directory: "
        "give the base model's directory (--base DIR)"
    )


def _open_hf(directory: str):
    """(config.json completed from the tensor names, the Family, a TensorReader) of an HF model."""
    config = read_config(directory)
    family = family_of_config(config)
    if config.get("quantization_config"):  # e.g. DeepSeek-V3's published fp8 weights with their scales
        method = config["quantization_config"].get("quant_method", "quantized")
        raise UserError(
            f"config.json quantization_config ({method}) is not supported: convert the unquantized "
            "(bf16 or fp32) weights of the model"
        )
    reader = TensorReader(directory)
    if family.complete_config is not None:
        config = family.complete_config(config, reader.names())
    return config, family, reader


def read_hf_parameters(directory: str, target: dict, model: nnx.Module) -> dict:
    """The parameters of the HF model in `directory` as numpy arrays, onto `target` (the stored
    layout of `model`'s parameters, e.g. a recipe's model to fine-tune)."""
    config, family, reader = _open_hf(directory)
    expected = family_of_model(model)
    if expected is not family:
        raise UserError(
            f"{directory} holds a {family.architecture} but the recipe's model is a {expected.architecture}: "
            "start from the recipe of the converted model (nnxlm convert from-hf) or fix the recipe"
        )
    return _read_params(family.tensors(config), reader, target)


def _is_linear(tensor) -> bool:
    return tensor.contract not in (None, 0) and tensor.hf.endswith(".weight") and not tensor.shared


TIED_HEAD = "lm_head.weight"


def _tied_embedding(global_tensors) -> str | None:
    """The embedding's HF name where the head is tied to it (no tensor is read into `head`)."""
    if any(tensor.path == ("head",) for tensor in global_tensors):
        return None
    return next((tensor.hf for tensor in global_tensors if tensor.path == ("embedder", "embedding")), None)


def _read_params(tensors, reader: TensorReader, target: dict) -> dict:
    global_tensors, layer_tensors = tensors
    params = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), target)
    used = set()
    for tensor in global_tensors:
        path = _kernel_path(params, tensor.path)
        _set(params, path, tensor.to_nnx(reader.get(tensor.hf), _get(params, path).shape))
        used.add(tensor.hf)
    for tensor in layer_tensors:
        count = _stack_size(_get(params, tensor.stack))
        if tensor.shared:  # a copy of a model-level parameter, which is read once, above
            used.update(name for _, name in _layer_names(tensor, count, ()) if name in reader.names())
            continue
        stacked = _get(params, _kernel_path(params, (*tensor.stack, *tensor.path)))
        for index, name in _layer_names(tensor, count, stacked.shape[1:]):
            stacked[index] = tensor.to_nnx(reader.get(name), stacked[index].shape)
            used.add(name)
    unused = sorted(n for n in reader.names() - used if not n.endswith(IGNORED_SUFFIXES))
    if TIED_HEAD in unused and (embedding := _tied_embedding(global_tensors)) in reader.names():
        # tie_word_embeddings with a copy of the head saved anyway (some exports write it): transformers
        # ties the head to the embedding, so a copy equal to it is passed over and another refused
        head, table = reader.get(TIED_HEAD), reader.get(embedding)
        if head.shape != table.shape or not np.array_equal(head, table):
            raise UserError(
                f"config.json ties the output head to the embedding (tie_word_embeddings) but {TIED_HEAD} is not "
                f"{embedding}: set tie_word_embeddings to false in config.json to convert the model's own head"
            )
        unused.remove(TIED_HEAD)
    if unused:
        raise UserError(
            f"tensor {unused[0]} (and {len(unused) - 1} more) has no place in the nnxlm model: "
            "this variant of the architecture is not supported"
        )
    return params


def _read_adapter(rules, reader: TensorReader, params: dict, base: TensorReader) -> None:
    """Fills the adapters of `params` (stored layout) from a peft adapter's tensors. peft also saves
    copies of the base model's embedding and head weights with an adapter that targets them
    (lm_head.base_layer.weight) or whose vocabulary was resized: copies equal to the `base` model's
    own tensors are passed over, others refused."""
    used = set()
    for rule in rules:
        adapter = _get(params, (*rule.stack, *rule.path, "adapter") if "{i}" in rule.hf else (*rule.path, "adapter"))
        a, b = adapter["a"], adapter["b"]
        layered = "{i}" in rule.hf
        names = _layer_names(rule, a.shape[0], a.shape[1:]) if layered else [((), rule.hf)]
        for index, name in names:
            module = peft.PREFIX + name[: -len(".weight")]
            if module + ".lora_A.weight" not in reader.names():
                raise UserError(
                    f"the adapter has no {module.removeprefix(peft.PREFIX)}.lora_A: it adapts only some layers' "
                    f"{rule.hf.rsplit('.', 2)[-2]} (a target_modules pattern, exclude_modules), and nnxlm's LoRA "
                    f"adapts a projection in every layer: {peft.MERGE_IN_PEFT}"
                )
            lora_a, lora_b = reader.get(module + ".lora_A.weight"), reader.get(module + ".lora_B.weight")
            a[index], b[index] = peft.nnx_arrays(rule, lora_a, lora_b, a[index].shape, b[index].shape)
            used.update((module + ".lora_A.weight", module + ".lora_B.weight"))
    unused = sorted(reader.names() - used)
    embedding = [name for name in unused if "lora_embedding_" in name]
    if embedding:
        raise UserError(
            f"adapter tensor {embedding[0]} is a LoRA on an embedding, which nnxlm's LoRA does not have: "
            f"leave embed_tokens out of target_modules, or {peft.MERGE_IN_PEFT}"
        )
    for name in unused:
        base_name = name.removeprefix(peft.PREFIX).replace(".base_layer.", ".")
        if base_name not in base.names():
            raise UserError(
                f"adapter tensor {name} (and {len(unused) - 1} more) has no place in the nnxlm model, which reads "
                f"LoRA A and B of linear layers: {peft.MERGE_IN_PEFT}"
            )
        copy, original = reader.get(name), base.get(base_name)
        if copy.shape != original.shape or not np.array_equal(copy.astype(np.float32), original.astype(np.float32)):
            raise UserError(
                f"adapter tensor {name} is not the base model's {base_name} (a resized vocabulary, or "
                f"another base): convert the adapter with its own base model (--base DIR), or {peft.MERGE_IN_PEFT}"
            )


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


def _kernel_path(tree: dict, path) -> tuple:
    """path, or the path of its kernel where a conversion rule's parameter is a projection module
    (one with a LoRA adapter: the stored layout keeps bare projections as their kernels)."""
    return (*path, "kernel") if isinstance(_get(tree, path), dict) else tuple(path)


def _set(tree: dict, path, value) -> None:
    _get(tree, path[:-1])[path[-1]][...] = value


def to_hf(
    model_or_path,
    destination: str,
    *,
    adapter: bool = False,
    merged: bool = False,
    dtype: str | None = None,
    base: str | None = None,
) -> str:
    """Writes an nnxlm model (or the model of a run directory / checkpoint) as an HF model directory.
    From a checkpoint it reads one parameter at a time, so memory stays near the largest parameter
    (the model is never built); from a model, near the model plus one tensor.

    A model with LoRA adapters is written as its merged weights (merged=True: W + scale A B, a plain
    HF model) or as a peft adapter alone (adapter=True: adapter_config.json and
    adapter_model.safetensors, loaded with peft onto the base model); `base` names that base model
    (its HF directory or hub name) as adapter_config.json's base_model_name_or_path.

    dtype: one of EXPORT_DTYPES for the written weights; None: as the model holds them."""
    if adapter and merged:
        raise UserError("choose one of --adapter and --merged")
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype {dtype} cannot be exported: give one of {', '.join(EXPORT_DTYPES)}")
    if base is not None and not adapter:
        raise UserError("--base names the base model of an --adapter export: add --adapter, or leave --base out")
    require_empty_directory(destination, "the destination")
    export = dict(adapter=adapter, merged=merged, dtype=dtype, base=base)
    if isinstance(model_or_path, nnx.Module):
        _write_hf(model_or_path, None, destination, **export)
        return destination
    with ModelReader(model_or_path) as reader:
        folded = reader.info.get("adapter_base")
        if adapter and base is None and isinstance(folded, str):
            raise UserError(
                f"the adapters of {model_or_path} were trained on {folded} with that run's own adapters merged "
                f"into its weights, so they go on that merged model: export it (nnxlm convert to-hf {folded} "
                "BASE_DIR --merged) and give --base BASE_DIR, or export this run --merged"
            )
        if adapter and isinstance(folded, str):
            print(f"nnxlm: adapters for the merged export of {folded}, which --base names: {base}", file=sys.stderr)
        _write_hf(reader.model, reader, destination, **export)
    run_dir = epath.Path(model_or_path)
    for name in TOKENIZER_FILES:
        if (run_dir / name).exists():
            copy_atomically(run_dir / name, epath.Path(destination) / name)
    if not adapter:
        _write_special_token_ids(destination)
    return destination


def _write_special_token_ids(destination: str) -> None:
    """bos / eos / pad token ids of the exported tokenizer into config.json and
    generation_config.json, where transformers' generate finds when to stop (without them it
    never stops at the end of a text)."""
    path = find_tokenizer(destination)
    if not epath.Path(path).exists():
        return
    tokenizer = load_tokenizer(path)
    try:
        eos = tokenizer.eos_id
    except UserError:  # a tokenizer that names no eos token: nothing to stop at
        return
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos, "pad_token_id": tokenizer.pad_id}
    ids = {key: int(value) for key, value in ids.items() if value is not None}
    config_path = epath.Path(destination) / "config.json"
    config = json.loads(config_path.read_text())
    write_atomically(config_path, json.dumps({**config, **ids}, indent=1))
    write_atomically(epath.Path(destination) / "generation_config.json", json.dumps(ids, indent=1))


def _write_hf(model: nnx.Module, reader: ModelReader | None, destination: str, *, adapter, merged, dtype, base) -> None:
    """config.json and the safetensors of `model` (or its peft adapter), whose parameters come from
    `reader` where given (model is then abstract and layer stacks are read stacked, as checkpoints
    hold them)."""
    if quantized(model) and not adapter:
        raise UserError(
            "the model's weights are int8: export its float run (nnxlm quantize left it as it was), "
            "or only its LoRA adapters (--adapter)"
        )
    family = family_of_model(model)
    config = family.hf_config(model)
    if model.context_length is not None:  # the context it came with, not the family's usual one
        config["max_position_embeddings"] = model.context_length
    params = nnx.to_pure_dict(nnx.state(model, nnx.Any(nnx.Param, RoutingBias)))
    params = stored_layout(params) if reader is not None else collapse_kernels(params)
    global_tensors, layer_tensors = family.tensors(config)
    lora = getattr(model, "lora", None)
    if lora is None and (adapter or merged):
        raise UserError("the model has no LoRA adapters: export it without --adapter or --merged")
    if lora is not None and not (adapter or merged):
        raise UserError("the model has LoRA adapters: export --merged (one HF model) or --adapter (a peft adapter)")

    def parameter(path):  # the whole parameter at path (a stacked one for a layer tensor)
        return reader.read(path) if reader is not None else _get(params, path)

    def merge(kernel, a, b):  # W + scale A B of one layer's projection
        update = np.asarray(a, np.float32).reshape(-1, a.shape[-1]) @ np.asarray(b, np.float32).reshape(b.shape[0], -1)
        return (np.asarray(kernel, np.float32) + lora.scale * update.reshape(kernel.shape)).astype(kernel.dtype)

    def weight(path):  # the whole kernel at path, merged with its adapter's update where it has one
        if not isinstance(_get(params, path), dict):
            return np.asarray(parameter(path))
        parts = [np.asarray(parameter((*path, *part))) for part in (("kernel",), ("adapter", "a"), ("adapter", "b"))]
        return merge(*parts)

    def tensors():  # one at a time: memory holds one parameter (and one of its tensors) beside the model
        for tensor in global_tensors:
            yield tensor.hf, tensor.to_hf(weight(tensor.path))
        for tensor in layer_tensors:
            stack = _get(params, tensor.stack)
            count = _stack_size(stack)
            if tensor.shared:
                shared = np.asarray(parameter(tensor.path))
                for _, name in _layer_names(tensor, count, ()):
                    yield name, tensor.to_hf(shared)
                continue
            if _is_list(stack):  # an unscanned model: each layer holds its own parameters
                layer_shape = _get(stack[0], _kernel_path(stack[0], tensor.path)).shape
                for index, name in _layer_names(tensor, count, layer_shape):
                    yield name, tensor.to_hf(weight((*tensor.stack, index[0], *tensor.path))[index[1:]])
                continue
            path = (*tensor.stack, *tensor.path)
            if isinstance(_get(params, path), dict):  # an adapted projection, merged layer by layer
                kernel, a, b = (parameter((*path, *part)) for part in (("kernel",), ("adapter", "a"), ("adapter", "b")))
                for index, name in _layer_names(tensor, count, kernel.shape[1:]):
                    yield (
                        name,
                        tensor.to_hf(merge(np.asarray(kernel[index]), np.asarray(a[index]), np.asarray(b[index]))),
                    )
                continue
            stacked = parameter(path)
            for index, name in _layer_names(tensor, count, stacked.shape[1:]):
                yield name, tensor.to_hf(np.asarray(stacked[index]))
            stacked = None  # freed before the next parameter is read

    written = []  # the dtype of what was written, for config.json

    def cast(pairs):
        for name, array in pairs:
            array = np.asarray(array) if dtype is None else np.asarray(array).astype(EXPORT_DTYPES[dtype])
            written.append(array.dtype)
            yield name, array

    epath.Path(destination).mkdir(parents=True, exist_ok=True)
    if adapter:
        _write_adapter(params, parameter, (global_tensors, layer_tensors), lora, destination, cast, base)
        return
    write_tensors(destination, cast(tensors()))
    # "dtype" is what transformers 5 reads, "torch_dtype" what earlier versions (and vLLM) read
    config["torch_dtype"] = config["dtype"] = str(written[0])
    write_atomically(epath.Path(destination) / "config.json", json.dumps(config, indent=1))


def _write_adapter(params, parameter, tables, lora, destination: str, cast, base: str | None) -> None:
    """The model's adapters as a peft LoRA adapter (nnxlm.convert.peft)."""

    def has_adapter(rule) -> bool:
        stack = _get(params, rule.stack) if "{i}" in rule.hf else None
        node = _get(stack[0] if _is_list(stack) else stack, rule.path) if stack is not None else _get(params, rule.path)
        return isinstance(node, dict) and "adapter" in node

    rules = peft.adapted_tensors(tables, has_adapter)

    def tensors():
        for rule in rules:
            if "{i}" not in rule.hf:
                places = [(rule.hf, rule.path, ())]
            else:
                stack = _get(params, rule.stack)
                names = _layer_names(rule, _stack_size(stack), ())
                if _is_list(stack):  # an unscanned model's own layers
                    places = [(name, (*rule.stack, i, *rule.path), ()) for (i,), name in names]
                else:  # slices of the stacked factors
                    places = [(name, (*rule.stack, *rule.path), (i,)) for (i,), name in names]
            factors = {}
            for name, path, index in places:
                if path not in factors:  # each parameter read once
                    factors[path] = tuple(np.asarray(parameter((*path, "adapter", part))) for part in ("a", "b"))
                a, b = factors[path]
                lora_a, lora_b = peft.peft_arrays(rule, a[index], b[index])
                module = peft.PREFIX + name[: -len(".weight")]
                yield module + ".lora_A.weight", lora_a
                yield module + ".lora_B.weight", lora_b

    peft.write_adapter(destination, peft.adapter_config(lora, rules, base=base), cast(tensors()))


__all__ = ["from_hf", "to_hf"]
