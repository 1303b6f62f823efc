"""Rotary position embedding (Su et al., 2021), in the half-split layout.

The head dimension is split into two halves (x1, x2) that are rotated as complex pairs
(x1[i], x2[i]) by angle position * theta^(-2i/head_dim). Because a rotation by angle a followed by
the dot product with a rotation by angle b depends only on b - a, attention scores depend only on
the relative position of query and key.
"""

import jax
import jax.numpy as jnp


def inverse_frequencies(head_dim: int, theta: float) -> jax.Array:
    """[head_dim // 2] float32 rotation speeds, fastest first."""
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (theta**exponents)


def apply_rope(x_bthd: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
    """Rotates queries or keys [batch, length, heads, head_dim] by their positions [batch, length]."""
    head_dim = x_bthd.shape[-1]
    angles_bth = positions_bt[..., None].astype(jnp.float32) * inverse_frequencies(head_dim, theta)
    sin = jnp.sin(angles_bth)[:, :, None, :]  # broadcast over heads
    cos = jnp.cos(angles_bth)[:, :, None, :]
    x1, x2 = jnp.split(x_bthd.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_bthd.dtype)
