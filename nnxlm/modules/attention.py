"""Causal grouped-query self-attention with rotary positions and packed-row segment masking.

num_heads query heads share num_kv_heads key/value heads (num_heads % num_kv_heads == 0):
num_kv_heads == num_heads is multi-head attention, 1 is multi-query attention. head_dim is
independent of d_model / num_heads. In a packed row, a token attends only to earlier tokens of
its own document (same segment id); positions restart at 0 for each document.

Given a KVCache (nnxlm.modules.kv_cache), the layer writes its keys and values into the cache at
cache.index and attends over every cached slot, masked by slot order and segment.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from nnxlm.modules.dense import dense_init, project
from nnxlm.modules.kv_cache import KVCache, cached_attention, cached_attention_mask, empty_layer_kv
from nnxlm.modules.rope import apply_rope


def attention_mask(segment_ids_bt: jax.Array) -> jax.Array:
    """[batch, 1, length, length] bool: causal and within the same segment."""
    length = segment_ids_bt.shape[1]
    causal_tt = jnp.tril(jnp.ones((length, length), dtype=bool))
    same_segment_btt = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    return (causal_tt[None] & same_segment_btt)[:, None]


class Attention(nnx.Module):
    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rope_theta: float = 10_000.0,
        dtype="float32",
        param_dtype="float32",
        rngs: nnx.Rngs,
    ):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_theta = rope_theta
        self.dtype = jnp.dtype(dtype)

        def param(shape, fan_in, axes):
            return nnx.Param(dense_init(rngs, shape, fan_in, param_dtype), logical_axes=axes)

        self.q_proj = param((d_model, num_heads, head_dim), d_model, ("embed", "heads", "head_dim"))
        self.k_proj = param((d_model, num_kv_heads, head_dim), d_model, ("embed", "kv_heads", "head_dim"))
        self.v_proj = param((d_model, num_kv_heads, head_dim), d_model, ("embed", "kv_heads", "head_dim"))
        self.o_proj = param((num_heads, head_dim, d_model), num_heads * head_dim, ("heads", "head_dim", "embed"))

    def init_cache(self, batch: int, max_length: int) -> tuple[jax.Array, jax.Array]:
        """Empty keys and values [batch, num_kv_heads, max_length, head_dim] in the compute dtype."""
        kv = empty_layer_kv(batch, max_length, self.num_kv_heads, self.head_dim, self.dtype)
        return kv, kv

    def __call__(
        self, x_btd: jax.Array, positions_bt: jax.Array, segment_ids_bt: jax.Array, cache: KVCache | None = None
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Without a cache: attention within x. With one (this layer's k and v, the key segment ids
        with x's already written at cache.index): returns (output, cache with x's k and v written)."""
        x = x_btd.astype(self.dtype)
        q_btnh = apply_rope(project(x, self.q_proj[...]), positions_bt, self.rope_theta)
        k_btkh = apply_rope(project(x, self.k_proj[...]), positions_bt, self.rope_theta)
        v_btkh = project(x, self.v_proj[...])
        if cache is None:
            mask = attention_mask(segment_ids_bt)
            out_btnh = jax.nn.dot_product_attention(q_btnh, k_btkh, v_btkh, mask=mask, scale=self.head_dim**-0.5)
            return project(out_btnh, self.o_proj[...], contract=2)
        slot = (0, 0, cache.index, 0)
        k = jax.lax.dynamic_update_slice(cache.k, k_btkh.transpose(0, 2, 1, 3).astype(cache.k.dtype), slot)
        v = jax.lax.dynamic_update_slice(cache.v, v_btkh.transpose(0, 2, 1, 3).astype(cache.v.dtype), slot)
        cache = dataclasses.replace(cache, k=k, v=v)
        mask = cached_attention_mask(segment_ids_bt, cache.segment_ids, cache.index)
        out_btnh = cached_attention(q_btnh, cache, mask, self.head_dim**-0.5)
        return project(out_btnh, self.o_proj[...], contract=2), cache
