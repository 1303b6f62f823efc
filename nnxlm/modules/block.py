"""Pre-norm decoder block: x + attention(norm(x)), then x + mlp(norm(x)); with post_norms (Gemma 2 / 3),
x + norm(attention(norm(x))), then x + norm(mlp(norm(x)))."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from nnxlm.modules.dense import fold_key
from nnxlm.sharding.rules import constrain


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
      post_norms: also normalise each branch's output before the residual add (Gemma 2 / 3:
        post_attention_norm and post_mlp_norm).
    """

    def __init__(
        self,
        d_model: int,
        *,
        attention: Callable[..., nnx.Module],
        mlp: Callable[..., nnx.Module],
        norm: Callable[..., nnx.Module],
        dropout_rate: float = 0.0,
        post_norms: bool = False,
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
        self.post_norms = post_norms
        if post_norms:
            self.post_attention_norm = norm(d_model, param_dtype=param_dtype, rngs=rngs)
            self.post_mlp_norm = norm(d_model, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_btd, positions_bt, segment_ids_bt, dropout_key=None, cache=None, layer=None):
        """x [batch, length, embed] -> same; with a KVCache of this layer, (x, updated cache).
        layer: this layer's own attention settings ({"window": ..., "inv_freq": ...}, see Attention)."""
        keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        # the attention's and MLP's own keys (LoRA dropout) are kept apart from the residual ones
        attention_key, mlp_key = fold_key(dropout_key, 2), fold_key(dropout_key, 3)
        layer = layer or {}
        if attention_key is not None:
            layer = {**layer, "dropout_key": attention_key}
        if cache is None:
            h = self.attention(self.attention_norm(x_btd), positions_bt, segment_ids_bt, **layer)
        else:
            h, cache = self.attention(self.attention_norm(x_btd), positions_bt, segment_ids_bt, cache, **layer)
        if self.post_norms:
            h = self.post_attention_norm(h)
        x_btd = x_btd + dropout(h, self.dropout_rate, keys[0])
        h = self.mlp(self.mlp_norm(x_btd), mlp_key)
        if self.post_norms:
            h = self.post_mlp_norm(h)
        x_btd = x_btd + dropout(h, self.dropout_rate, keys[1])
        x_btd = constrain(x_btd, ("batch", "length", None))  # the residual stream between layers
        return x_btd if cache is None else (x_btd, cache)
