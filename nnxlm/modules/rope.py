"""Rotary position embedding (Su et al., 2021), in the half-split layout.

The head dimension is split into two halves (x1, x2) that are rotated as complex pairs
(x1[i], x2[i]) by angle position * theta^(-2i/head_dim). Because a rotation by angle a followed by
the dot product with a rotation by angle b depends only on b - a, attention scores depend only on
the relative position of query and key.

`scaling` stretches the slow rotations for contexts longer than the model was trained on:
  {"type": "linear", "factor": f}: every frequency divided by f (position interpolation);
  {"type": "llama3", "factor": f, "low_freq_factor": l, "high_freq_factor": h,
   "original_max_position_embeddings": n}: wavelengths longer than n / l are divided by f,
   shorter than n / h kept, and those between blended smoothly (Llama 3.1).
"""

import math

import jax
import jax.numpy as jnp

SCALING_TYPES = ("linear", "llama3")


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> jax.Array:
    """[head_dim // 2] float32 rotation speeds, fastest first."""
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if not scaling:
        return inv_freq
    kind, factor = scaling.get("type"), float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        context = float(scaling["original_max_position_embeddings"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        wavelength = 2 * math.pi / inv_freq
        # 0 for wavelengths beyond context / low (slowest: fully scaled), 1 below context / high
        blend = jnp.clip((context / wavelength - low) / (high - low), 0.0, 1.0)
        return (1 - blend) * inv_freq / factor + blend * inv_freq
    raise ValueError(f"unknown rope scaling type {kind!r}: use one of {SCALING_TYPES}")


def apply_rope(
    x_bthd: jax.Array,
    positions_bt: jax.Array,
    theta: float,
    scaling: dict | None = None,
    inv_freq: jax.Array | None = None,
) -> jax.Array:
    """Rotates queries or keys [batch, length, heads, head_dim] by their positions [batch, length];
    inv_freq ([head_dim // 2], possibly traced: a layer's own) replaces theta and scaling."""
    head_dim = x_bthd.shape[-1]
    if inv_freq is None:
        inv_freq = inverse_frequencies(head_dim, theta, scaling)
    angles_bth = positions_bt[..., None].astype(jnp.float32) * inv_freq.astype(jnp.float32)
    sin, cos = jnp.sin(angles_bth), jnp.cos(angles_bth)
    # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) as x * [cos, cos] + [x2, x1] * [-sin, sin]: the
    # halves swapped on the input, not the two products concatenated, which XLA:CPU ran 6x slower
    # (forward and backward)
    cos_bt1d = jnp.concatenate([cos, cos], axis=-1)[:, :, None, :]  # broadcast over heads
    sin_bt1d = jnp.concatenate([-sin, sin], axis=-1)[:, :, None, :]
    x = x_bthd.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = x * cos_bt1d + jnp.concatenate([x2, x1], axis=-1) * sin_bt1d
    return rotated.astype(x_bthd.dtype)
