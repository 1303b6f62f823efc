"""Grouped matmul: rows that belong to experts, each multiplied by its own expert's weight, doing
the real rows' work only. What the sorted MoE dispatch (nnxlm.modules.moe) and expert parallelism
(nnxlm.modules.expert_parallel) compute their expert projections with.

A `Layout` says where each of S token-slots sits in a buffer of R rows (static shapes) and which
expert each row belongs to; rows no slot uses are zero. `grouped_matmul(x [R, in], w [E, in, out],
layout)` gives [R, out]. Three layouts:

  ragged    rows sorted by expert, group_sizes [E] rows each (their sum may be < R: the rest is
            padding): jax.lax.ragged_dot, which TPUs and GPUs run as a grouped matmul.
  tiles     the same rows, but every expert's group starts on a fresh tile of T rows; a loop over
            the tiles in use multiplies each tile by its expert's weight (a custom VJP runs the
            same loop for the input's gradient and sums each tile's x^T dy into its expert's
            weight gradient). For XLA:CPU, where ragged_dot computes every expert on every row
            (measured with jax 0.10.2: a [4096, 256] x [8, 256, 512] forward and backward took
            270 ms with ragged_dot, 294 ms running all 8 experts on all rows, 22 ms in tiles of
            64). At most E * (T - 1) padding rows are computed; R = (ceil(S / T) + E) * T.
  capacity  every expert owns C consecutive rows (R = E * C): one batched matmul [E, C, in] x
            [E, in, out]. Slots beyond an expert's C rows are dropped (the capacity factor).

On CPU the dropless layout is `tiles`, elsewhere `ragged` (sorted_layout(tiles=None) decides by
jax.default_backend()).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

TILE = 64  # rows a tile on CPU: 32 and 64 measured alike, 16 and 128 slower (loop vs padding)


@dataclasses.dataclass(frozen=True)
class Layout:
    """dest [S] int32: the buffer row of each slot (rows for a dropped slot: out of range).
    ragged: group_sizes [E]; tiles: tile_experts [R / T] (expert of each tile), used_tiles (scalar),
    tile; capacity: capacity C (rows per expert)."""

    kind: str
    rows: int
    dest: jax.Array
    group_sizes: jax.Array | None = None
    tile_experts: jax.Array | None = None
    used_tiles: jax.Array | None = None
    tile: int = 0
    capacity: int = 0

    def scatter(self, x_sd: jax.Array) -> jax.Array:
        """Slots [S, d] -> buffer [R, d] (zero rows where no slot is)."""
        return scatter_rows(x_sd, self.dest, self.rows)

    def gather(self, y_rd: jax.Array) -> jax.Array:
        """Buffer [R, d] -> slots [S, d] (zeros for dropped slots)."""
        return gather_rows(y_rd, self.dest)


def scatter_rows(x_s, dest_s: jax.Array, rows: int, into: jax.Array | None = None) -> jax.Array:
    """x [S, ...] written to rows dest [S] (distinct; out of range: left out) of `into` (default:
    zeros) of `rows` rows."""
    if into is None:
        into = jnp.zeros((rows, *x_s.shape[1:]), x_s.dtype)
    return into.at[dest_s].set(x_s, mode="drop", unique_indices=True)


def gather_rows(y_r: jax.Array, dest_s: jax.Array) -> jax.Array:
    """Rows dest [S] of y [R, ...] (zeros where dest is out of range)."""
    return jnp.take(y_r, dest_s, axis=0, mode="fill", fill_value=0, unique_indices=True)


def sorted_layout(experts_s: jax.Array, num_experts: int, tiles: bool | None = None) -> Layout:
    """The dropless layout of slots routed to experts_s [S] (int; num_experts or more: no expert,
    left out), ragged or in tiles (None: tiles on CPU only)."""
    slots = experts_s.shape[0]
    experts_s = jnp.minimum(experts_s, num_experts)  # every "no expert" id sorts last, as one
    group_sizes = jnp.bincount(experts_s, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    order_s = jnp.argsort(experts_s, stable=True)
    rank_s = jnp.zeros_like(order_s).at[order_s].set(jnp.arange(slots, dtype=order_s.dtype))  # sorted position
    if tiles is None:
        tiles = jax.default_backend() == "cpu"
    if not tiles:
        dest = jnp.where(experts_s < num_experts, rank_s, slots)
        return Layout("ragged", slots, dest.astype(jnp.int32), group_sizes=group_sizes)
    tile = min(TILE, 1 << max(0, math.ceil(math.log2(max(1, slots / num_experts)))))
    num_tiles = -(-slots // tile) + num_experts  # bounds sum_e ceil(g_e / T)
    tiles_e = -(-group_sizes // tile)
    tile_end_e = jnp.cumsum(tiles_e)
    group_start_e = jnp.cumsum(group_sizes) - group_sizes
    expert_s = jnp.minimum(experts_s, num_experts - 1)
    dest = (tile_end_e - tiles_e)[expert_s] * tile + rank_s - group_start_e[expert_s]
    dest = jnp.where(experts_s < num_experts, dest, num_tiles * tile)
    tile_experts = jnp.searchsorted(tile_end_e, jnp.arange(num_tiles), side="right")
    tile_experts = jnp.minimum(tile_experts, num_experts - 1).astype(jnp.int32)
    return Layout(
        "tiles",
        num_tiles * tile,
        dest.astype(jnp.int32),
        tile_experts=tile_experts,
        used_tiles=tile_end_e[-1],
        tile=tile,
    )


def capacity_layout(experts_s: jax.Array, rows_s: jax.Array, num_experts: int, capacity: int) -> Layout:
    """Slot s goes to row rows_s[s] of its expert's `capacity` rows; rows_s >= capacity: dropped."""
    kept = (rows_s < capacity) & (experts_s < num_experts)
    dest = jnp.where(kept, experts_s * capacity + rows_s, num_experts * capacity)
    return Layout("capacity", num_experts * capacity, dest.astype(jnp.int32), capacity=capacity)


def grouped_matmul(x_rd: jax.Array, w_edf: jax.Array, layout: Layout) -> jax.Array:
    """Each row of x [R, in] times its expert's w [E, in, out]: [R, out] (zero rows stay zero)."""
    if layout.kind == "capacity":
        x_ecd = x_rd.reshape(w_edf.shape[0], layout.capacity, x_rd.shape[-1])
        return jnp.einsum("ecd,edf->ecf", x_ecd, w_edf).reshape(layout.rows, w_edf.shape[-1])
    if layout.kind == "ragged":
        return jax.lax.ragged_dot(x_rd, w_edf, layout.group_sizes)
    # cast outside the custom VJP, so that its weight gradient has the dtype of its weight input
    return _tiled(x_rd, w_edf.astype(x_rd.dtype), layout.tile_experts, layout.used_tiles, layout.tile)


def _tile_loop(x_rd, w_edf, tile_experts, used_tiles, tile, transpose_w):
    """y[tile t] = x[tile t] @ w[expert of t] (or @ w[...]^T) for the used tiles; zeros elsewhere.

    The update of y is in place on XLA:CPU with jaxlib 0.10.2; jax issue 40101 reports later
    jaxlibs rewriting the whole buffer in such loops: re-measure (bench.moe) when upgrading."""
    w_axis = 1 if transpose_w else 0  # the weight's axis contracted with x's features

    def body(t, y):
        x_td = jax.lax.dynamic_slice_in_dim(x_rd, t * tile, tile)
        w_io = jax.lax.dynamic_index_in_dim(w_edf, tile_experts[t], keepdims=False)
        y_to = jax.lax.dot_general(x_td, w_io, (((1,), (w_axis,)), ((), ())))
        return jax.lax.dynamic_update_slice_in_dim(y, y_to.astype(y.dtype), t * tile, 0)

    out = w_edf.shape[1] if transpose_w else w_edf.shape[2]
    return _loop(used_tiles, body, jnp.zeros((x_rd.shape[0], out), x_rd.dtype))


def _loop(used_tiles, body, zeros):
    """fori_loop(0, used_tiles, body, zeros), its first step taken outside: inside shard_map the
    carry must start with the type the body gives it (varying over the inputs' mesh axes), which
    plain zeros lack. That step is tile 0, all zeros rows if no tile is used: its result is zero."""
    return jax.lax.fori_loop(1, used_tiles, body, body(0, zeros))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))  # the tile size: static
def _tiled(x_rd, w_edf, tile_experts, used_tiles, tile):
    return _tile_loop(x_rd, w_edf, tile_experts, used_tiles, tile, False)


def _tiled_fwd(x_rd, w_edf, tile_experts, used_tiles, tile):
    return _tile_loop(x_rd, w_edf, tile_experts, used_tiles, tile, False), (x_rd, w_edf, tile_experts, used_tiles)


def _tiled_bwd(tile, residuals, dy_rf):
    x_rd, w_edf, tile_experts, used_tiles = residuals
    dx_rd = _tile_loop(dy_rf, w_edf, tile_experts, used_tiles, tile, True)

    def body(t, dw):  # each tile's x^T dy added into its expert's gradient, in place
        x_td = jax.lax.dynamic_slice_in_dim(x_rd, t * tile, tile)
        dy_tf = jax.lax.dynamic_slice_in_dim(dy_rf, t * tile, tile)
        return dw.at[tile_experts[t]].add((x_td.T @ dy_tf).astype(dw.dtype))

    dw_edf = _loop(used_tiles, body, jnp.zeros_like(w_edf))
    return dx_rd, dw_edf, None, None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)
