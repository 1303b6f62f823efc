"""Int8 quantization: projection weights, their inputs, and the KV cache.

A quantized projection keeps its `kernel` path and shape, holding int8 values q, and gains a
`scale` beside it: kernel ~ q * scale, symmetric (q in [-127, 127], scale = max |w| / 127 of the
weights it covers). The scale covers, for each output, either every contracted input (per channel:
scale [1, *out]) or blocks of `block_size` consecutive contracted inputs (sub-channel: scale
[in / block_size, *out]), with leading axes (layers, experts) of their own.

`Quantization(...)` in a model recipe (Transformer.quantization, `fiddler:quantize(...)`) quantizes
the model once it is built; `nnxlm quantize` and `load_model(path, quantize=...)` do it to a trained
model. Its settings:

    weights      "int8", or None (float weights; with kv="int8", only the cache is quantized)
    activations  "int8" (default): each row of a projection's input is quantized on the fly with
                 its own scale and multiplied int8 x int8 with int32 accumulation; None: weight-only
                 (the int8 weights are turned back into the input's dtype for a float matmul: less
                 memory, the same arithmetic). Measured on a 2-core CPU (XLA:CPU, fp32 input,
                 [512 x 1536]): int8 x int8 takes 42 us a row-pair against 83 us for fp32 at batch 1
                 and 90 against 85 us at 8 rows, 418 against 599 us at 64; weight-only takes
                 longer than fp32 (XLA converts the whole weight every call). So int8 x int8 is the
                 default: whole models decode 1.2-1.5x faster than in float32 (bench/results.md).
    block_size   None (per channel) or a number of contracted inputs per scale (e.g. 128): less
                 error, but on XLA:CPU the blocked int8 product runs ~10x slower (see _blocked_dot)
    embed, head  also quantize the embedding table (per vocabulary row) and the output head
                 (default: both kept in float, where quantization costs the most quality)
    kv           "int8": the KV cache holds int8 keys and values with a float32 scale per token and
                 head (nnxlm.modules.kv_cache); None: the compute dtype

Mixture-of-experts routers and multi-token prediction modules are never quantized. Expert stacks
(ExpertDense) are stored in int8 and computed from their dequantized weights (memory only).
Quantized weights do not train: LoRA adapters train over them (QLoRA, Trainer(trainable="lora")).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxlm.errors import UserError

INT8_MAX = 127
BLOCK_AXIS = "quant_blocks"  # the scale's axis of contracted-input blocks; never split (sharding rules)
FORMS = ("int8",)


def quantize_int8(x: jax.Array, axis) -> tuple[jax.Array, jax.Array]:
    """(int8 values, float32 scale) of x with one scale per slice along `axis` (an int or tuple,
    kept as size-1 axes in the scale): symmetric, round to nearest, so every element is within half
    a scale step of q * scale. An all-zero slice gets scale 0 (and q 0): dividing by it is guarded."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=axis, keepdims=True) / INT8_MAX
    safe = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(x32 / safe), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q, scale


def _blocked(kernel_shape, lead: int, in_ndim: int, block_size: int | None) -> tuple[int, int, int]:
    """(in size, blocks, block size) of a kernel's contracted axes, checked."""
    fan_in = math.prod(kernel_shape[lead : lead + in_ndim])
    if block_size is None:
        return fan_in, 1, fan_in
    if fan_in % block_size:
        divisors = [str(d) for d in (16, 32, 64, 128, 256) if fan_in % d == 0] or [str(fan_in)]
        raise UserError(
            f"quantization block_size {block_size} does not divide a projection's {fan_in} inputs: "
            f"use a divisor ({', '.join(divisors)}) or block_size=None (per channel)"
        )
    return fan_in, fan_in // block_size, block_size


def quantize_kernel(kernel: jax.Array, lead: int, in_ndim: int, block_size: int | None):
    """(int8 kernel shaped like `kernel` [*lead, *in, *out], float32 scale [*lead, blocks, *out])."""
    lead_shape, out_shape = kernel.shape[:lead], kernel.shape[lead + in_ndim :]
    fan_in, blocks, size = _blocked(kernel.shape, lead, in_ndim, block_size)
    grouped = kernel.reshape(*lead_shape, blocks, size, math.prod(out_shape))
    q, scale = quantize_int8(grouped, axis=lead + 1)
    return q.reshape(kernel.shape), scale.reshape(*lead_shape, blocks, *out_shape)


def dequantize_kernel(q: jax.Array, scale: jax.Array, lead: int, in_ndim: int, dtype=jnp.float32) -> jax.Array:
    """The float kernel q * scale, [*lead, *in, *out] in `dtype`."""
    blocks = scale.shape[lead]
    out = math.prod(q.shape[lead + in_ndim :])
    grouped = q.reshape(*q.shape[:lead], blocks, -1, out).astype(jnp.float32)
    w = grouped * scale.reshape(*scale.shape[:lead], blocks, 1, out)
    return w.reshape(q.shape).astype(dtype)


def int8_project(x: jax.Array, q: jax.Array, scale: jax.Array, contract: int, activations: str | None) -> jax.Array:
    """The projection of x [..., *in] by the quantized kernel q [*in, *out] (scale [blocks, *out]),
    in x's dtype: a float matmul against q (weight-only) or int8 x int8 with int32 accumulation,
    whose gradient with respect to x is taken through the dequantized kernel (rounding has none)."""
    lead, in_shape, out_shape = x.shape[: x.ndim - contract], x.shape[x.ndim - contract :], q.shape[contract:]
    n, fan_in, out = math.prod(lead), math.prod(in_shape), math.prod(out_shape)
    blocks = scale.shape[0]
    rows_nkb = x.reshape(n, blocks, fan_in // blocks)
    q_kbo = q.reshape(blocks, fan_in // blocks, out)
    scale_ko = scale.reshape(blocks, out).astype(jnp.float32)
    if activations is None:
        y_no = _rescale(_blocked_dot(rows_nkb, q_kbo.astype(x.dtype), jnp.float32), scale_ko).astype(x.dtype)
    else:
        y_no = _int8_matmul(rows_nkb, q_kbo, scale_ko)
    return y_no.reshape(*lead, *out_shape)


def _blocked_dot(a_nkb: jax.Array, b_kbo: jax.Array, accumulate) -> jax.Array:
    """Each block's partial product [n, blocks, out]. One block (per-channel scales) is a plain 2-D
    matmul: XLA:CPU runs an int8 dot batched over blocks 3-10x slower than the 2-D one (measured:
    [2 x 1024] x [1024 x 3072] in 175 us 2-D, 2.1 ms as 8 blocks), so sub-channel blocks cost speed
    on CPU."""
    if a_nkb.shape[1] == 1:
        return jnp.dot(a_nkb[:, 0], b_kbo[0], preferred_element_type=accumulate)[:, None]
    return jnp.einsum("nkb,kbo->nko", a_nkb, b_kbo, preferred_element_type=accumulate)


def _rescale(y_nko: jax.Array, scale_ko: jax.Array) -> jax.Array:
    """Sums per-block partial products, each times its block's weight scale: [n, out] float32."""
    return jnp.sum(y_nko * scale_ko, axis=1) if scale_ko.shape[0] > 1 else y_nko[:, 0] * scale_ko[0]


@jax.custom_vjp
def _int8_matmul(rows_nkb: jax.Array, q_kbo: jax.Array, scale_ko: jax.Array) -> jax.Array:
    # XLA:CPU multiplies one int8 row several times slower than two (its int8 matrix-vector path
    # is not vectorised): a single row (batch-1 decode) is computed beside a copy of itself.
    single = rows_nkb.shape[0] == 1 and jax.default_backend() == "cpu"
    padded = jnp.concatenate([rows_nkb, rows_nkb]) if single else rows_nkb
    xq_nkb, x_scale_nk1 = quantize_int8(padded, axis=2)
    acc_nko = _blocked_dot(xq_nkb, q_kbo, jnp.int32)
    y_no = _rescale(acc_nko.astype(jnp.float32) * x_scale_nk1, scale_ko)
    return (y_no[:1] if single else y_no).astype(rows_nkb.dtype)


def _int8_matmul_forward(rows_nkb, q_kbo, scale_ko):
    return _int8_matmul(rows_nkb, q_kbo, scale_ko), (rows_nkb, q_kbo, scale_ko)


def _int8_matmul_backward(saved, dy_no):
    rows_nkb, q_kbo, scale_ko = saved
    w_kbo = q_kbo.astype(jnp.float32) * scale_ko[:, None, :]
    dx_nkb = jnp.einsum("no,kbo->nkb", dy_no.astype(jnp.float32), w_kbo).astype(rows_nkb.dtype)
    return dx_nkb, np.zeros(q_kbo.shape, jax.dtypes.float0), jnp.zeros_like(scale_ko)


_int8_matmul.defvjp(_int8_matmul_forward, _int8_matmul_backward)


def quantize_weights(module, weights: jax.Array, settings) -> tuple[jax.Array, jax.Array]:
    """(int8 values, scale) of a quantization target's float weights: a projection's kernel (see
    quantize_kernel; leading layer and expert axes kept) or an embedding table (one scale a row)."""
    if hasattr(module, "in_ndim"):
        lead = weights.ndim - module.in_ndim - module.out_ndim
        return quantize_kernel(weights, lead, module.in_ndim, settings.block_size)
    return quantize_int8(weights, axis=-1)


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How a model is quantized (see the module docstring)."""

    weights: str | None = "int8"
    activations: str | None = "int8"
    block_size: int | None = None
    embed: bool = False
    head: bool = False
    kv: str | None = None

    def __post_init__(self):
        for field in ("weights", "activations", "kv"):
            value = getattr(self, field)
            if value is not None and value not in FORMS:
                raise UserError(f"quantization {field}={value!r} is not supported: use 'int8' or None")
        if self.block_size is not None and (not isinstance(self.block_size, int) or self.block_size < 1):
            raise UserError(f"quantization block_size is {self.block_size!r}: use a positive integer or None")
        if self.weights is None and self.kv is None:
            raise UserError("quantization with weights=None and kv=None quantizes nothing: set weights='int8' or kv")

    def targets(self, model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
        """(path, module) of every projection (and the embedding table, with embed) to quantize."""
        from nnxlm.modules.dense import Dense, ExpertDense
        from nnxlm.modules.embed import Embedder

        if self.weights is None:
            return []
        found = []
        for path, module in nnx.iter_graph(model):
            if "mtp" in path or not path or (path[-1] == "router"):
                continue
            if isinstance(module, (Dense, ExpertDense)) and (path[-1] != "head" or self.head):
                found.append((path, module))
            elif isinstance(module, Embedder) and self.embed:
                found.append((path, module))
        return found

    def apply(self, model: nnx.Module) -> None:
        """Quantizes the model's weights in place (their values: random at construction, trained
        when loaded) and records the settings on the model (model.quantization), joined with those
        it already has (a KV-cache setting added to int8 weights, or the other way round)."""
        current = getattr(model, "quantization", None)
        if current is not None and current.weights and self.weights:
            raise UserError("the model's weights are already int8: quantize the float run instead")
        for _, module in self.targets(model):
            module.quantize(self)
        if current is None:
            model.quantization = self
        elif self.weights is None:
            model.quantization = dataclasses.replace(current, kv=self.kv or current.kv)
        else:
            model.quantization = dataclasses.replace(self, kv=self.kv or current.kv)


WEIGHT_NAMES = ("kernel", "embedding")  # the int8 array beside a `scale` in a quantized module


def is_quantized_node(node) -> bool:
    """A quantized module in a pure dict: {"kernel" or "embedding": int8, "scale": ..., ...}."""
    return isinstance(node, dict) and "scale" in node and any(name in node for name in WEIGHT_NAMES)


def float_layout(tree, dtype=jnp.float32):
    """A pure dict of ShapeDtypeStructs (a quantized model's) with every quantized module as its
    float form: the int8 weights as `dtype`, no scale (what a float checkpoint holds)."""
    if is_quantized_node(tree):
        node = {key: value for key, value in tree.items() if key != "scale"}
        for name in WEIGHT_NAMES:
            if name in node:
                weights = node[name]
                node[name] = jax.ShapeDtypeStruct(weights.shape, dtype, sharding=weights.sharding)
        return node
    if not isinstance(tree, dict):
        return tree
    return {key: float_layout(value, dtype) for key, value in tree.items()}


def quantize_pure_dict(model: nnx.Module, params: dict) -> dict:
    """`params` (a pure dict of model's float form, see float_layout) with the weights `model`
    quantizes (model.quantization) in int8 with their scales, in place and returned."""
    settings = model.quantization
    for path, module in settings.targets(model):
        node = params
        for key in path:
            node = node[key]
        name = "kernel" if hasattr(module, "in_ndim") else "embedding"
        node[name], node["scale"] = quantize_weights(module, node[name], settings)
    return params


def quantized(model: nnx.Module) -> bool:
    """Whether any weight of the model is held in int8."""
    settings = getattr(model, "quantization", None)
    return settings is not None and settings.weights is not None
