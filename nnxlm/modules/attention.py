"""Causal grouped-query self-attention with rotary positions and packed-row segment masking.

num_heads query heads share num_kv_heads key/value heads (num_heads % num_kv_heads == 0):
num_kv_heads == num_heads is multi-head attention, 1 is multi-query attention. head_dim is
independent of d_model / num_heads. In a packed row, a token attends only to earlier tokens of
its own document (same segment id); positions restart at 0 for each document.

Given a KVCache (nnxlm.modules.kv_cache), the layer writes its keys and values into the cache at
cache.index and attends over every cached slot, masked by slot order and segment.

Options (off by default; each adds what the Hugging Face families need):
  rope_scaling   passed to nnxlm.modules.rope.apply_rope ({"type": "linear" | "llama3", ...}).
  qkv_bias       biases on the query, key and value projections (Qwen 2.5).
  qk_norm        a norm factory, called as qk_norm(head_dim, param_dtype=, rngs=), applied to each
                 query and key head over head_dim before RoPE (Qwen 3: RMSNorm).
  sliding_window a query attends only to keys fewer than sliding_window positions before it
                 (query position - key position < sliding_window, as Mistral in transformers).
  softcap        attention scores become softcap * tanh(scores / softcap) before the softmax
                 (Gemma 2 attn_logit_softcapping).
  query_pre_attn_scalar  scores are scaled by query_pre_attn_scalar ** -0.5 instead of
                 head_dim ** -0.5 (Gemma 2 / 3).
  implementation "auto" (default), "dense" or "blockwise": how attention without a cache is
                 computed (nnxlm.modules.flash; "auto": blockwise past 256 tokens), with
                 block_size-token blocks of queries and of keys; or a fused kernel, "cudnn" (GPU)
                 or "splash" (TPU), see nnxlm.modules.fused_attention. With a cache, a call of
                 over 1024 queries ("auto", a kernel) or any call ("blockwise") attends over the
                 cache slots blockwise (a long prefill never builds [queries x slots] scores).
  context_parallel "all_gather" (default) or "ring": under a mesh whose sequence axis splits the
                 row, GSPMD gathers every key and value on each device, or ring attention passes
                 the key/value chunks around the devices (nnxlm.modules.ring; blockwise within
                 each chunk pair, whatever `implementation`). No effect with a cache or one device.

A call may also take a layer's own `window` (an int32 scalar, possibly traced: keys fewer than
`window` positions back; a huge value is global attention) and RoPE `inv_freq` ([head_dim // 2]),
which replace sliding_window and rope_theta / rope_scaling: layers that differ only in these
(Gemma 2 / 3 local and global layers) then share one stacked module (see Transformer.layer_pattern).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from nnxlm.modules.blockwise import blockwise_cached_attention, check_implementation, use_blockwise
from nnxlm.modules.dense import Dense, fold_key
from nnxlm.modules.flash import blockwise_attention
from nnxlm.modules.fused_attention import KERNELS, check_kernel, fused_attention
from nnxlm.modules.kv_cache import KVCache, cached_attention, cached_attention_mask, empty_layer_kv
from nnxlm.modules.ring import check_context_parallel, ring_attention, use_ring
from nnxlm.modules.rope import apply_rope


def attention_mask(
    segment_ids_bt: jax.Array, positions_bt: jax.Array | None = None, sliding_window: int | None = None
) -> jax.Array:
    """[batch, 1, length, length] bool: causal and within the same segment; with a sliding window,
    also only keys whose position is less than sliding_window before the query's."""
    length = segment_ids_bt.shape[1]
    causal_tt = jnp.tril(jnp.ones((length, length), dtype=bool))
    mask_btt = causal_tt[None] & (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])
    if sliding_window is not None:
        mask_btt &= positions_bt[:, :, None] - positions_bt[:, None, :] < sliding_window
    return mask_btt[:, None]


class Attention(nnx.Module):
    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rope_theta: float = 10_000.0,
        rope_scaling: dict | None = None,
        qkv_bias: bool = False,
        qk_norm: Callable[..., nnx.Module] | None = None,
        sliding_window: int | None = None,
        softcap: float | None = None,
        query_pre_attn_scalar: float | None = None,
        implementation: str = "auto",
        block_size: int = 256,
        context_parallel: str = "all_gather",
        dtype="float32",
        param_dtype="float32",
        rngs: nnx.Rngs,
    ):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1, got {sliding_window}")
        self.rope_theta = rope_theta
        # a sorted tuple of items: module attributes must be hashable (see the rope_scaling property)
        self._rope_scaling = tuple(sorted(rope_scaling.items())) if rope_scaling else None
        self.qkv_bias, self.sliding_window = qkv_bias, sliding_window
        self.softcap, self.query_pre_attn_scalar = softcap, query_pre_attn_scalar
        self.scale = (query_pre_attn_scalar or head_dim) ** -0.5
        check_implementation(implementation, block_size)
        check_kernel(implementation, block_size=block_size, softcap=softcap)
        self.implementation, self.block_size = implementation, block_size
        check_context_parallel(context_parallel)
        self.context_parallel = context_parallel
        self.dtype = jnp.dtype(dtype)

        def dense(shape_in, shape_out, axes):
            return Dense(shape_in, shape_out, logical_axes=axes, param_dtype=param_dtype, rngs=rngs)

        self.q_proj = dense(d_model, (num_heads, head_dim), ("embed", "heads", "head_dim"))
        self.k_proj = dense(d_model, (num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"))
        self.v_proj = dense(d_model, (num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"))
        self.o_proj = dense((num_heads, head_dim), d_model, ("heads", "head_dim", "embed"))
        if qkv_bias:

            def bias(heads, axis):
                return nnx.Param(jnp.zeros((heads, head_dim), param_dtype), logical_axes=(axis, "head_dim"))

            self.q_bias = bias(num_heads, "heads")
            self.k_bias, self.v_bias = bias(num_kv_heads, "kv_heads"), bias(num_kv_heads, "kv_heads")
        if qk_norm is None:
            self.q_norm = self.k_norm = None
        else:
            self.q_norm = qk_norm(head_dim, param_dtype=param_dtype, rngs=rngs)
            self.k_norm = qk_norm(head_dim, param_dtype=param_dtype, rngs=rngs)

    @property
    def rope_scaling(self) -> dict | None:
        return dict(self._rope_scaling) if self._rope_scaling else None

    def _qkv(self, x_btd: jax.Array, positions_bt: jax.Array, inv_freq: jax.Array | None = None, key=None):
        """Queries [batch, length, heads, head_dim], keys and values [..., kv_heads, head_dim]."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        q_btnh, k_btkh, v_btkh = (proj(x_btd, fold_key(key, i)) for i, proj in enumerate(projections))
        if self.qkv_bias:
            q_btnh = q_btnh + self.q_bias[...].astype(self.dtype)
            k_btkh = k_btkh + self.k_bias[...].astype(self.dtype)
            v_btkh = v_btkh + self.v_bias[...].astype(self.dtype)
        if self.q_norm is not None:
            q_btnh, k_btkh = self.q_norm(q_btnh), self.k_norm(k_btkh)
        scaling = self.rope_scaling
        q_btnh = apply_rope(q_btnh, positions_bt, self.rope_theta, scaling, inv_freq)
        k_btkh = apply_rope(k_btkh, positions_bt, self.rope_theta, scaling, inv_freq)
        return q_btnh, k_btkh, v_btkh

    def init_cache(self, batch: int, max_length: int) -> tuple[jax.Array, jax.Array]:
        """Empty keys and values [batch, num_kv_heads, max_length, head_dim] in the compute dtype."""
        kv = empty_layer_kv(batch, max_length, self.num_kv_heads, self.head_dim, self.dtype)
        return kv, kv

    def __call__(
        self,
        x_btd: jax.Array,
        positions_bt: jax.Array,
        segment_ids_bt: jax.Array,
        cache: KVCache | None = None,
        *,
        window: jax.Array | None = None,
        inv_freq: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Without a cache: attention within x. With one (this layer's k and v, the key segment ids
        with x's already written at cache.index): returns (output, cache with x's k and v written).
        window and inv_freq: this layer's own (see the module docstring); dropout_key: of the
        projections' LoRA dropout (training)."""
        x = x_btd.astype(self.dtype)
        q_btnh, k_btkh, v_btkh = self._qkv(x, positions_bt, inv_freq, dropout_key)
        window = self.sliding_window if window is None else window
        if cache is None and use_ring(self.context_parallel, *x.shape[:2]):
            out_btnh = ring_attention(
                q_btnh, k_btkh, v_btkh, segment_ids_bt, positions_bt, scale=self.scale, window=window,
                softcap=self.softcap, block_size=self.block_size,
            )  # fmt: skip
            return self.o_proj(out_btnh, fold_key(dropout_key, 3))
        if cache is None and self.implementation in KERNELS:
            out_btnh = fused_attention(
                self.implementation, q_btnh, k_btkh, v_btkh, segment_ids_bt, positions_bt, scale=self.scale,
                window=window, softcap=self.softcap, block_size=self.block_size,
            )  # fmt: skip
            return self.o_proj(out_btnh, fold_key(dropout_key, 3))
        if cache is None and use_blockwise(self.implementation, x.shape[1]):
            out_btnh = blockwise_attention(
                q_btnh, k_btkh, v_btkh, segment_ids_bt, positions_bt, scale=self.scale, window=window,
                softcap=self.softcap, block_size=self.block_size,
            )  # fmt: skip
            return self.o_proj(out_btnh, fold_key(dropout_key, 3))
        if cache is None:
            mask = attention_mask(segment_ids_bt, positions_bt, window)
            if self.softcap is None:
                out_btnh = jax.nn.dot_product_attention(q_btnh, k_btkh, v_btkh, mask=mask, scale=self.scale)
            else:  # the cache layout's attention, over x's own keys and values
                own = KVCache(k_btkh.transpose(0, 2, 1, 3), v_btkh.transpose(0, 2, 1, 3), segment_ids_bt, 0)
                out_btnh = cached_attention(q_btnh, own, mask, self.scale, self.softcap)
            return self.o_proj(out_btnh, fold_key(dropout_key, 3))
        cache = cache.write(k_btkh.transpose(0, 2, 1, 3), v_btkh.transpose(0, 2, 1, 3))
        if use_blockwise(self.implementation, x.shape[1], cached=True):  # a long prefill: no [queries x slots] scores
            out_btnh = blockwise_cached_attention(
                q_btnh, cache, segment_ids_bt, scale=self.scale, window=window, softcap=self.softcap,
                block_q=self.block_size, block_k=self.block_size,
            )  # fmt: skip
        else:
            mask = cached_attention_mask(segment_ids_bt, cache.segment_ids, cache.index, window)
            out_btnh = cached_attention(q_btnh, cache, mask, self.scale, self.softcap)
        return self.o_proj(out_btnh, fold_key(dropout_key, 3)), cache
