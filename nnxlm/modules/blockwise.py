"""Blockwise (online-softmax) attention: memory linear in the sequence length.

Dense attention materialises the [length x length] scores of every head, and for training their
gradient as well: 3 GiB of temporaries at 4096 tokens for the tiny recipe. Here the queries are
taken block_q at a time. For each query block, the keys and values are scanned block_k at a time,
with the running maximum m, normaliser l and weighted sum o of the online softmax (Milakov &
Gimelshein, 2018; the FlashAttention recurrence):

    m' = max(m, max_s scores)    l' = l e^(m - m') + sum_s e^(scores - m')
    o' = o e^(m - m') + sum_s e^(scores - m') v          out = o / l

The scan body is rematerialised (jax.checkpoint), so the backward pass keeps only each step's
carries, not its [block_q x block_k] scores. Key blocks wholly masked for a query block (after
the block's last query, or outside a sliding window) are skipped with lax.cond.

Two callers share `accumulate`, which folds one set of keys into a running state (m, l, o):
  blockwise_cached_attention  a long prefill over every slot of a KV cache (float or int8)
  nnxlm.modules.ring          ring attention: a device's query chunk against the key chunks of
                              the others, one ring step at a time
Each says where its tokens sit with Rows: an `index` that orders them causally (the row index,
a global index across devices, or a cache slot), `positions` that measure the sliding window and
segment ids. A query attends to keys of index at or before its own, of its own segment, and (with
a window) fewer than `window` positions back: the mask of nnxlm.modules.attention.attention_mask
and of kv_cache.cached_attention_mask. Scores are computed and soft-capped in float32, masked to
float32's lowest value, as the dense paths do, so rows agree with them to rounding.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from nnxlm.modules.kv_cache import KVCache

# How attention is computed (Attention and MLA take `implementation`): "dense" builds the score
# matrix, "blockwise" never does, "auto" goes blockwise past BLOCKWISE_FROM tokens without a cache
# (training, evaluation: nnxlm.modules.flash, as fast as dense at 128-256 tokens on a CPU, 2.6x
# faster at 1,024, and memory linear in the length) and past CACHED_BLOCKWISE_FROM queries with one
# (long prefills: blockwise_cached_attention). "cudnn" and "splash" are fused kernels for
# attention without a cache (nnxlm.modules.fused_attention); with a cache they choose as "auto".
IMPLEMENTATIONS = ("auto", "dense", "blockwise", "cudnn", "splash")
BLOCKWISE_FROM = 256
CACHED_BLOCKWISE_FROM = 1024


def check_implementation(implementation: str, block_size: int) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: use one of {', '.join(IMPLEMENTATIONS)}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"attention block_size {block_size!r}: use a positive number of tokens (e.g. 256)")


def use_blockwise(implementation: str, length: int, cached: bool = False) -> bool:
    """Whether `length` queries attend blockwise (cached: over a KV cache)."""
    threshold = CACHED_BLOCKWISE_FROM if cached else BLOCKWISE_FROM
    return implementation == "blockwise" or (implementation in ("auto", "cudnn", "splash") and length > threshold)


class Rows(NamedTuple):
    """Where queries or keys sit, each int32 [batch, length]: segment_ids (attend within one),
    index (causal order: a query sees keys of index <= its own) and positions (window distance)."""

    segment_ids: jax.Array
    index: jax.Array
    positions: jax.Array


class State(NamedTuple):
    """The online softmax of queries in blocks: m, l float32 [q blocks, batch, kv_heads, group,
    block_q] (running maximum and normaliser), o float32 [..., v_dim] (unnormalised output)."""

    m: jax.Array
    l: jax.Array  # noqa: E741
    o: jax.Array


def _padded(length: int, block: int) -> int:
    return block * -(-length // block)


def _pad_rows(rows: Rows, padded: int, segment: int) -> Rows:
    """Rows padded to `padded` tokens: segment `segment` (no real token's, so always masked);
    index and positions repeat the last token's, so a block's min and max stay those of its real
    tokens (the padding never makes a block look needed)."""
    pad = [(0, 0), (0, padded - rows.segment_ids.shape[1])]
    return Rows(
        jnp.pad(rows.segment_ids, pad, constant_values=segment),
        jnp.pad(rows.index, pad, mode="edge"),
        jnp.pad(rows.positions, pad, mode="edge"),
    )


def _blocks(x, size: int):  # [batch, padded, ...] -> [blocks, batch, size, ...]
    batch, padded = x.shape[:2]
    return jnp.moveaxis(x.reshape(batch, padded // size, size, *x.shape[2:]), 1, 0)


def overlaps(q_rows: Rows, k_rows: Rows, window=None) -> jax.Array:
    """bool []: whether any of k_rows may be visible to any of q_rows (some key at or before the
    last query, and inside the window of the first); False means the pair can be skipped."""
    needed = jnp.min(k_rows.index) <= jnp.max(q_rows.index)
    if window is not None:
        needed &= jnp.max(k_rows.positions) > jnp.min(q_rows.positions) - window
    return needed


def empty_state(batch: int, length: int, num_heads: int, num_kv_heads: int, v_dim: int, block_q: int) -> State:
    """The state of `length` queries that have seen no key (block_q as given to accumulate)."""
    block_q = min(block_q, length)
    shape = (_padded(length, block_q) // block_q, batch, num_kv_heads, num_heads // num_kv_heads, block_q)
    lowest = jnp.finfo(jnp.float32).min
    return State(jnp.full(shape, lowest), jnp.zeros(shape), jnp.zeros((*shape, v_dim)))


def accumulate(
    state: State,
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskv: jax.Array,
    q_rows: Rows,
    k_rows: Rows,
    *,
    scale: float,
    window=None,
    softcap: float | None = None,
    block_q: int = 512,
    block_k: int = 512,
    k_scale_bsk: jax.Array | None = None,
    v_scale_bsk: jax.Array | None = None,
) -> State:
    """`state` with keys k [batch, keys, kv_heads, head_dim] and values v [batch, keys, kv_heads,
    v_dim] folded in, for queries q [batch, length, heads, head_dim] (heads a multiple of kv_heads:
    GQA / MQA). int8 keys / values come with their float32 scales [batch, keys, kv_heads]."""
    batch, length, num_heads, _ = q_btnh.shape
    num_keys, num_kv_heads = k_bskh.shape[1], k_bskh.shape[2]
    group = num_heads // num_kv_heads
    block_q, block_k = min(block_q, length), min(block_k, num_keys)
    q_padded, k_padded = _padded(length, block_q), _padded(num_keys, block_k)
    compute_dtype = q_btnh.dtype if k_scale_bsk is not None else v_bskv.dtype

    def pad(x, padded):
        return jnp.pad(x, [(0, 0), (0, padded - x.shape[1])] + [(0, 0)] * (x.ndim - 2))

    q = pad(q_btnh, q_padded).reshape(batch, q_padded, num_kv_heads, group, -1)
    q_rows = _pad_rows(q_rows, q_padded, -2)
    k_rows = _pad_rows(k_rows, k_padded, -1)
    key_blocks = [_blocks(pad(x, k_padded), block_k) for x in (k_bskh, v_bskv, *k_rows)]
    scales = [_blocks(pad(s, k_padded), block_k) for s in (k_scale_bsk, v_scale_bsk) if s is not None]

    def query_block(args):
        q_bqkgh, q_block_rows, carry = args
        q_block_rows = Rows(*q_block_rows)

        @jax.checkpoint
        def key_step(carry, key_block):
            k_bskh, v_bskv, k_seg, k_index, k_pos, *scales_bsk = key_block  # scales: of int8 keys, values
            k_block_rows = Rows(k_seg, k_index, k_pos)

            def attend(carry):
                m_bkgq, l_bkgq, o_bkgqv = carry
                k = k_bskh.astype(q_bqkgh.dtype)
                scores = jnp.einsum("bqkgh,bskh->bkgqs", q_bqkgh, k, preferred_element_type=jnp.float32)
                scores = scores * scale
                if scales_bsk:  # int8 keys: each slot's scale multiplies its scores
                    scores = scores * scales_bsk[0].transpose(0, 2, 1)[:, :, None, None, :]
                if softcap is not None:
                    scores = softcap * jnp.tanh(scores / softcap)
                q_seg, q_index, q_pos = q_block_rows
                mask_bqs = (q_index[:, :, None] >= k_index[:, None, :]) & (q_seg[:, :, None] == k_seg[:, None, :])
                if window is not None:
                    mask_bqs &= q_pos[:, :, None] - k_pos[:, None, :] < window
                scores = jnp.where(mask_bqs[:, None, None], scores, jnp.finfo(jnp.float32).min)
                m_new = jnp.maximum(m_bkgq, jnp.max(scores, axis=-1))
                probs = jnp.exp(scores - m_new[..., None])
                probs = jnp.where(mask_bqs[:, None, None], probs, 0.0)  # a row with nothing yet stays empty
                correction = jnp.exp(m_bkgq - m_new)
                l_new = l_bkgq * correction + jnp.sum(probs, axis=-1)
                if scales_bsk:  # int8 values: each slot's scale multiplies its probabilities
                    probs = probs * scales_bsk[1].transpose(0, 2, 1)[:, :, None, None, :]
                v = v_bskv.astype(compute_dtype)
                update = jnp.einsum(
                    "bkgqs,bskv->bkgqv", probs.astype(compute_dtype), v, preferred_element_type=jnp.float32
                )
                return m_new, l_new, o_bkgqv * correction[..., None] + update

            needed = overlaps(q_block_rows, k_block_rows, window)
            return jax.lax.cond(needed, attend, lambda carry: carry, carry), None

        carry, _ = jax.lax.scan(key_step, tuple(carry), (*key_blocks, *scales))
        return carry

    queries = (_blocks(q, block_q), tuple(_blocks(x, block_q) for x in q_rows), tuple(state))
    return State(*jax.lax.map(query_block, queries))


def finish(state: State, length: int, dtype) -> jax.Array:
    """The attention output [batch, length, heads, v_dim] in `dtype` of a state (o / l; zeros
    for queries that saw no key)."""
    out = state.o / jnp.where(state.l == 0, 1.0, state.l)[..., None]  # [q blocks, b, kv, g, block_q, v]
    blocks, batch, num_kv_heads, group, block_q, v_dim = out.shape
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, blocks * block_q, num_kv_heads * group, v_dim)
    return out[:, :length].astype(dtype)


def blockwise_cached_attention(
    q_btnh: jax.Array,
    cache: KVCache,
    segment_ids_bt: jax.Array,
    *,
    scale: float,
    window=None,
    softcap: float | None = None,
    block_q: int = 512,
    block_k: int = 512,
) -> jax.Array:
    """kv_cache.cached_attention, blockwise: queries [batch, length, heads, head_dim] written at
    slots cache.index.. ([] or [batch]) attend over one layer's cache slots ([batch, kv_heads,
    max_length, head_dim], float or int8 with scales), masked as cached_attention_mask (slot order,
    segment, window in slots). Key blocks after the last query's slot are skipped, so a prefill into
    a long, mostly empty cache costs what its own tokens need. [batch, length, heads, head_dim]."""
    batch, length, num_heads, _ = q_btnh.shape
    num_kv_heads, max_length, v_dim = cache.v.shape[1], cache.v.shape[2], cache.v.shape[3]
    slots_bt = jnp.broadcast_to(jnp.reshape(cache.index, (-1, 1)) + jnp.arange(length), (batch, length))
    key_slots_bs = jnp.broadcast_to(jnp.arange(max_length), (batch, max_length))
    q_rows = Rows(segment_ids_bt, slots_bt.astype(jnp.int32), slots_bt.astype(jnp.int32))
    k_rows = Rows(cache.segment_ids, key_slots_bs.astype(jnp.int32), key_slots_bs.astype(jnp.int32))
    heads_last = (0, 2, 1, 3)  # the cache's [batch, kv_heads, slots, dim] -> [batch, slots, kv_heads, dim]
    k_bskh, v_bskv = cache.k.transpose(heads_last), cache.v.transpose(heads_last)
    scales = {}
    if cache.quantized:
        scales = dict(k_scale_bsk=cache.k_scale.transpose(0, 2, 1), v_scale_bsk=cache.v_scale.transpose(0, 2, 1))
    state = empty_state(batch, length, num_heads, num_kv_heads, v_dim, block_q)
    state = accumulate(
        state, q_btnh, k_bskh, v_bskv, q_rows, k_rows, scale=scale, window=window, softcap=softcap,
        block_q=block_q, block_k=block_k, **scales,
    )  # fmt: skip
    return finish(state, length, q_btnh.dtype)
