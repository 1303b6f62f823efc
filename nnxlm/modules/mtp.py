"""Multi-token prediction (DeepSeek-V3, section 2.2): a training signal for tokens past the next one.

D modules run in sequence after the main model. Module k (1..D), at every position i, takes the
previous depth's hidden state h[k-1]_i (depth 0: the main model's final-normed features) and the
embedding of token t[i+k]; it RMS-normalises each, concatenates them, projects [2 d_model] back to
d_model, and runs one more decoder block (causal, with the main model's positions and segments),
giving h[k]_i. Through its own norm and the main model's output head, h[k]_i predicts t[i+k+1].
Embedding table and head are shared with the main model: the Transformer passes the embeddings in
and applies its head to what this module returns.

Two orders are DeepSeek's released weights' rather than the paper's: the concatenation is
[embedding, hidden] (the paper writes the hidden first; eh_proj holds the embedding's half
first), and h[k] goes on to depth k + 1 before the output norm (shared_head.norm), which is on the
way to the logits only.

Training only: the Transformer runs it under nnx.capture (see Transformer.mtp_logits) and the
trainer adds lambda / D * sum_k CE_k (nnxlm.loss.multi_token_prediction_loss) to the loss.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from nnxlm.modules.dense import Dense
from nnxlm.modules.stack import stacked


class PredictionDepth(nnx.Module):
    """One depth: (h[k-1], embedding of t[i+k]) -> (h[k], output-normed h[k])."""

    def __init__(
        self,
        d_model: int,
        *,
        block: Callable[..., nnx.Module],
        norm: Callable[..., nnx.Module],
        dtype="float32",
        param_dtype="float32",
        rngs: nnx.Rngs,
    ):
        self.dtype = jnp.dtype(dtype)
        self.embedding_norm = norm(d_model, param_dtype=param_dtype, rngs=rngs)
        self.hidden_norm = norm(d_model, param_dtype=param_dtype, rngs=rngs)
        # the concatenated input is a hidden dimension of this one matmul (as an MLP's down projection)
        self.projection = Dense(2 * d_model, d_model, logical_axes=("mlp", "embed"), param_dtype=param_dtype, rngs=rngs)
        self.block = block(d_model, norm=norm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.output_norm = norm(d_model, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, hidden_btd, embedded_btd, positions_bt, segment_ids_bt):
        both_btd = jnp.concatenate([self.embedding_norm(embedded_btd), self.hidden_norm(hidden_btd)], axis=-1)
        h_btd = self.block(self.projection(both_btd.astype(self.dtype)), positions_bt, segment_ids_bt)
        return h_btd, self.output_norm(h_btd)


class MultiTokenPrediction(nnx.Module):
    """depth PredictionDepth modules, stacked (parameters with a leading `layers` axis) and scanned.

    Args:
      d_model, norm, dtype, param_dtype: passed by the Transformer.
      depth: D, the number of extra tokens predicted (DeepSeek-V3: 1).
      block: factory of each depth's decoder block, called as the Transformer's blocks are.
    """

    def __init__(
        self,
        d_model: int,
        *,
        depth: int,
        block: Callable[..., nnx.Module],
        norm: Callable[..., nnx.Module],
        dtype="float32",
        param_dtype="float32",
        rngs: nnx.Rngs,
    ):
        if depth < 1:
            raise ValueError(f"multi-token prediction depth must be at least 1, got {depth}")
        self.depth = depth
        make = functools.partial(PredictionDepth, d_model, block=block, norm=norm, dtype=dtype, param_dtype=param_dtype)
        self.depths = stacked(make, depth, rngs)

    def __call__(self, hidden_btd, embedded_dbtd, positions_bt, segment_ids_bt, remat_policy=None):
        """Main-model features [batch, length, embed] and, for each depth k = 1..D, the embeddings of
        the tokens k places ahead [D, batch, length, embed] -> output-normed h[k] [D, batch, length, embed].
        remat_policy: a jax.checkpoint policy for each depth (None: no remat)."""

        def step(module, hidden, embedded, positions, segment_ids):
            return module(hidden, embedded, positions, segment_ids)

        if remat_policy is not None:
            step = nnx.remat(step, policy=remat_policy)
        scan = nnx.scan(step, in_axes=(0, nnx.Carry, 0, None, None), out_axes=(nnx.Carry, 0))
        _, out_dbtd = scan(self.depths, hidden_btd, embedded_dbtd, positions_bt, segment_ids_bt)
        return out_dbtd


def shifted_ids(ids_bt: jax.Array, depth: int) -> jax.Array:
    """[D, batch, length]: row k - 1 holds the ids k places ahead (ids[:, i + k]). The last k
    positions wrap around to the row's start: no loss is taken there, and causal attention keeps
    them out of every earlier position."""
    return jnp.stack([jnp.roll(ids_bt, -k, axis=1) for k in range(1, depth + 1)])
