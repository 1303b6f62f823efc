"""Ring attention (context parallelism): attention over a sequence split across devices.

A mesh with a `sequence` axis splits activations along length (the rule "length": "sequence",
nnxlm.sharding.rules). Attention then needs every earlier token's key and value. By default
(context_parallel="all_gather") GSPMD gathers the keys and values of the whole row on every
device. With context_parallel="ring" each device keeps its query chunk and the key/value chunks
travel around the ring of sequence devices instead (Liu, Zaharia & Abbeel, 2023): at step s a
device holds the chunk of the device s places before it, folds it into its online-softmax state
(nnxlm.modules.blockwise.accumulate, with causality by global token index) and passes it on with
jax.lax.ppermute, so no device ever holds more than two chunks of keys and values and the
transfer of the next chunk can overlap this one's compute. After as many steps as devices, the
state is normalised. Gradients come from autodiff through the shard_map (ppermute's transpose
sends the key/value cotangents back around the ring); each step's body is rematerialised.

Causal load imbalance: a chunk wholly after a device's queries is skipped (lax.cond), so device i
computes i + 1 of the n chunk pairs, but every ring step waits for its slowest device, so the
wall time stays that of n full steps: plain ring attention does half its possible work. Nothing
is done about it here; the fix (striped or zig-zag chunk order, each device holding an early and
a late part of the row) needs the data or the length sharding to reorder tokens.

Masks are those of blockwise attention: causal by global index, packed segments, a sliding window
(static or traced) by positions, soft-capped scores, GQA. When heads are split over `tensor` but
the KV heads are too few to split, the keys and values are repeated up to the query heads first.
"""

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from nnxlm.modules.blockwise import Rows, accumulate, empty_state, finish, overlaps
from nnxlm.sharding.rules import active_mesh, fit_spec, logical_to_spec, mesh_axes_of

CONTEXT_PARALLEL = ("all_gather", "ring")


def check_context_parallel(context_parallel: str) -> None:
    if context_parallel not in CONTEXT_PARALLEL:
        raise ValueError(f"attention context_parallel {context_parallel!r}: use one of {', '.join(CONTEXT_PARALLEL)}")


def _spec(shape, logical_axes) -> PartitionSpec:
    mesh, rules = active_mesh()
    return fit_spec(shape, logical_to_spec(logical_axes, rules), mesh)


def ring_axes(batch: int, length: int) -> tuple[str, ...]:
    """The mesh axes of size > 1 that split a [batch, length] activation's length in the active
    mesh (nnxlm.sharding.activation_sharding); () outside one, or where length does not divide."""
    if active_mesh() is None:
        return ()
    mesh = active_mesh()[0]
    return tuple(axis for axis in mesh_axes_of(_spec((batch, length), ("batch", "length"))[1]) if mesh.shape[axis] > 1)


def use_ring(context_parallel: str, batch: int, length: int) -> bool:
    return context_parallel == "ring" and bool(ring_axes(batch, length))


def ring_attention(
    q_btnh: jax.Array,
    k_btkh: jax.Array,
    v_btkv: jax.Array,
    segment_ids_bt: jax.Array,
    positions_bt: jax.Array,
    *,
    scale: float,
    window=None,
    softcap: float | None = None,
    block_size: int = 256,
) -> jax.Array:
    """blockwise_attention's result (causal self-attention of q [batch, length, heads, head_dim]
    over k [batch, length, kv_heads, head_dim] and v [..., v_head_dim]; returns [batch, length,
    heads, v_head_dim]) computed by ring attention over the active mesh's length axes. Call
    under nnxlm.sharding.activation_sharding with use_ring true; block_size: of the blockwise
    attention within each pair of chunks."""
    mesh = active_mesh()[0]
    batch, length, num_heads, _ = q_btnh.shape
    axes = ring_axes(batch, length)
    ring = math.prod(mesh.shape[axis] for axis in axes)
    q_spec = _spec(q_btnh.shape, ("batch", "length", "heads", "head_dim"))
    k_spec = _spec(k_btkh.shape, ("batch", "length", "kv_heads", "head_dim"))
    if k_spec[2] != q_spec[2]:  # KV heads left whole where query heads are split: one KV head a query head
        group = num_heads // k_btkh.shape[2]
        k_btkh, v_btkv = jnp.repeat(k_btkh, group, axis=2), jnp.repeat(v_btkv, group, axis=2)
        k_spec = q_spec
    rows_spec = _spec(segment_ids_bt.shape, ("batch", "length"))
    traced_window = isinstance(window, jax.Array)
    window_arg = window if traced_window else jnp.zeros((), jnp.int32)
    perm = [(i, (i + 1) % ring) for i in range(ring)]  # one cycle, whatever order ppermute numbers in
    # the mesh axes the inputs vary over: the state must vary over them from the start, as shard_map's
    # type check wants a scan or cond carry to keep one type (fresh zeros vary over none)
    varying = tuple(sorted({axis for spec in (q_spec, k_spec, rows_spec) for e in spec for axis in mesh_axes_of(e)}))

    def local(q, k, v, segment_ids, positions, window_arg):
        win = window_arg if traced_window else window
        chunk = q.shape[1]
        # the chunk's global token index: axis_index over the spec's axes is the shard's place in
        # the row (ppermute may number the devices in another order: the keys carry their index)
        first = jax.lax.axis_index(axes) * chunk
        index = jnp.broadcast_to(first + jnp.arange(chunk, dtype=jnp.int32), segment_ids.shape)
        q_rows = Rows(segment_ids, index, positions)
        state = empty_state(q.shape[0], chunk, q.shape[2], k.shape[2], v.shape[3], block_size)
        state = jax.lax.pcast(state, varying, to="varying")

        @jax.checkpoint
        def fold(state, keys):
            k, v, *k_rows = keys

            def attend(state):
                return accumulate(
                    state, q, k, v, q_rows, Rows(*k_rows), scale=scale, window=win, softcap=softcap,
                    block_q=block_size, block_k=block_size,
                )  # fmt: skip

            # chunks wholly after this device's queries (or before its window) cost nothing
            return jax.lax.cond(overlaps(q_rows, Rows(*k_rows), win), attend, lambda state: state, state)

        def ring_step(carry, _):
            state, keys = carry
            passed = tuple(jax.lax.ppermute(x, axes, perm) for x in keys)  # independent of fold: overlaps it
            return (fold(state, keys), passed), None

        keys = (k, v, *q_rows)  # each device's keys start with its own chunk
        (state, keys), _ = jax.lax.scan(ring_step, (state, keys), length=ring - 1)
        return finish(fold(state, keys), chunk, q.dtype)

    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(q_spec, k_spec, k_spec, rows_spec, rows_spec, PartitionSpec()),
        out_specs=q_spec,
    )
    return sharded(q_btnh, k_btkh, v_btkv, segment_ids_bt, positions_bt, window_arg)
