"""Token embedding, which doubles as the output head when input and output weights are tied."""

import jax
import jax.numpy as jnp
from flax import nnx

from nnxlm.modules.dense import project


class Embedder(nnx.Module):
    """A [vocab, embed] table: `embed(ids)` looks rows up, `attend(x)` scores x against every row."""

    def __init__(self, vocab_size: int, d_model: int, *, init_std: float = 1.0, param_dtype="float32", rngs: nnx.Rngs):
        table = jax.random.normal(rngs.params(), (vocab_size, d_model), param_dtype) * init_std
        self.embedding = nnx.Param(table, logical_axes=("vocab", "embed"))

    def embed(self, ids_bt: jax.Array, dtype) -> jax.Array:
        return jnp.take(self.embedding[...], ids_bt, axis=0).astype(dtype)

    def attend(self, x_btd: jax.Array) -> jax.Array:
        return project(x_btd, self.embedding[...].T)
