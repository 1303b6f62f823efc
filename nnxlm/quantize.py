"""`nnxlm quantize`: a run directory with int8 weights (and / or an int8 KV cache), and how far a
quantized model's predictions move from the float model's.

    nnxlm quantize RUN_DIR OUT_DIR --weights int8 [--kv int8] [--activations none] [--block_size 128]

OUT_DIR is a run directory like any other: its checkpoint holds int8 kernels with their scales
(nnxlm.modules.quantization) and its recipe says how they were made (model.quantization), so
load_model, `nnxlm decode`, `nnxlm serve` and `nnxlm chat` load it directly and a LoRA run can
train over it (QLoRA). RUN_DIR is left as it is.
"""

import dataclasses
import json

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from nnxlm.errors import UserError
from nnxlm.modules.quantization import Quantization


def as_quantization(setting) -> Quantization:
    """A Quantization from one, from "int8" (int8 weights, the defaults) or from a dict of fields."""
    if isinstance(setting, Quantization):
        return setting
    if setting == "int8":
        return Quantization()
    if isinstance(setting, dict):
        names = [f.name for f in dataclasses.fields(Quantization)]
        if unknown := sorted(set(setting) - set(names)):
            raise UserError(f"quantization fields {unknown} are unknown: use {', '.join(names)}")
        return Quantization(**setting)
    raise UserError(f"quantize={setting!r}: give 'int8', a dict of Quantization fields or a Quantization")


def quantize_run(source: str, destination: str, settings: Quantization) -> str:
    """Writes the model of run directory (or checkpoint) `source`, quantized, as the run directory
    `destination` (checkpoint at the same step, recipe, tokenizer files) and returns destination."""
    from nnxlm.checkpointing import find_checkpoint, load_model, load_recipe, save_model_checkpoint
    from nnxlm.data.tokenizer import TOKENIZER_FILES
    from nnxlm.files import absolute, copy_atomically, require_empty_directory, write_atomically
    from nnxlm.recipes.serialization import as_config, to_json

    directory, step = find_checkpoint(source)
    recipe = load_recipe(source)
    current = recipe.model.quantization if "quantization" in recipe.model.__arguments__ else None
    if current is not None and (settings.weights and current.weights or settings.kv and current.kv):
        raise UserError(f"{source} is already quantized ({fdl.build(current)}): quantize its float run instead")
    out, run_dir = absolute(destination), epath.Path(directory).parent
    if (out / "checkpoints").exists():
        raise UserError(f"{destination} already holds checkpoints: quantize into a new directory")
    require_empty_directory(destination, "the destination")
    model = load_model(source)
    settings.apply(model)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    recipe.model.quantization = as_config(model.quantization)
    out.mkdir(parents=True, exist_ok=True)
    copied = [name for name in TOKENIZER_FILES if (run_dir / name).exists()]
    for name in copied:
        copy_atomically(run_dir / name, out / name)
    if any(name in copied for name in ("tokenizer.model", "tokenizer.json")):
        recipe.tokenizer_path = None  # the copy in the run directory, found there wherever it moves
    recipe.name = out.name
    save_model_checkpoint(out / "checkpoints", step, params, to_json(recipe))
    write_atomically(out / "recipe.json", json.dumps(to_json(recipe), indent=1))
    return destination


def weight_bytes(model: nnx.Module) -> int:
    """Bytes of the model's parameters as stored (int8 values and their scales where quantized)."""
    return sum(p.size * jnp.dtype(p.dtype).itemsize for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def cache_bytes_per_token(model: nnx.Module) -> int:
    """Bytes the model's KV cache holds for one token of one row, every layer together."""
    cache = jax.eval_shape(lambda: model.init_cache(1, 1))
    arrays = [cache.k, cache.v, cache.k_scale, cache.v_scale]
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(arrays))


@jax.jit
def _compare(reference_logits, logits, targets):
    log_p = jax.nn.log_softmax(reference_logits, axis=-1)
    log_q = jax.nn.log_softmax(logits, axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    nll_p = -jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]
    nll_q = -jnp.take_along_axis(log_q, targets[..., None], axis=-1)[..., 0]
    same = jnp.argmax(reference_logits, -1) == jnp.argmax(logits, -1)
    return jnp.sum(kl), jnp.sum(nll_p), jnp.sum(nll_q), jnp.sum(same)


def cached_logits(model: nnx.Module, ids_bt: jax.Array) -> jax.Array:
    """Logits [batch, length, vocab] of ids computed as a prefill through the model's own KV cache
    (so an int8 cache's rounding is in them: every query reads keys and values from the cache)."""
    cache = model.init_cache(ids_bt.shape[0], ids_bt.shape[1])
    logits, _ = model(ids_bt, cache=cache)
    return logits


def agreement(reference: nnx.Module, model: nnx.Module, rows: list[np.ndarray]) -> dict:
    """How `model`'s next-token predictions on token rows (held-out text, each [length]) differ from
    `reference`'s: mean KL(reference || model), the perplexity ratio model / reference and the
    fraction of positions where both rank the same token first (llama.cpp's quantization figures)."""
    run = nnx.jit(cached_logits)
    kl = nll_p = nll_q = same = 0.0
    count = 0
    for row in rows:
        ids = jnp.asarray(row, jnp.int32)[None]
        ref_logits, logits = run(reference, ids[:, :-1]), run(model, ids[:, :-1])
        parts = _compare(ref_logits, logits, ids[:, 1:])
        kl, nll_p, nll_q, same = (a + float(b) for a, b in zip((kl, nll_p, nll_q, same), parts, strict=True))
        count += ids.shape[1] - 1
    return {
        "kl": kl / count,
        "perplexity_ratio": float(np.exp((nll_q - nll_p) / count)),
        "perplexity": float(np.exp(nll_q / count)),
        "reference_perplexity": float(np.exp(nll_p / count)),
        "top1": same / count,
        "tokens": count,
    }
