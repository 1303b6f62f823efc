"""Gated feed-forward layer: down(act(gate(x)) * up(x)) — SwiGLU or GeGLU (Shazeer, 2020)."""

import jax
import jax.numpy as jnp
from flax import nnx

from nnxlm.modules.dense import dense_init, project

ACTIVATIONS = {
    "silu": jax.nn.silu,  # SwiGLU (Llama, Mistral, Qwen)
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # GeGLU
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # GeGLU as in Gemma
}


class GatedMLP(nnx.Module):
    """x [batch, length, embed] -> [batch, length, embed] through a gated hidden layer of hidden_dim."""

    def __init__(
        self,
        d_model: int,
        *,
        hidden_dim: int,
        activation: str = "silu",
        dtype="float32",
        param_dtype="float32",
        rngs: nnx.Rngs,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown MLP activation {activation!r}: use one of {sorted(ACTIVATIONS)}")
        self.activation = activation
        self.dtype = jnp.dtype(dtype)
        shape_in, shape_out = (d_model, hidden_dim), (hidden_dim, d_model)
        self.gate = nnx.Param(dense_init(rngs, shape_in, d_model, param_dtype), logical_axes=("embed", "mlp"))
        self.up = nnx.Param(dense_init(rngs, shape_in, d_model, param_dtype), logical_axes=("embed", "mlp"))
        self.down = nnx.Param(dense_init(rngs, shape_out, hidden_dim, param_dtype), logical_axes=("mlp", "embed"))

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        x = x_btd.astype(self.dtype)
        hidden_btf = ACTIVATIONS[self.activation](project(x, self.gate[...])) * project(x, self.up[...])
        return project(hidden_btf, self.down[...])
