"""Expert parallelism: an MoE layer's routed experts inside jax.shard_map, each device routing its
own tokens, token-slots sent to the devices holding their experts by all-to-all.

When. The MoE's dispatch is "sorted" and a mesh of more than one device is active
(nnxlm.sharding.active_mesh: the Trainer's step runs inside activation_sharding). With an `expert`
axis of size ep > 1 the experts' kernels [E, embed, mlp] are split over it along E (DEFAULT_RULES),
device j of the axis holding experts j E/ep ... (j + 1) E/ep - 1. Without one, or with E not
divisible by ep (fit_spec then leaves the kernels whole), ep = 1: every device holds every expert
and nothing is exchanged, but the grouped matmuls still run on each device's own tokens (left to
GSPMD, the sort by expert over the whole batch would gather every token onto every device).
The one-device code runs instead, partitioned by GSPMD (correct, with gathers of its choosing),
when the kernels' E axis is split over other mesh axes than `expert` (sharding rules overridden)
or the tokens are not split over `expert` (a batch not divisible by data x fsdp x expert); as it
does outside a mesh (generation, notebooks); and when an expert projection's LoRA adapter applies
dropout (training an adapter with dropout > 0): this schedule merges active adapters into the
kernels (W + scale A B: the same function and gradients, without dropout).

Schedule. Routing (and, with a capacity factor, which slots are dropped) is computed before, on
the global arrays, so it is the same on any mesh. Then, on every device, for its own tokens (the
batch split over data, fsdp and expert, the length over sequence, as the rules split activations):
  1. pack: each of its n tokens' k slots is written into the send buffer of the device holding the
     slot's expert: ep buffers of W rows each (static), a row with the token's activations;
  2. all_to_all over `expert`: buffer j goes to device j, which receives ep buffers of rows for
     its own experts;
  3. grouped matmuls (gate, up, activation, down) of the received rows by their local experts,
     only on real rows (nnxlm.modules.grouped);
  4. all_to_all back: every row returns to the device and the row it came from;
  5. each token sums its slots' rows times their weights (dropped slots: zero).
The backward pass is the transpose: the same exchanges in reverse order (all_to_all transposes to
all_to_all), the weight gradients of local experts on their own device.

Static shapes, and the memory they cost (rows of d_model floats, each way):
  dropless   W = n * min(k, E/ep): a device may send all its slots to one device, at most
             min(k, E/ep) a token (a token's k experts are distinct). Send and receive buffers
             are ep * W rows, ep * min(k, E/ep) / k times the n k slots (Mixtral's E = 8, k = 2:
             4x for ep = 4 or 8), and so are the hidden activations on the receiving side; the
             grouped matmuls still do only the real rows' FLOPs.
  capacity   W = (E/ep) * b * C (b sequences of the device, C the per-sequence capacity): each
             expert's rows are fixed, the buffers are E b C ~ c n k rows (c the capacity factor),
             and the receiving side is one batched matmul per projection over all of its rows,
             empty ones included (GShard / Switch's schedule).

Other axes. data and fsdp split the tokens (ep groups of devices exchange among themselves);
kernels split over fsdp along embed are gathered whole (ZeRO-3: the gather's transpose reduces the
gradient back); sequence splits the length (capacity counts were taken on whole sequences
before). The experts' hidden axis `mlp` stays split over the mesh axes that do not split tokens
(tensor, by default): each device computes its share of every expert's hidden units and the
partial outputs are summed over those axes (psum); over an axis that also splits tokens it is
gathered whole instead, as a psum there would add different tokens.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from nnxlm.modules.grouped import Layout, gather_rows, grouped_matmul, scatter_rows, sorted_layout
from nnxlm.modules.mlp import ACTIVATIONS
from nnxlm.sharding.rules import active_mesh, fit_spec, logical_to_spec, mesh_axes_of

AXIS = "expert"


@dataclasses.dataclass(frozen=True)
class Plan:
    """tokens: spec of [batch, length, *] arrays; gate: of the [E, embed, mlp] kernels (gate, up)
    inside the shard_map, down: of [E, mlp, embed]; ep: devices the experts are split over;
    mlp_axes: what the hidden axis is split over; vary_kernels: the token axes the kernels are
    not split over (see _local)."""

    mesh: Mesh
    tokens: PartitionSpec
    gate: PartitionSpec
    down: PartitionSpec
    ep: int
    mlp_axes: tuple[str, ...]
    vary_kernels: tuple[str, ...]


def plan(kernel, tokens_shape) -> Plan | None:
    """The plan for an MoE whose gate kernel (an nnx.Param [E, embed, mlp] with logical axes) meets
    tokens [batch, length, embed] in the active mesh; None: the one-device code."""
    active = active_mesh()
    if active is None or math.prod(active[0].shape.values()) == 1:
        return None
    mesh, rules = active
    axes = kernel.get_metadata().get("logical_axes") or (None,) * 3
    axes = tuple(axes)[-3:]  # inside the Transformer's scan over layers the names still start with "layers"
    fitted = fit_spec(kernel.shape, logical_to_spec(axes, rules), mesh)
    expert_axes = tuple(a for a in mesh_axes_of(fitted[0]) if mesh.shape[a] > 1)
    tokens = fit_spec(tokens_shape, logical_to_spec(("batch", "length", None), rules), mesh)
    token_axes = tuple(axis for entry in tokens for axis in mesh_axes_of(entry))
    if expert_axes not in ((), (AXIS,)) or (expert_axes and AXIS not in token_axes):
        return None
    mlp_axes = tuple(axis for axis in mesh_axes_of(fitted[2]) if axis not in token_axes)
    mlp = mlp_axes[0] if len(mlp_axes) == 1 else (mlp_axes or None)
    experts = AXIS if expert_axes else None
    kernel_axes = {experts, *mlp_axes}
    return Plan(
        mesh,
        tokens,
        PartitionSpec(experts, None, mlp),
        PartitionSpec(experts, mlp, None),
        mesh.shape[AXIS] if expert_axes else 1,
        mlp_axes,
        tuple(axis for axis in token_axes if axis not in kernel_axes),
    )


def routed_experts(plan, x_btd, weights_btk, experts_btk, rows_btk, kernels, *, activation, capacity=None):
    """The routed experts' output [batch, length, embed] under `plan`.

    x [batch, length, embed]; weights [batch, length, k] (in x's dtype); experts [batch, length, k]
    int; rows [batch, length, k] (each slot's place in its sequence's queue of its expert) with a
    capacity C, else None; kernels: gate, up [E, embed, mlp] and down [E, mlp, embed] arrays.
    """
    inputs = (x_btd, weights_btk, experts_btk) + (() if rows_btk is None else (rows_btk,))
    local = functools.partial(_local, plan=plan, activation=activation, capacity=capacity)
    return jax.shard_map(
        local,
        mesh=plan.mesh,
        in_specs=((plan.tokens,) * len(inputs), (plan.gate, plan.gate, plan.down)),
        out_specs=plan.tokens,
    )(inputs, kernels)


def _local(inputs, kernels, *, plan, activation, capacity):
    """One device's part: its tokens in, their routed experts' output out (see the schedule)."""
    x_btd, weights_btk, experts_btk = inputs[:3]
    ep = plan.ep
    if plan.vary_kernels:  # typed as differing over the token axes, as the rows they meet do:
        # transposed, this sums the weight gradients over the devices of other tokens
        kernels = [jax.lax.pcast(w, plan.vary_kernels, to="varying") for w in kernels]
    gate_edf, up_edf, down_efd = kernels
    b, t, d = x_btd.shape
    k = experts_btk.shape[-1]
    local_experts = gate_edf.shape[0]
    n, slots = b * t, b * t * k
    experts_s = experts_btk.reshape(slots)
    device_s = experts_s // local_experts
    if capacity is None:  # a slot's row in its device's buffer: the earlier slots sent there
        width = n * min(k, local_experts)
        sent_se = jnp.cumsum(jax.nn.one_hot(device_s, ep, dtype=jnp.int32), axis=0)
        place_s = jnp.take_along_axis(sent_se, device_s[:, None], axis=1)[:, 0] - 1
        dest_s = device_s * width + place_s
    else:  # rows [device, local expert, sequence, C]: expert e's slots of sequence s at (e b + s) C
        width = local_experts * b * capacity
        rows_s = inputs[3].reshape(slots)
        sequence_s = jnp.arange(slots) // (t * k)
        dest_s = jnp.where(rows_s < capacity, (experts_s * b + sequence_s) * capacity + rows_s, ep * width)
    x_rd = scatter_rows(x_btd.reshape(n, d)[jnp.arange(slots) // k], dest_s, ep * width)
    x_rd = _exchange(x_rd, ep)  # now: ep blocks of rows, one from each device
    if plan.mlp_axes:  # typed as differing over the hidden units' axes, as the kernels they meet
        # do: transposed, this sums the rows' gradients over the devices of other hidden units
        x_rd = jax.lax.pcast(x_rd, plan.mlp_axes, to="varying")
    if capacity is None:
        local_s = jnp.full((ep * width,), local_experts, jnp.int32)  # local_experts: an empty row
        local_s = _exchange(scatter_rows(experts_s % local_experts, dest_s, ep * width, local_s), ep)
        layout = sorted_layout(local_s, local_experts)
        y_rd = layout.gather(_experts(layout.scatter(x_rd), gate_edf, up_edf, down_efd, layout, activation))
    else:  # [source, expert, rows] -> [expert, source, rows]: each expert's rows together
        by_expert = (ep, local_experts, b * capacity, d)
        x_rd = x_rd.reshape(by_expert).swapaxes(0, 1).reshape(ep * width, d)
        layout = Layout("capacity", ep * width, None, capacity=ep * b * capacity)
        y_rd = _experts(x_rd, gate_edf, up_edf, down_efd, layout, activation)
        y_rd = y_rd.reshape(local_experts, ep, b * capacity, d).swapaxes(0, 1).reshape(ep * width, d)
    y_rd = _exchange(y_rd, ep)  # every row back where it was sent from
    y_sd = gather_rows(y_rd, dest_s)
    y_nd = jnp.einsum("nkd,nk->nd", y_sd.reshape(n, k, d), weights_btk.reshape(n, k))
    if plan.mlp_axes:  # each device summed over its share of the hidden units only
        y_nd = jax.lax.psum(y_nd, plan.mlp_axes)
    return y_nd.reshape(b, t, d)


def _exchange(rows, ep):
    """Block j of the rows to device j of the expert axis, block i of the result from device i."""
    return rows if ep == 1 else jax.lax.all_to_all(rows, AXIS, 0, 0, tiled=True)


def _experts(x_rd, gate_edf, up_edf, down_efd, layout, activation):
    dtype = x_rd.dtype
    gate_rf = grouped_matmul(x_rd, gate_edf.astype(dtype), layout)
    up_rf = grouped_matmul(x_rd, up_edf.astype(dtype), layout)
    return grouped_matmul(ACTIVATIONS[activation](gate_rf) * up_rf, down_efd.astype(dtype), layout)
