"""Everything a training step changes, as one NNX module: model, optimizer (with its step
counter) and the RNG key for dropout. Saved and restored as one pytree.

Which parameters train is a filter (`trainable_filter`): the optimizer holds state for those
alone, and the step differentiates those alone; the others stay as they are, bit for bit.
"""

import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nnxlm.errors import UserError


class RngKey(nnx.Variable):
    """Raw uint32 key data (a typed PRNG key cannot be checkpointed directly)."""


class TrainState(nnx.Module):
    """reference: keep a frozen copy of the model beside it (an objective's reference model, e.g.
    DPO's when more than adapters train); the Trainer fills it with the starting parameters."""

    def __init__(
        self, model: nnx.Module, tx: optax.GradientTransformation, seed: int, trainable=nnx.Param, reference=False
    ):
        self.model = model
        self.optimizer = nnx.Optimizer(model, tx, wrt=trainable)
        self.rng = RngKey(jax.random.key_data(jax.random.key(seed)))
        if reference:
            self.reference = nnx.clone(model)

    def next_key(self) -> jax.Array:
        """A fresh key for this step; advances the stored key."""
        key, step_key = jax.random.split(jax.random.wrap_key_data(self.rng[...]))
        self.rng[...] = jax.random.key_data(key)
        return step_key


def _path_matches(pattern: str, field: str):
    """An nnx filter: the variables whose path ("layers/attention/q_proj/kernel") pattern searches."""
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise UserError(f"{field}={pattern!r} is not a regular expression ({e}): fix the pattern") from None
    return lambda path, _: compiled.search("/".join(str(part) for part in path)) is not None


def trainable_filter(trainable: str = "all", freeze: str | None = None):
    """The nnx filter of the parameters a run trains.

    trainable: "all" (every nnx.Param, adapters included), "lora" (the LoRA adapters alone), or a
      regular expression searched in each parameter's path.
    freeze: a regular expression of paths left out of that (e.g. "embedder": the embedding table).
    """
    if trainable == "all":
        chosen = nnx.Param
    elif trainable == "lora":
        chosen = nnx.LoRAParam
    else:
        chosen = nnx.All(nnx.Param, _path_matches(trainable, "trainable"))
    if freeze:
        chosen = nnx.All(chosen, nnx.Not(_path_matches(freeze, "freeze")))
    return chosen


def trainable_count(model: nnx.Module, trainable: str = "all", freeze: str | None = None) -> int:
    """How many parameters of model the filter trains; UserError when none."""
    trained = jax.tree.leaves(nnx.state(model, trainable_filter(trainable, freeze)))
    if any(not jnp.issubdtype(p.dtype, jnp.floating) for p in trained):
        raise UserError(
            f"the recipe trains int8 weights (trainable={trainable!r}): train LoRA adapters over them "
            "(fiddler:lora, QLoRA), or train in float and quantize afterwards (nnxlm quantize)"
        )
    count = sum(p.size for p in trained)
    if count == 0:
        raise UserError(
            f"the recipe trains no parameter (trainable={trainable!r}, freeze={freeze!r}): choose "
            "trainable='all', 'lora' (with model.lora set) or a pattern that matches parameter paths"
        )
    return count
