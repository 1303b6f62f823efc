"""Blockwise (online-softmax) self-attention: memory linear in the sequence length.

Dense attention materialises the [length x length] scores of every head, and for training their
gradient as well: 3 GiB of temporaries at 4096 tokens for the tiny recipe. Here the queries are
taken block_q at a time. For each query block, the keys and values are scanned block_k at a time,
with the running maximum m, normaliser l and weighted sum o of the online softmax (Milakov &
Gimelshein, 2018; the FlashAttention recurrence):

    m' = max(m, max_s scores)    l' = l e^(m - m') + sum_s e^(scores - m')
    o' = o e^(m - m') + sum_s e^(scores - m') v          out = o / l

The scan body is rematerialised (jax.checkpoint), so the backward pass keeps only each step's
carries, not its [block_q x block_k] scores. Key blocks wholly masked for a query block (beyond
the causal diagonal, or outside a sliding window) are skipped with lax.cond.

The mask is that of nnxlm.modules.attention.attention_mask: a query attends to keys at or before
its own index in the row, of its own segment, and (with a window) fewer than `window` positions
back. Scores are computed and soft-capped in float32, masked to float32's lowest value, as the
dense path does, so rows agree with it to rounding.
"""

import math

import jax
import jax.numpy as jnp

# How attention without a cache is computed (Attention and MLA take `implementation`): "dense"
# builds the score matrix, "blockwise" never does, "auto" goes blockwise past BLOCKWISE_FROM tokens,
# where the dense scores and their gradient grow to hundreds of MiB a layer; below it the dense
# path is a few fused matmuls and no slower.
IMPLEMENTATIONS = ("auto", "dense", "blockwise")
BLOCKWISE_FROM = 1024


def check_implementation(implementation: str, block_size: int) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: use one of {', '.join(IMPLEMENTATIONS)}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"attention block_size {block_size!r}: use a positive number of tokens (e.g. 512)")


def use_blockwise(implementation: str, length: int) -> bool:
    return implementation == "blockwise" or (implementation == "auto" and length > BLOCKWISE_FROM)


def blockwise_attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskv: jax.Array,
    segment_ids_bt: jax.Array,
    positions_bt: jax.Array,
    *,
    scale: float,
    window=None,
    softcap: float | None = None,
    block_q: int = 512,
    block_k: int = 512,
) -> jax.Array:
    """Causal self-attention of q [batch, length, heads, head_dim] over k [batch, length, kv_heads,
    head_dim] and v [batch, length, kv_heads, v_head_dim] (heads a multiple of kv_heads: GQA / MQA);
    returns [batch, length, heads, v_head_dim] in q's dtype. window: keys fewer than `window`
    positions back only (None: all; may be a traced int32 scalar)."""
    batch, length, num_heads, _ = q_btnh.shape
    num_kv_heads, v_dim = k_bskh.shape[2], v_bskv.shape[3]
    group = num_heads // num_kv_heads
    block_q, block_k = min(block_q, length), min(block_k, length)
    padded = math.lcm(block_q, block_k) * -(-length // math.lcm(block_q, block_k))
    pad = padded - length

    def padded_rows(x, value=0):
        return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)

    # padding keys get segment -1 (no query's), padding queries segment -2 (their rows are dropped)
    q = padded_rows(q_btnh).reshape(batch, padded, num_kv_heads, group, -1)
    k, v = padded_rows(k_bskh), padded_rows(v_bskv)
    q_segments, k_segments = padded_rows(segment_ids_bt, -2), padded_rows(segment_ids_bt, -1)
    positions = padded_rows(positions_bt)
    num_k_blocks = padded // block_k

    def blocks(x, size):  # [batch, padded, ...] -> [blocks, batch, size, ...]
        return jnp.moveaxis(x.reshape(batch, padded // size, size, *x.shape[2:]), 1, 0)

    k_blocks, v_blocks = blocks(k, block_k), blocks(v, block_k)
    k_segment_blocks, k_position_blocks = blocks(k_segments, block_k), blocks(positions, block_k)

    def query_block(args):
        index, q_bqkgh, q_seg_bq, q_pos_bq = args
        q_start = index * block_q

        @jax.checkpoint
        def key_step(carry, key_block):
            j, k_bskh, v_bskv, k_seg_bs, k_pos_bs = key_block
            k_start = j * block_k

            def attend(carry):
                m_bkgq, l_bkgq, o_bkgqv = carry
                scores = jnp.einsum("bqkgh,bskh->bkgqs", q_bqkgh, k_bskh, preferred_element_type=jnp.float32)
                scores = scores * scale
                if softcap is not None:
                    scores = softcap * jnp.tanh(scores / softcap)
                q_index = q_start + jnp.arange(block_q)
                k_index = k_start + jnp.arange(block_k)
                mask_bqs = (q_index[:, None] >= k_index[None, :])[None] & (q_seg_bq[:, :, None] == k_seg_bs[:, None, :])
                if window is not None:
                    mask_bqs &= q_pos_bq[:, :, None] - k_pos_bs[:, None, :] < window
                scores = jnp.where(mask_bqs[:, None, None], scores, jnp.finfo(jnp.float32).min)
                m_new = jnp.maximum(m_bkgq, jnp.max(scores, axis=-1))
                probs = jnp.exp(scores - m_new[..., None])
                probs = jnp.where(mask_bqs[:, None, None], probs, 0.0)  # a row with nothing yet stays empty
                correction = jnp.exp(m_bkgq - m_new)
                l_new = l_bkgq * correction + jnp.sum(probs, axis=-1)
                update = jnp.einsum(
                    "bkgqs,bskv->bkgqv", probs.astype(v_bskv.dtype), v_bskv, preferred_element_type=jnp.float32
                )
                return m_new, l_new, o_bkgqv * correction[..., None] + update

            needed = k_start <= q_start + block_q - 1  # some key at or before the block's last query
            if window is not None:  # and some key inside the window of the block's first query
                needed &= jnp.max(k_pos_bs) > jnp.min(q_pos_bq) - window
            return jax.lax.cond(needed, attend, lambda carry: carry, carry), None

        lowest = jnp.finfo(jnp.float32).min
        carry = (
            jnp.full((batch, num_kv_heads, group, block_q), lowest, jnp.float32),
            jnp.zeros((batch, num_kv_heads, group, block_q), jnp.float32),
            jnp.zeros((batch, num_kv_heads, group, block_q, v_dim), jnp.float32),
        )
        keys = (jnp.arange(num_k_blocks), k_blocks, v_blocks, k_segment_blocks, k_position_blocks)
        (_, l_bkgq, o_bkgqv), _ = jax.lax.scan(key_step, carry, keys)
        out = o_bkgqv / jnp.where(l_bkgq == 0, 1.0, l_bkgq)[..., None]
        return out.transpose(0, 3, 1, 2, 4)  # [batch, block_q, kv_heads, group, v_dim]

    queries = (
        jnp.arange(padded // block_q),
        blocks(q, block_q),
        blocks(q_segments, block_q),
        blocks(positions, block_q),
    )
    out = jax.lax.map(query_block, queries)  # [q blocks, batch, block_q, kv_heads, group, v_dim]
    out = jnp.moveaxis(out, 0, 1).reshape(batch, padded, num_heads, v_dim)
    return out[:, :length].astype(q_btnh.dtype)
