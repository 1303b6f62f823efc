"""The key/value cache of autoregressive decoding: a pytree of arrays passed in and returned.

A model called with a cache attends to the keys and values already in it as well as to its own,
writes its own at slot `index` (one slot a token, the same slot for every row) and returns the
cache with `index` moved past them. Slots are preallocated for the whole generation, so shapes
never change and a compiled decode step is reused for every token.

Layout (logical axis names, see nnxlm.sharding.rules):
  k, v         [layers, batch, kv_heads, length, head_dim] when the layers are stacked (scanned);
               a tuple of [batch, kv_heads, length, head_dim], one a layer, when they are a list.
               Heads before length: a decode step then attends with plain batched matmuls over
               each (row, kv head), no transposes of the cache (5x faster on CPU than
               [batch, length, kv_heads, head_dim] at batch 8). Multi-head latent attention
               (nnxlm.modules.mla) keeps its latent in k and its rope key in v, as one kv head.
  segment_ids  [batch, length] int32: the segment of the token in each slot; 0 marks a slot not
               yet written or holding left padding, which no real token attends to
  index        [] int32: the next slot to write, the same for every row (generate: left-padded
               rows); or [batch] int32, each row's own (the serving engine: rows at different
               lengths, each starting at slot 0). Writes and masks follow either form.
  k_scale, v_scale  None, or for an int8 cache (Quantization(kv="int8")) float32 [layers, batch,
               kv_heads, length] (or a tuple, as k): k and v then hold int8 values, each slot's
               head quantized over head_dim with its own scale (nnxlm.modules.quantization), so a
               slot costs head_dim + 4 bytes a head instead of 4 x head_dim in float32.

Inside a layer the same type holds that layer's k and v without the layers axis.
"""

import dataclasses

import jax
import jax.numpy as jnp

from nnxlm.modules.quantization import quantize_int8

KV_AXES = ("batch", "kv_heads", "length", "head_dim")
SEGMENT_AXES = ("batch", "length")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    segment_ids: jax.Array
    index: jax.Array
    k_scale: jax.Array | tuple[jax.Array, ...] | None = None
    v_scale: jax.Array | tuple[jax.Array, ...] | None = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def write(self, k_bkth: jax.Array, v_bkth: jax.Array) -> "KVCache":
        """One layer's cache with new keys and values [batch, kv_heads, length, head_dim] written
        from slot index (quantized, if the cache is int8)."""
        if not self.quantized:
            k, v = (write_slots(old, new, self.index, axis=2) for old, new in ((self.k, k_bkth), (self.v, v_bkth)))
            return dataclasses.replace(self, k=k, v=v)
        (k, k_scale), (v, v_scale) = quantize_int8(k_bkth, axis=-1), quantize_int8(v_bkth, axis=-1)
        return dataclasses.replace(
            self,
            k=write_slots(self.k, k, self.index, axis=2),
            v=write_slots(self.v, v, self.index, axis=2),
            k_scale=write_slots(self.k_scale, k_scale[..., 0], self.index, axis=2),
            v_scale=write_slots(self.v_scale, v_scale[..., 0], self.index, axis=2),
        )

    def keys(self, dtype) -> jax.Array:
        """One layer's keys [batch, kv_heads, max_length, head_dim] in `dtype` (dequantized)."""
        return _dequantized(self.k, self.k_scale, dtype)

    def values(self, dtype) -> jax.Array:
        return _dequantized(self.v, self.v_scale, dtype)

    def without_index(self) -> "KVCache":
        """The cache with index None: jax.tree.map over it then touches only arrays with a batch axis
        (of a tuple cache, where batch leads every one)."""
        return dataclasses.replace(self, index=None)

    @property
    def batch_size(self) -> int:
        return self.segment_ids.shape[0]

    @property
    def max_length(self) -> int:
        return self.segment_ids.shape[1]

    def logical_axes(self) -> "KVCache":
        """The logical axis names of every array, as a KVCache of tuples (for sharding rules)."""

        def axes(kv):
            if isinstance(kv, tuple):
                return tuple(KV_AXES for _ in kv)
            return ("layers", *KV_AXES) if kv.ndim == len(KV_AXES) + 1 else KV_AXES

        def scale_axes(scale):
            if scale is None:
                return None
            per_slot = KV_AXES[:-1]
            if isinstance(scale, tuple):
                return tuple(per_slot for _ in scale)
            return ("layers", *per_slot) if scale.ndim == len(per_slot) + 1 else per_slot

        index = ("batch",) if jnp.ndim(self.index) == 1 else ()
        return KVCache(
            k=axes(self.k),
            v=axes(self.v),
            segment_ids=SEGMENT_AXES,
            index=index,
            k_scale=scale_axes(self.k_scale),
            v_scale=scale_axes(self.v_scale),
        )


def _dequantized(x, scale, dtype) -> jax.Array:
    if scale is None:
        return x.astype(dtype)
    return (x.astype(jnp.float32) * scale[..., None]).astype(dtype)


def empty_layer_kv(batch: int, max_length: int, num_kv_heads: int, head_dim: int, dtype) -> jax.Array:
    return jnp.zeros((batch, num_kv_heads, max_length, head_dim), dtype)


def write_slots(cache_bx, update_bx, index, axis: int) -> jax.Array:
    """cache_bx with update_bx written from slot `index` along `axis` (batch is axis 0): index []
    writes every row at the same slot, index [batch] each row at its own."""
    index = jnp.asarray(index, jnp.int32)
    if index.ndim == 0:
        start = [0] * cache_bx.ndim
        start[axis] = index
        return jax.lax.dynamic_update_slice(cache_bx, update_bx.astype(cache_bx.dtype), start)

    def row(row_x, update_x, i):
        start = [0] * row_x.ndim
        start[axis - 1] = i
        return jax.lax.dynamic_update_slice(row_x, update_x, start)

    return jax.vmap(row)(cache_bx, update_bx.astype(cache_bx.dtype), index)


def cached_attention_mask(
    segment_ids_bt: jax.Array, key_segment_ids_bs: jax.Array, index: jax.Array, sliding_window: int | None = None
) -> jax.Array:
    """[batch, 1, length, max_length] bool for queries written at slots index.. of the cache
    (index [] or [batch], see KVCache):
    causal over slots and within the same segment (so never to an empty or padding slot). With a
    sliding window, only slots less than sliding_window before the query's: a row's tokens fill
    contiguous slots, so slot distance is position distance (left padding has segment 0 and is
    masked by the segment test)."""
    length, max_length = segment_ids_bt.shape[1], key_segment_ids_bs.shape[1]
    query_slot_bt = jnp.reshape(index, (-1, 1)) + jnp.arange(length)  # [1 or batch, length]
    offset_bts = query_slot_bt[:, :, None] - jnp.arange(max_length)
    causal_bts = offset_bts >= 0
    if sliding_window is not None:
        causal_bts &= offset_bts < sliding_window
    same_segment_bts = key_segment_ids_bs[:, None, :] == segment_ids_bt[:, :, None]
    return (causal_bts & same_segment_bts)[:, None]


def cached_attention(q_btnh, cache: KVCache, mask_b1ts, scale: float, softcap: float | None = None) -> jax.Array:
    """Attention of queries [batch, length, heads, head_dim] over every slot of one layer's cache
    ([batch, kv_heads, max_length, head_dim]); the queries sharing a kv head are stacked into the
    rows of one matmul. Softmax in float32, masked slots at the dtype's lowest value, as in
    jax.nn.dot_product_attention. softcap: scores become softcap * tanh(scores / softcap) (Gemma 2).
    An int8 cache's scales multiply the scores (keys) and the probabilities (values), so no float
    copy of the cache is made beyond the values' conversion inside each matmul."""
    batch, length, num_heads, head_dim = q_btnh.shape
    num_kv_heads, max_length = cache.k.shape[1], cache.k.shape[2]
    group = num_heads // num_kv_heads
    q_bkqh = q_btnh.reshape(batch, length, num_kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    q_bkqh = q_bkqh.reshape(batch, num_kv_heads, length * group, head_dim)
    if cache.quantized:
        scores_bkqs = jnp.einsum("bkqh,bksh->bkqs", q_bkqh, cache.k.astype(q_bkqh.dtype)).astype(jnp.float32)
        scores_bkqs = scores_bkqs * (scale * cache.k_scale[:, :, None, :])
    else:
        scores_bkqs = jnp.einsum("bkqh,bksh->bkqs", q_bkqh, cache.k) * jnp.asarray(scale, q_btnh.dtype)
    scores_bktgs = scores_bkqs.reshape(batch, num_kv_heads, length, group, max_length).astype(jnp.float32)
    if softcap is not None:
        scores_bktgs = softcap * jnp.tanh(scores_bktgs / softcap)
    scores_bktgs = jnp.where(mask_b1ts[:, :, :, None], scores_bktgs, jnp.finfo(jnp.float32).min)
    probs_bktgs = jax.nn.softmax(scores_bktgs, axis=-1)
    probs_bkqs = probs_bktgs.reshape(batch, num_kv_heads, length * group, max_length)
    if cache.quantized:
        probs_bkqs = (probs_bkqs * cache.v_scale[:, :, None, :]).astype(q_btnh.dtype)
        out_bkqh = jnp.einsum("bkqs,bksh->bkqh", probs_bkqs, cache.v.astype(q_btnh.dtype))
    else:
        out_bkqh = jnp.einsum("bkqs,bksh->bkqh", probs_bkqs.astype(cache.v.dtype), cache.v)
    out_bktgh = out_bkqh.reshape(batch, num_kv_heads, length, group, head_dim)
    return out_bktgh.transpose(0, 2, 1, 3, 4).reshape(batch, length, num_heads, head_dim)
