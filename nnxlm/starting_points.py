"""Where a run starts: its tokenizer, and the weights or train state of another run or HF model.

A run resumes from its own checkpoints first. Otherwise it may start from
- load_parameters_path: the parameters of a run directory, checkpoint or Hugging Face model
  directory (fresh optimizer, step 0). LoRA adapters the source lacks keep their initial values.
- load_full_state_path: the whole train state of a run directory or checkpoint (parameters,
  optimizer state, step); the data order starts over.
A run directory that holds only a model (`nnxlm convert from-hf`) starts from that model.

A pretrained model keeps its own tokenizer: the run uses tokenizer_path, or the tokenizer already in
its run directory, or copies the source's tokenizer files (and chat template) into it. Only a run
that starts from scratch trains a new tokenizer; a pretrained model without one is an error.
"""

import sys

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from nnxlm.checkpointing import (
    Checkpointer,
    checkpoint_name,
    find_checkpoint,
    from_stored_layout,
    load_recipe,
    restore_model,
    saved_adapter_base,
    saved_paths,
    stored_layout,
)
from nnxlm.checksums import path_name
from nnxlm.data import SentencePieceTokenizer, find_tokenizer, load_tokenizer
from nnxlm.data.tokenizer import COMPANION_FILES
from nnxlm.errors import UserError
from nnxlm.files import absolute, copy_atomically
from nnxlm.modules.quantization import float_layout, is_quantized_node, quantize_pure_dict, quantized


def is_hf_directory(path) -> bool:
    return (epath.Path(path) / "config.json").is_file() and not (epath.Path(path) / "checkpoints").is_dir()


def load_parameters(trainer, path: str) -> None:
    """Replaces the trainer's model parameters by those of `path` (see the module docstring)."""
    model_state = trainer.state["model"]
    target = trainer.abstract_state["model"]
    if is_hf_directory(path):
        float_source = True
        source_target = float_layout(target) if quantized(trainer.model) else target
        params = _hf_parameters(trainer, path, source_target)
    else:
        directory, step = find_checkpoint(path)
        saved = saved_paths(directory, step)
        trainer.adapter_base = saved_adapter_base(directory, step)  # its weights' own merged base, if any
        if not any("adapter" in p for p in saved):  # a base model: the adapters keep their init
            target = _without_adapters(target)
        else:
            trainer._starting_adapters = checkpoint_name(directory, step)
        float_source = not set(_scale_paths(target, "model")) & set(saved)
        quantize = quantized(trainer.model) and float_source
        read = float_layout(target) if quantize else target
        _check_same_parameters(read, saved, path)
        params = restore_model(directory, step, read)
    if quantized(trainer.model) and float_source:  # QLoRA from a float model: its weights, quantized
        params = quantize_pure_dict(trainer.model, params)
        params = jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), params, _matching(target, params))
    nnx.replace_by_pure_dict(model_state, params)
    print(f"nnxlm: starting from the parameters in {path}", file=sys.stderr)


def _check_same_parameters(target: dict, saved: list[str], source: str) -> None:
    """UserError unless the checkpoint's model holds exactly the parameters `target` reads: a
    parameter it lacks would be left unset, and one the recipe lacks silently dropped."""
    # a projection with adapters holds kernel/ and adapter/, one without is its kernel alone
    held = {p.removeprefix("model/").removesuffix("/kernel") for p in saved if p.startswith("model/")}
    wanted = {
        path_name(p).removesuffix("/kernel") for p, _ in jax.tree_util.tree_leaves_with_path(stored_layout(target))
    }
    missing, extra = sorted(wanted - held), sorted(held - wanted)
    if extra and all("adapter" in p.split("/") for p in extra) and not missing:
        raise UserError(
            f"{source} holds LoRA adapters ({extra[0]}) that the recipe's model lacks: give the recipe the same "
            "LoRA (its recipe.json, or fiddler:lora with its rank and targets), or start from its merged export "
            "(nnxlm convert to-hf --merged)"
        )
    if missing or extra:
        more = lambda names: f" and {len(names) - 1} more" if len(names) > 1 else ""  # noqa: E731
        problems = ([f"has no {missing[0]}{more(missing)}"] if missing else []) + (
            [f"has {extra[0]}{more(extra)}, which the recipe's model lacks"] if extra else []
        )
        raise UserError(
            f"the model in {source} is not the recipe's: it {' and '.join(problems)}; start from a model of the "
            "recipe's architecture, or train with the source's own recipe (its recipe.json)"
        )


def _scale_paths(tree, prefix: str):
    """Checkpoint paths of the scales of a model pure dict's quantized modules (stored layout:
    layer lists appear once, stacked)."""
    if is_quantized_node(tree):
        yield f"{prefix}/scale"
    elif isinstance(tree, dict):
        items = [(0, tree[0])] if 0 in tree else tree.items()  # a layer list: stored stacked
        for key, value in items:
            yield from _scale_paths(value, prefix if isinstance(key, int) else f"{prefix}/{key}")


def _matching(tree, like):
    """The subtree of `tree` with the keys of `like`."""
    if not isinstance(like, dict):
        return tree
    return {key: _matching(tree[key], value) for key, value in like.items()}


def _without_adapters(tree):
    if not isinstance(tree, dict):
        return tree
    return {key: _without_adapters(value) for key, value in tree.items() if key != "adapter"}


def _hf_parameters(trainer, path: str, target: dict) -> dict:
    from nnxlm.convert import read_hf_parameters

    target = _without_adapters(target)
    params = read_hf_parameters(path, stored_layout(target), trainer.model)
    sharded = jax.tree.map(lambda array, leaf: jax.device_put(array, leaf.sharding), params, stored_layout(target))
    return from_stored_layout(sharded, target)


def restore_full_state(trainer, path: str):
    """(train state, step) of the run directory or checkpoint `path`."""
    directory, step = find_checkpoint(path)
    source = Checkpointer(directory)
    try:
        if not source.has_train_state(step):
            raise UserError(
                f"{directory}/{step} holds a model without optimizer state: use load_parameters_path instead"
            )
        restored, _ = source.restore(step, trainer.abstract_state)
    finally:
        source.close()
    print(f"nnxlm: starting from the train state of {directory}/{step}", file=sys.stderr)
    return trainer._from_pure_dict(restored), step


def prepare_tokenizer(trainer, pretrained: bool):
    """The run's tokenizer (see the module docstring); None for data that is already token ids."""
    if getattr(trainer.train_data, "yields_token_ids", False):
        return None
    workdir = trainer.workdir
    path = find_tokenizer(workdir, trainer.tokenizer_path)
    if (
        trainer.tokenizer_path
        and jax.process_index() == 0
        and epath.Path(path).exists()
        and not _has_tokenizer(workdir)
    ):
        # a copy beside the checkpoints, which exports (to-hf) and moved or copied run directories take
        # along; this run reads tokenizer_path, so no other process waits for it
        copy_tokenizer(path, workdir)
    if not epath.Path(path).exists() and not trainer.tokenizer_path:
        source = trainer.load_parameters_path or trainer.load_full_state_path
        if source:
            _on_main_process(lambda: copy_tokenizer(_tokenizer_of(source), workdir), "tokenizer copied")
            path = find_tokenizer(workdir)
        elif pretrained:
            raise UserError(
                f"the model in {workdir} has no tokenizer: copy its tokenizer.json or tokenizer.model (with "
                "tokenizer_config.json) into the run directory, or set tokenizer_path"
            )
        else:
            _on_main_process(lambda: _train_tokenizer(trainer, path), "tokenizer written")
    return _load_checked(trainer, path)


def find_run_tokenizer(trainer):
    """The tokenizer a run would use, without writing anything (None for token-id data)."""
    if getattr(trainer.train_data, "yields_token_ids", False):
        return None
    path = find_tokenizer(trainer.workdir, trainer.tokenizer_path)
    source = trainer.load_parameters_path or trainer.load_full_state_path
    if not epath.Path(path).exists() and not trainer.tokenizer_path and source:
        path = _tokenizer_of(source)
    if not epath.Path(path).exists():
        raise UserError(f"the run has no tokenizer yet ({path}): set tokenizer_path, or train once to make one")
    return _load_checked(trainer, path)


def _load_checked(trainer, path: str):
    if not epath.Path(path).exists():
        raise UserError(f"tokenizer file {path} does not exist: fix tokenizer_path or set it to None")
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > trainer.model_vocab_size:
        raise UserError(
            f"tokenizer {path} has {tokenizer.vocab_size} tokens but the model only {trainer.model_vocab_size}: "
            "raise model.vocab_size or use a smaller tokenizer"
        )
    return tokenizer


def _on_main_process(write, what: str) -> None:
    """Runs `write` on process 0 only; the others wait for it (a shared run directory)."""
    if jax.process_index() == 0:
        write()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"nnxlm {what}")


def _tokenizer_of(source: str) -> str:
    """The tokenizer file of a run directory, checkpoint or HF model directory; UserError if none."""
    if is_hf_directory(source):
        path = find_tokenizer(source)
    else:
        directory, step = find_checkpoint(source)
        run_dir = epath.Path(directory).parent
        path = find_tokenizer(run_dir, load_recipe(epath.Path(directory) / str(step)).tokenizer_path)
    if not epath.Path(path).exists():
        raise UserError(
            f"the pretrained model in {source} has no tokenizer: set tokenizer_path to its tokenizer.model "
            "or tokenizer.json (a model is never given another vocabulary)"
        )
    return path


def _has_tokenizer(run_dir: str) -> bool:
    return any((epath.Path(run_dir) / name).exists() for name in ("tokenizer.model", "tokenizer.json"))


def copy_tokenizer(tokenizer_path: str, destination: str) -> None:
    """Copies a tokenizer file and what travels with it (its config, chat template) into destination."""
    destination = epath.Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    source = absolute(tokenizer_path).parent
    for name in (epath.Path(tokenizer_path).name, *COMPANION_FILES):
        if (source / name).exists() and not (destination / name).exists():
            copy_atomically(source / name, destination / name)


def _train_tokenizer(trainer, path: str) -> None:
    documents = trainer.train_data.documents()  # raises first if the data is missing
    first = trainer.train_data.load(documents[0])
    if isinstance(first, np.ndarray):
        raise UserError(
            "train_data holds token ids (prepared data) and the run has no tokenizer: set tokenizer_path to the "
            "tokenizer they were made with (fiddler:prepared sets it to the copy in the prepared directory)"
        )
    if not isinstance(first, str):
        raise UserError(
            "train_data holds examples, not text, and the run has no tokenizer: start from a pretrained "
            "model (load_parameters_path) or set tokenizer_path"
        )
    print(f"nnxlm: training a {trainer.model_vocab_size}-token SentencePiece tokenizer -> {path}", file=sys.stderr)
    texts = (trainer.train_data.load(doc) for doc in documents)
    tokenizer = SentencePieceTokenizer.train(texts, trainer.model_vocab_size, max_chars=trainer.tokenizer_train_chars)
    tokenizer.save(path)  # (write_atomically makes the directory)


__all__ = ["copy_tokenizer", "find_run_tokenizer", "load_parameters", "prepare_tokenizer", "restore_full_state"]
