"""Projections: every matmul of an input against a weight is one of these modules.

`Dense` maps x [..., *in] to [..., *out] through its one parameter, `kernel` [*in, *out];
`ExpertDense` holds one such kernel per expert [experts, in, out] for mixture-of-experts layers.
Being modules, they are what LoRA (nnxlm.modules.lora: an `adapter` beside the kernel) and
quantization (nnxlm.modules.quantization: an int8 kernel and a `scale` beside it) extend, while the
base weight keeps its path, checkpoint entry and Hugging Face name.

Every projection is computed as one 2-D matmul: the input's leading axes are flattened into rows
and the contracted axes into columns. On CPU, XLA runs the backward pass of an einsum that
contracts over several batch axes (b and t in "btd,btv->dv") several times slower than the same
product as a 2-D matmul, so the flattening is worth its reshapes (which are free).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from nnxlm.modules.grouped import grouped_matmul
from nnxlm.modules.quantization import BLOCK_AXIS, dequantize_kernel, int8_project, quantize_weights


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


def _shape(dims) -> tuple[int, ...]:
    return (dims,) if isinstance(dims, int) else tuple(dims)


def fold_key(key: jax.Array | None, index: int) -> jax.Array | None:
    """The key of a module's index-th projection, derived from the module's key (None: no dropout)."""
    return None if key is None else jax.random.fold_in(key, index)


def _quantize(self, settings) -> None:
    """Replaces the float kernel by int8 values and a scale (nnxlm.modules.quantization), in place."""
    kernel = self.kernel
    axes = kernel.get_metadata().get("logical_axes") or (None,) * kernel.ndim
    lead = kernel.ndim - self.in_ndim - self.out_ndim  # layers, experts
    q, scale = quantize_weights(self, kernel[...], settings)
    self.kernel = nnx.Param(q, logical_axes=tuple(axes))
    self.scale = nnx.Param(scale, logical_axes=(*axes[:lead], BLOCK_AXIS, *axes[lead + self.in_ndim :]))
    self.activations = settings.activations


def _float_kernel(self, dtype=None) -> jax.Array:
    """The kernel in float (dequantized if quantized), in `dtype` (default: the stored one, or
    float32 for a quantized kernel)."""
    if self.scale is None:
        kernel = self.kernel[...]
        return kernel if dtype is None else kernel.astype(dtype)
    lead = self.kernel.ndim - self.in_ndim - self.out_ndim
    return dequantize_kernel(self.kernel[...], self.scale[...], lead, self.in_ndim, dtype or jnp.float32)


class Dense(nnx.Module):
    """x [..., *in_shape] -> [..., *out_shape] (computed in x's dtype).

    Args:
      in_shape, out_shape: the contracted input axes and the output axes (ints or tuples).
      logical_axes: names of the kernel's axes, [*in, *out] (nnxlm.sharding).
      fan_in: of the initialisation (default: the product of in_shape).
    """

    def __init__(self, in_shape, out_shape, *, logical_axes, fan_in: int | None = None, param_dtype="float32", rngs):
        in_shape, out_shape = _shape(in_shape), _shape(out_shape)
        self.in_ndim, self.out_ndim = len(in_shape), len(out_shape)
        kernel = dense_init(rngs, (*in_shape, *out_shape), fan_in or math.prod(in_shape), param_dtype)
        self.kernel = nnx.Param(kernel, logical_axes=tuple(logical_axes))
        self.adapter = nnx.data(None)  # a LoRAAdapter (nnxlm.modules.lora) once one is added
        self.scale = nnx.data(None)  # the int8 kernel's scale once quantized
        self.activations = None  # how a quantized kernel multiplies (Quantization.activations)

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        if self.scale is None:
            y = project(x, self.kernel[...], self.in_ndim)
        else:
            y = int8_project(x, self.kernel[...], self.scale[...], self.in_ndim, self.activations)
        if self.adapter is not None and self.adapter.active:
            low = project(self.adapter.inputs(x, dropout_key), self.adapter.a[...], self.in_ndim)
            y = y + project(low * jnp.asarray(self.adapter.scale, low.dtype), self.adapter.b[...])  # scale rank-wide
        return y

    def weight(self) -> jax.Array:
        """The kernel this projection applies: with an active adapter, kernel + its update (a
        quantized kernel: dequantized, in float32)."""
        kernel = self.float_kernel()
        if self.adapter is not None and self.adapter.active:
            from nnxlm.modules.lora import lora_delta

            return (kernel.astype(jnp.float32) + lora_delta(self)).astype(kernel.dtype)
        return kernel

    @property
    def shape(self) -> tuple[int, ...]:
        return self.kernel.shape

    quantize = _quantize
    float_kernel = _float_kernel


class ExpertDense(nnx.Module):
    """experts kernels [experts, in, out]: `all(x)` runs every expert on every token, `grouped(x,
    layout)` each expert on its own rows only (nnxlm.modules.grouped), and `combine(h)` sums the
    experts' projections of per-expert inputs (a down projection).

    Args:
      num_experts, in_dim, out_dim: the kernel's shape.
      logical_axes: names of its three axes.
    """

    def __init__(self, num_experts: int, in_dim: int, out_dim: int, *, logical_axes, param_dtype="float32", rngs):
        self.in_ndim, self.out_ndim = 1, 1
        kernel = dense_init(rngs, (num_experts, in_dim, out_dim), in_dim, param_dtype)
        self.kernel = nnx.Param(kernel, logical_axes=tuple(logical_axes))
        self.adapter = nnx.data(None)
        self.scale = nnx.data(None)  # once quantized (computed from the dequantized kernel)
        self.activations = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.kernel.shape

    quantize = _quantize
    float_kernel = _float_kernel

    def _lora(self):
        adapter = self.adapter
        return adapter if adapter is not None and adapter.active else None

    def all(self, x_nd: jax.Array, dropout_key=None) -> jax.Array:
        """Every expert on every token: [n, in] -> [n, experts, out]."""
        y_nef = jnp.einsum("nd,edf->nef", x_nd, self.float_kernel(x_nd.dtype))
        if (adapter := self._lora()) is not None:
            x = adapter.inputs(x_nd, dropout_key)
            low_ner = jnp.einsum("nd,edr->ner", x, adapter.a[...].astype(x.dtype)) * adapter.scale
            y_nef += jnp.einsum("ner,erf->nef", low_ner, adapter.b[...].astype(x.dtype))
        return y_nef

    def combine(self, h_nef: jax.Array, dropout_key=None) -> jax.Array:
        """Sum over experts of each expert's projection of its own input: [n, experts, in] -> [n, out],
        as one matmul contracting experts and features together: [n, E*F] x [E*F, out]."""
        y_nd = project(h_nef, self.float_kernel(h_nef.dtype), contract=2)
        if (adapter := self._lora()) is not None:
            h = adapter.inputs(h_nef, dropout_key)
            low_ner = jnp.einsum("nef,efr->ner", h, adapter.a[...].astype(h.dtype)) * adapter.scale
            y_nd += jnp.einsum("ner,erd->nd", low_ner, adapter.b[...].astype(h.dtype))
        return y_nd

    def grouped(self, x_rd: jax.Array, layout, dropout_key=None) -> jax.Array:
        """Rows laid out by expert (a nnxlm.modules.grouped.Layout): [R, in] -> [R, out], each row
        through its own expert only."""
        y_rf = grouped_matmul(x_rd, self.float_kernel(x_rd.dtype), layout)
        if (adapter := self._lora()) is not None:
            x = adapter.inputs(x_rd, dropout_key)
            low_rr = grouped_matmul(x, adapter.a[...].astype(x.dtype), layout) * adapter.scale
            y_rf += grouped_matmul(low_rr, adapter.b[...].astype(x.dtype), layout)
        return y_rf
