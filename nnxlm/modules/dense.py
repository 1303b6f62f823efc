"""Initialisation and application of projection kernels.

Every projection is computed as one 2-D matmul: the input's leading axes are flattened into rows
and the contracted axes into columns. On CPU, XLA runs the backward pass of an einsum that
contracts over several batch axes (b and t in "btd,btv->dv") several times slower than the same
product as a 2-D matmul, so the flattening is worth its reshapes (which are free).
"""

import math

import jax
from flax import nnx


def dense_init(rngs: nnx.Rngs, shape, fan_in: int, dtype) -> jax.Array:
    """Normal init with std 1/sqrt(fan_in), so each projection keeps unit variance."""
    return jax.random.normal(rngs.params(), shape, dtype) * fan_in**-0.5


def project(x: jax.Array, kernel: jax.Array, contract: int = 1) -> jax.Array:
    """Contracts the last `contract` axes of x with the first `contract` axes of kernel.

    x [..., *in] and kernel [*in, *out] give [..., *out], e.g. [b, t, d] x [d, n, h] -> [b, t, n, h].
    """
    lead, in_shape = x.shape[: x.ndim - contract], x.shape[x.ndim - contract :]
    out_shape = kernel.shape[contract:]
    rows = x.reshape(math.prod(lead), math.prod(in_shape))
    out = rows @ kernel.astype(x.dtype).reshape(math.prod(in_shape), math.prod(out_shape))
    return out.reshape(*lead, *out_shape)
