import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nnxlm.errors import UserError
from nnxlm.modules.dense import Dense, ExpertDense
from nnxlm.modules.embed import Embedder
from nnxlm.modules.quantization import Quantization, dequantize_kernel, int8_project, quantize_int8, quantize_kernel
from nnxlm.recipes import models


def relative_error(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_every_element_is_within_half_a_scale_step():
    x = jax.random.normal(jax.random.key(0), (64, 48)) * jnp.linspace(0.01, 30, 48)
    q, scale = quantize_int8(x, axis=0)
    assert q.dtype == jnp.int8 and scale.shape == (1, 48)
    error = jnp.abs(q.astype(jnp.float32) * scale - x)
    assert bool(jnp.all(error <= scale / 2 * (1 + 1e-6)))
    assert int(jnp.max(jnp.abs(q))) == 127  # each column's largest value uses the whole range


def test_zero_and_constant_rows_round_trip():
    x = jnp.stack([jnp.zeros(16), jnp.full(16, 3.5), jnp.full(16, -0.25), jnp.arange(16.0)])
    q, scale = quantize_int8(x, axis=1)
    assert float(scale[0, 0]) == 0.0 and not bool(jnp.any(jnp.isnan(q.astype(jnp.float32))))
    np.testing.assert_allclose(q.astype(jnp.float32) * scale, x, atol=float(jnp.max(scale)) / 2)
    np.testing.assert_array_equal(q[0], 0)
    np.testing.assert_allclose(q[1:3].astype(jnp.float32) * scale[1:3], x[1:3], rtol=1e-6)  # constants exact


@pytest.mark.parametrize("block_size", [None, 16])
def test_kernels_dequantize_to_within_half_a_step_per_block(block_size):
    kernel = jax.random.normal(jax.random.key(1), (3, 4, 8, 24))  # [layers, *in (4, 8), out]
    q, scale = quantize_kernel(kernel, lead=1, in_ndim=2, block_size=block_size)
    blocks = 1 if block_size is None else 32 // block_size
    assert q.shape == kernel.shape and scale.shape == (3, blocks, 24)
    w = dequantize_kernel(q, scale, lead=1, in_ndim=2)
    step = jnp.repeat(scale, 32 // blocks, axis=1).reshape(kernel.shape)
    assert bool(jnp.all(jnp.abs(w - kernel) <= step / 2 * (1 + 1e-6)))


@pytest.mark.parametrize("activations", ["int8", None])
@pytest.mark.parametrize("block_size", [None, 32])
@pytest.mark.parametrize("rows", [1, 5])
def test_a_quantized_projection_is_within_2_percent_of_the_float_one(activations, block_size, rows):
    dense = Dense(64, (4, 16), logical_axes=("embed", "heads", "head_dim"), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (rows, 3, 64))
    reference = dense(x)
    dense.quantize(Quantization(activations=activations, block_size=block_size))
    assert dense.kernel.dtype == jnp.int8 and dense.scale.shape == (1 if block_size is None else 2, 4, 16)
    out = dense(x)
    assert out.shape == reference.shape and out.dtype == reference.dtype
    assert relative_error(out, reference) < 0.02


def test_the_int8_matmul_differentiates_through_the_dequantized_kernel():
    kernel = jax.random.normal(jax.random.key(3), (32, 8))
    q, scale = quantize_kernel(kernel, lead=0, in_ndim=1, block_size=None)
    x = jax.random.normal(jax.random.key(4), (4, 32))
    dy = jax.random.normal(jax.random.key(5), (4, 8))
    grad = jax.grad(lambda x: jnp.sum(int8_project(x, q, scale, 1, "int8") * dy))(x)
    w = dequantize_kernel(q, scale, lead=0, in_ndim=1)
    np.testing.assert_allclose(grad, dy @ w.T, rtol=1e-5, atol=1e-6)


def test_expert_stacks_and_tied_embeddings_quantize():
    experts = ExpertDense(4, 16, 8, logical_axes=("expert", "embed", "mlp"), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(6), (5, 16))
    reference = experts.all(x)
    experts.quantize(Quantization())
    assert experts.scale.shape == (4, 1, 8)  # one scale per expert and output
    assert relative_error(experts.all(x), reference) < 0.02

    table = Embedder(100, 32, rngs=nnx.Rngs(0))
    ids, h = jnp.array([[3, 99, 0]]), jax.random.normal(jax.random.key(7), (1, 3, 32))
    looked_up, scores = table.embed(ids, jnp.float32), table.attend(h)
    table.quantize(Quantization())
    assert table.embedding.dtype == jnp.int8 and table.scale.shape == (100, 1)
    assert relative_error(table.embed(ids, jnp.float32), looked_up) < 0.01
    assert relative_error(table.attend(h), scores) < 0.02


def test_a_quantized_model_keeps_head_and_embedding_float_unless_asked():
    cfg = models.llama_tiny(vocab_size=128)
    cfg.quantization = fdl.Config(Quantization)
    model = fdl.build(cfg)(rngs=nnx.Rngs(0))
    assert model.layers.attention.q_proj.kernel.dtype == jnp.int8
    assert model.layers.mlp.down.scale.shape[0] == model.num_layers  # stacked with the layers
    assert model.head.kernel.dtype == jnp.float32 and model.embedder.embedding.dtype == jnp.float32
    cfg.quantization = fdl.Config(Quantization, head=True, embed=True)
    model = fdl.build(cfg)(rngs=nnx.Rngs(0))
    assert model.head.kernel.dtype == jnp.int8 and model.embedder.embedding.dtype == jnp.int8


def test_bad_settings_are_one_clear_line():
    with pytest.raises(UserError, match="weights='int4' is not supported"):
        Quantization(weights="int4")
    with pytest.raises(UserError, match="quantizes nothing"):
        Quantization(weights=None)
    dense = Dense(48, 8, logical_axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    with pytest.raises(
        UserError, match=r"block_size 32 does not divide a projection's 48 inputs: use a divisor \(16\)"
    ):
        dense.quantize(Quantization(block_size=32))
    model = fdl.build(models.llama_tiny(vocab_size=128))(rngs=nnx.Rngs(0))
    Quantization().apply(model)
    with pytest.raises(UserError, match="already int8"):
        Quantization().apply(model)
