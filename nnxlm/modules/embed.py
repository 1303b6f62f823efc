"""Token embedding, which doubles as the output head when input and output weights are tied."""

import jax
import jax.numpy as jnp
from flax import nnx

from nnxlm.modules.dense import project
from nnxlm.modules.quantization import BLOCK_AXIS, int8_project, quantize_weights


class Embedder(nnx.Module):
    """A [vocab, embed] table: `embed(ids)` looks rows up, `attend(x)` scores x against every row.

    Quantized (nnxlm.modules.quantization, embed=True), the table holds int8 values with one scale a
    row, `scale` [vocab, 1]: a looked-up row is its values times its scale, and as the head each
    row's scale is its output channel's."""

    def __init__(self, vocab_size: int, d_model: int, *, init_std: float = 1.0, param_dtype="float32", rngs: nnx.Rngs):
        table = jax.random.normal(rngs.params(), (vocab_size, d_model), param_dtype) * init_std
        self.embedding = nnx.Param(table, logical_axes=("vocab", "embed"))
        self.scale = nnx.data(None)
        self.activations = None

    def embed(self, ids_bt: jax.Array, dtype) -> jax.Array:
        rows = jnp.take(self.embedding[...], ids_bt, axis=0)
        if self.scale is not None:
            return (rows.astype(jnp.float32) * jnp.take(self.scale[...], ids_bt, axis=0)).astype(dtype)
        return rows.astype(dtype)

    def attend(self, x_btd: jax.Array) -> jax.Array:
        if self.scale is not None:
            return int8_project(x_btd, self.embedding[...].T, self.scale[...].T, 1, self.activations)
        return project(x_btd, self.embedding[...].T)

    def quantize(self, settings) -> None:
        q, scale = quantize_weights(self, self.embedding[...], settings)
        self.embedding = nnx.Param(q, logical_axes=("vocab", "embed"))
        self.scale = nnx.Param(scale, logical_axes=("vocab", BLOCK_AXIS))
        self.activations = settings.activations
