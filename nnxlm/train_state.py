"""Everything a training step changes, as one NNX module: model, optimizer (with its step
counter) and the RNG key for dropout. Saved and restored as one pytree."""

import jax
import optax
from flax import nnx


class RngKey(nnx.Variable):
    """Raw uint32 key data (a typed PRNG key cannot be checkpointed directly)."""


class TrainState(nnx.Module):
    def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, seed: int):
        self.model = model
        self.optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        self.rng = RngKey(jax.random.key_data(jax.random.key(seed)))

    def next_key(self) -> jax.Array:
        """A fresh key for this step; advances the stored key."""
        key, step_key = jax.random.split(jax.random.wrap_key_data(self.rng[...]))
        self.rng[...] = jax.random.key_data(key)
        return step_key
