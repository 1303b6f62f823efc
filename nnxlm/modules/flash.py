"""Blockwise self-attention for training, with FlashAttention's backward pass written out.

The forward pass is nnxlm.modules.blockwise's online softmax over query blocks x key blocks, and
keeps for the backward pass only the output and each query's log-sum-exp (lse = m + log l): memory
linear in the length. The backward pass (Dao et al., FlashAttention, algorithm 2) recomputes each
block's probabilities from them, p = exp(scores - lse), and with D = rowsum(dout * out):

    dv += p^T dout      ds = p * (dout v^T - D) * scale      dq += ds k      dk += ds^T q

(dk and dv are accumulated transposed, as dout^T p and q^T ds: see the backward pass.)

Five block matmuls against the seven, plus the online softmax's elementwise chain, that
differentiating the forward recurrence costs: 2x faster than that at 4,096 tokens on a CPU.

Only causal pairs are visited. The pairs (query block i, key block i - d) are walked diagonal by
diagonal, d = 0 (the blocks holding the causal edge) to the last, each diagonal in chunks of up to
`chunk` consecutive pairs taken as one batched matmul; all chunks of one size share one lax.scan
whose carry is the whole state (m, l, o forward; dq, dk, dv backward), read and written in place
with dynamic slices. Against a map over query blocks with a scan over key blocks inside it, this
loops n(n + 1) / 2 / chunk times instead of n^2 and branches only to skip blocks outside a sliding window: 11% faster
at 4,096 tokens on a CPU. A chunk holds at most CHUNK_ELEMENTS scores, which keeps the memory of
a step bounded by a constant, not by the length. A chunk wholly outside a sliding window is
skipped with lax.cond. Queries are laid out heads-major, [batch, kv_heads, group * block, dim] a
block, so every block product is one batched matmul over (pairs, batch, kv_heads).
"""

import jax
import jax.numpy as jnp
import numpy as np

from nnxlm.modules.blockwise import Rows, _blocks, _pad_rows, _padded, overlaps

LOWEST = float(jnp.finfo(jnp.float32).min)
# Scores in one chunk of block pairs: 512K float32 (2 MiB), two 256 x 256 blocks of 4 heads. On a
# 2-core CPU (1 MiB of L2 a core) attention forward and backward at 4,096 tokens took 221-225 ms a
# layer with chunks of 2 pairs, 228 with 1, 238 with 3 and 239-249 with 4 (two runs of each).
CHUNK_ELEMENTS = 1 << 19


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
    block_size: int = 256,
) -> jax.Array:
    """Causal self-attention of q [batch, length, heads, head_dim] over k [batch, length, kv_heads,
    head_dim] and v [batch, length, kv_heads, v_head_dim] (heads a multiple of kv_heads: GQA / MQA)
    in blocks of block_size queries and keys; returns [batch, length, heads, v_head_dim] in q's
    dtype. The mask is attention.attention_mask's: keys at or before the query's index in the row,
    of its segment, and with `window` (None, an int or a traced int32 scalar) fewer than `window`
    positions back."""
    batch, length, num_heads, qk_dim = q_btnh.shape
    num_kv_heads, v_dim = k_bskh.shape[2], v_bskv.shape[3]
    group = num_heads // num_kv_heads
    block = min(block_size, length)
    padded = _padded(length, block)
    num_blocks, rows = padded // block, group * block  # rows: a query block's queries of every head in a group
    chunks = chunk_schedule(num_blocks, max(1, CHUNK_ELEMENTS // (batch * num_heads * block * block)))

    def row_blocks(segment_ids, positions):
        """Each token's Rows as query blocks and as key blocks, [num_blocks, batch, block] each."""
        rows = Rows(segment_ids, jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)), positions)
        q_rows = tuple(_blocks(x, block) for x in _pad_rows(rows, padded, -2))
        return q_rows, tuple(_blocks(x, block) for x in _pad_rows(rows, padded, -1))

    def pad(x):
        return jnp.pad(x, [(0, 0), (0, padded - x.shape[1])] + [(0, 0)] * (x.ndim - 2))

    def queries_major(x):  # [batch, length, heads, dim] -> [num_blocks, batch, kv_heads, rows, dim]
        x = pad(x).reshape(batch, num_blocks, block, num_kv_heads, group, -1)
        return x.transpose(1, 0, 3, 4, 2, 5).reshape(num_blocks, batch, num_kv_heads, rows, -1)

    def from_queries_major(x):
        x = x.reshape(num_blocks, batch, num_kv_heads, group, block, -1).transpose(1, 0, 4, 2, 3, 5)
        return x.reshape(batch, padded, num_heads, -1)[:, :length]

    def keys_major(x):  # [batch, length, kv_heads, dim] -> [num_blocks, batch, kv_heads, block, dim]
        return pad(x).reshape(batch, num_blocks, block, num_kv_heads, -1).transpose(1, 0, 3, 2, 4)

    def from_keys_major(x):
        return x.transpose(1, 0, 3, 2, 4).reshape(batch, padded, num_kv_heads, -1)[:, :length]

    def scores(q_cbkrh, k_cbksh, q_rows, k_rows, window):
        """Masked float32 scores [pairs, batch, kv_heads, rows, block] of queries already scaled,
        and tanh(raw / softcap) (None without a soft-cap) for the soft-cap's derivative."""
        s = jnp.einsum("cbkrh,cbksh->cbkrs", q_cbkrh, k_cbksh, preferred_element_type=jnp.float32)
        capped = None
        if softcap is not None:
            capped = jnp.tanh(s / softcap)
            s = softcap * capped
        (q_seg, q_index, q_pos), (k_seg, k_index, k_pos) = q_rows, k_rows
        mask = (q_index[..., :, None] >= k_index[..., None, :]) & (q_seg[..., :, None] == k_seg[..., None, :])
        if window is not None:
            mask &= q_pos[..., :, None] - k_pos[..., None, :] < window
        pairs = mask.shape[0]
        mask = jnp.broadcast_to(mask[:, :, None, None], (pairs, batch, num_kv_heads, group, block, block))
        return jnp.where(mask.reshape(pairs, batch, num_kv_heads, rows, block), s, LOWEST), capped

    def walk(step, carry, q_rows, k_rows, window):
        """carry after step(carry, q_start, k_start, pairs, q_rows, k_rows) over every chunk of causal
        pairs; with a window, a chunk none of whose queries may see one of its keys is skipped."""
        for pairs, starts in chunks:

            def body(carry, start, pairs=pairs):
                q_start, k_start = start[0], start[1]
                q_chunk = tuple(take(x, q_start, pairs) for x in q_rows)
                k_chunk = tuple(take(x, k_start, pairs) for x in k_rows)
                attend = lambda c: step(c, q_start, k_start, pairs, q_chunk, k_chunk)  # noqa: E731
                if window is None:  # every causal pair has a key its query may see
                    return attend(carry), None
                needed = overlaps(Rows(*q_chunk), Rows(*k_chunk), window)
                return jax.lax.cond(needed, attend, lambda c: c, carry), None

            carry, _ = jax.lax.scan(body, carry, starts)
        return carry

    # segment ids, positions and window are arguments, not closed over: a custom_vjp may not close
    # over values traced outside it (the layers' scan); their cotangents are None
    def forward(q, k, v, segment_ids, positions, window):
        """(output [batch, length, heads, v_dim], (output and lse in the heads-major blocks))."""
        q_rows, k_rows = row_blocks(segment_ids, positions)
        q_blocks, k_blocks, v_blocks = queries_major(q * jnp.asarray(scale, q.dtype)), keys_major(k), keys_major(v)

        def step(state, q_start, k_start, pairs, q_chunk, k_chunk):
            m, l, o = (take(x, q_start, pairs) for x in state)  # noqa: E741
            s, _ = scores(take(q_blocks, q_start, pairs), take(k_blocks, k_start, pairs), q_chunk, k_chunk, window)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            # masked scores are float32's lowest: exp(lowest - m) is 0 unless the row has seen nothing
            # yet (m lowest too); subtracting 0 there keeps it empty, with one where a row instead of
            # one an entry
            p = jnp.exp(s - jnp.where(m_new == LOWEST, 0.0, m_new)[..., None])
            correction = jnp.exp(m - m_new)
            v_chunk = take(v_blocks, k_start, pairs)
            pv = jnp.einsum("cbkrs,cbksv->cbkrv", p.astype(v.dtype), v_chunk, preferred_element_type=jnp.float32)
            new = (m_new, l * correction + jnp.sum(p, axis=-1), o * correction[..., None] + pv)
            return tuple(put(x, update, q_start) for x, update in zip(state, new, strict=True))

        stats = (num_blocks, batch, num_kv_heads, rows)
        state = (jnp.full(stats, LOWEST), jnp.zeros(stats), jnp.zeros((*stats, v_dim)))
        m, l, o = walk(step, state, q_rows, k_rows, window)  # noqa: E741
        empty = l == 0  # padding queries, or a query with no visible key: output 0, no gradient
        l_safe = jnp.where(empty, 1.0, l)
        out, lse = o / l_safe[..., None], jnp.where(empty, jnp.inf, m + jnp.log(l_safe))
        return from_queries_major(out).astype(q.dtype), (out, lse)

    @jax.custom_vjp
    def attention(q, k, v, segment_ids, positions, window):
        return forward(q, k, v, segment_ids, positions, window)[0]

    def attention_forward(q, k, v, segment_ids, positions, window):
        out, (out_blocks, lse) = forward(q, k, v, segment_ids, positions, window)
        return out, (q, k, v, segment_ids, positions, window, out_blocks, lse)

    def attention_backward(residuals, d_out):
        q, k, v, segment_ids, positions, window, out_blocks, lse = residuals
        q_rows, k_rows = row_blocks(segment_ids, positions)
        d_out_blocks = queries_major(d_out.astype(jnp.float32))
        delta = jnp.sum(d_out_blocks * out_blocks, axis=-1)  # D = rowsum(dout * out)
        q_blocks = queries_major(q * jnp.asarray(scale, q.dtype)).astype(jnp.float32)
        k_blocks, v_blocks = keys_major(k).astype(jnp.float32), keys_major(v).astype(jnp.float32)

        # dk and dv contract over the rows of a block (ds^T q, p^T dout): XLA:CPU runs a matmul whose
        # left operand is contracted over its rows 1.7x slower than one over its columns, so they
        # are taken transposed, dk^T = q^T ds and dv^T = dout^T p, from q^T and dout^T transposed
        # once here, and accumulated transposed: [num_blocks, batch, kv_heads, dim, block]
        q_blocks_t, d_out_blocks_t = (jnp.swapaxes(x, -1, -2) for x in (q_blocks, d_out_blocks))

        def step(grads, q_start, k_start, pairs, q_chunk, k_chunk):
            q_c, d_out_c, lse_c, delta_c = (take(x, q_start, pairs) for x in (q_blocks, d_out_blocks, lse, delta))
            q_t, d_out_t = take(q_blocks_t, q_start, pairs), take(d_out_blocks_t, q_start, pairs)
            k_c, v_c = take(k_blocks, k_start, pairs), take(v_blocks, k_start, pairs)
            s, capped = scores(q_c, k_c, q_chunk, k_chunk, window)
            p = jnp.exp(s - lse_c[..., None])  # 0 where masked (lowest - lse), and lse is inf for empty rows
            dv_t = jnp.einsum("cbkvr,cbkrs->cbkvs", d_out_t, p)
            ds = p * (jnp.einsum("cbkrv,cbksv->cbkrs", d_out_c, v_c) - delta_c[..., None])
            if softcap is not None:  # d(c tanh(x / c)) / dx = 1 - tanh^2
                ds = ds * (1.0 - capped * capped)
            dk_t = jnp.einsum("cbkhr,cbkrs->cbkhs", q_t, ds)
            dq = jnp.einsum("cbkrs,cbksh->cbkrh", ds, k_c)
            starts = (q_start, k_start, k_start)
            return tuple(
                put(g, take(g, start, pairs) + update, start)
                for g, update, start in zip(grads, (dq, dk_t, dv_t), starts, strict=True)
            )

        zeros = (jnp.zeros(q_blocks.shape), *(jnp.zeros(jnp.swapaxes(x, -1, -2).shape) for x in (k_blocks, v_blocks)))
        dq, dk_t, dv_t = walk(step, zeros, q_rows, k_rows, window)
        dk, dv = jnp.swapaxes(dk_t, -1, -2), jnp.swapaxes(dv_t, -1, -2)
        # scores are (q scale) k: dk was taken against the scaled queries, dq gets the scale once here
        grads = (from_queries_major(dq) * scale, from_keys_major(dk), from_keys_major(dv))
        return (*(g.astype(x.dtype) for g, x in zip(grads, (q, k, v), strict=True)), None, None, None)

    attention.defvjp(attention_forward, attention_backward)
    window = None if window is None else jnp.asarray(window, jnp.int32)
    return attention(q_btnh, k_bskh, v_bskv, segment_ids_bt, positions_bt, window)


def chunk_schedule(num_blocks: int, chunk: int) -> list[tuple[int, np.ndarray]]:
    """The causal block pairs (query block i, key block i - d) of num_blocks blocks, diagonal by
    diagonal, in runs of up to `chunk` consecutive pairs: [(pairs a run, int32 [runs, 2] of each
    run's first query block and first key block)], one entry per run length."""
    runs: dict[int, list[tuple[int, int]]] = {}
    for d in range(num_blocks):
        for first in range(d, num_blocks, chunk):
            runs.setdefault(min(chunk, num_blocks - first), []).append((first, first - d))
    return [(pairs, np.asarray(starts, np.int32)) for pairs, starts in sorted(runs.items())]


def take(x: jax.Array, start, size: int) -> jax.Array:
    """x[start:start + size] along the leading (block) axis, start traced."""
    return jax.lax.dynamic_slice_in_dim(x, start, size, 0)


def put(x: jax.Array, update: jax.Array, start) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(x, update, start, 0)
