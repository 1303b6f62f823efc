"""RMSNorm: x / rms(x) * scale, computed in float32 whatever the compute dtype."""

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last axis (Zhang & Sennrich, 2019).

    Args:
      dim: size of the normalised (last) axis.
      eps: added to the mean square before the reciprocal square root.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype="float32", rngs: nnx.Rngs = None):
        del rngs  # deterministic init; accepted so every factory has the same call shape
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)
