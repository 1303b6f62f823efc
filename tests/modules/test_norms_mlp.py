import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nnxlm.modules import GatedMLP, RMSNorm


def test_rmsnorm_matches_the_formula():
    norm = RMSNorm(6, eps=1e-5)
    norm.scale[...] = jnp.arange(1.0, 7.0)
    x = np.random.default_rng(0).normal(size=(2, 3, 6)).astype(np.float32)
    expected = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-5) * np.arange(1.0, 7.0)
    np.testing.assert_allclose(norm(jnp.asarray(x)), expected, rtol=1e-5)


@pytest.mark.parametrize(
    "activation, function",
    [("silu", jax.nn.silu), ("gelu_tanh", lambda x: jax.nn.gelu(x, approximate=True))],
)
def test_gated_mlp_is_down_of_activated_gate_times_up(activation, function):
    mlp = GatedMLP(8, hidden_dim=16, activation=activation, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 8))
    expected = (function(x @ mlp.gate.kernel[...]) * (x @ mlp.up.kernel[...])) @ mlp.down.kernel[...]
    np.testing.assert_allclose(mlp(x), expected, atol=1e-5, rtol=1e-5)


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="unknown MLP activation"):
        GatedMLP(8, hidden_dim=16, activation="relu6", rngs=nnx.Rngs(0))


def test_rmsnorm_offset_scales_by_one_plus_a_zero_initialised_weight():
    plain, gemma = RMSNorm(8), RMSNorm(8, offset=1.0, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(gemma.scale[...], np.zeros(8))
    x = jax.random.normal(jax.random.key(0), (2, 8))
    np.testing.assert_allclose(gemma(x), plain(x), rtol=1e-6)
    gemma.scale[...] = plain.scale[...] * 0.5
    np.testing.assert_allclose(gemma(x), plain(x) * 1.5, rtol=1e-6)
