"""Pre-norm decoder block: x + attention(norm(x)), then x + mlp(norm(x))."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when rate is 0 or no key is given (evaluation)."""
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class DecoderBlock(nnx.Module):
    """One Transformer layer. The parent passes d_model, the norm factory and the dtypes.

    Args:
      attention: factory called as attention(d_model, dtype=, param_dtype=, rngs=).
      mlp: factory called as mlp(d_model, dtype=, param_dtype=, rngs=).
      norm: factory called as norm(d_model, param_dtype=, rngs=).
      dropout_rate: on each residual branch during training.
    """

    def __init__(
        self,
        d_model: int,
        *,
        attention: Callable[..., nnx.Module],
        mlp: Callable[..., nnx.Module],
        norm: Callable[..., nnx.Module],
        dropout_rate: float = 0.0,
        dtype="float32",
        param_dtype="float32",
        rngs: nnx.Rngs,
    ):
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        self.dropout_rate = dropout_rate
        self.attention_norm = norm(d_model, param_dtype=param_dtype, rngs=rngs)
        self.attention = attention(d_model, **dtypes, rngs=rngs)
        self.mlp_norm = norm(d_model, param_dtype=param_dtype, rngs=rngs)
        self.mlp = mlp(d_model, **dtypes, rngs=rngs)

    def __call__(self, x_btd, positions_bt, segment_ids_bt, dropout_key=None, cache=None):
        """x [batch, length, embed] -> same; with a KVCache of this layer, (x, updated cache)."""
        keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        if cache is None:
            h = self.attention(self.attention_norm(x_btd), positions_bt, segment_ids_bt)
        else:
            h, cache = self.attention(self.attention_norm(x_btd), positions_bt, segment_ids_bt, cache)
        x_btd = x_btd + dropout(h, self.dropout_rate, keys[0])
        h = self.mlp(self.mlp_norm(x_btd))
        x_btd = x_btd + dropout(h, self.dropout_rate, keys[1])
        return x_btd if cache is None else (x_btd, cache)
