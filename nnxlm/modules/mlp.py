"""Gated feed-forward layer: down(act(gate(x)) * up(x)) — SwiGLU or GeGLU (Shazeer, 2020)."""

import jax
import jax.numpy as jnp
from flax import nnx

from nnxlm.modules.dense import Dense, fold_key

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
        self.gate = Dense(d_model, hidden_dim, logical_axes=("embed", "mlp"), param_dtype=param_dtype, rngs=rngs)
        self.up = Dense(d_model, hidden_dim, logical_axes=("embed", "mlp"), param_dtype=param_dtype, rngs=rngs)
        self.down = Dense(hidden_dim, d_model, logical_axes=("mlp", "embed"), param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_btd: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """dropout_key: of the projections' LoRA dropout (training)."""
        x = x_btd.astype(self.dtype)
        gate_btf, up_btf = self.gate(x, fold_key(dropout_key, 0)), self.up(x, fold_key(dropout_key, 1))
        return self.down(ACTIVATIONS[self.activation](gate_btf) * up_btf, fold_key(dropout_key, 2))
