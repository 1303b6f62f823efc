"""Pipeline parallelism: the stacked layers split into stages over the `pipeline` mesh axis, with
micro-batches flowing through them (GPipe, or a circular schedule that loops them round R times).

Layout. Parameters keep their stacked [L, ...] layout (so checkpoints do not depend on the mesh);
the sharding rule "layers": "pipeline" gives stage s the contiguous block of layers s L/S ...
(s + 1) L/S - 1. Inside the step the stack is viewed as [S, R, C, ...] (C = L / (S R) layers a
chunk): stage s applies chunks s, s + S, ..., s + (R - 1) S, so a micro-batch goes round the ring
of stages R times. With R = 1 (GPipe) that view is a reshape of the stored layout and costs
nothing; with R > 1 stage s needs layers outside its stored block, and the view is an all-to-all
of the layer parameters over the pipeline axis every step ((S - 1) / S of each device's stack
sent forward, the gradients sent back the same way): the price of keeping the checkpoint layout.

Schedule (GSPMD, no shard_map): a state buffer [S, micro-batch, length, embed] sharded over the
pipeline axis on its first dimension holds what each stage works on. Each of the R M + S - 1
iterations
  1. stage 0 loads item t (micro-batch t mod M, round t div M) from its queue,
  2. every stage applies its chunk to its slot (jax.vmap over stages, spmd_axis_name=pipeline, of
     a scan over the chunk's layers),
  3. the buffer shifts one stage on (jnp.roll over the stage dimension: a collective-permute),
  4. what left the last stage, now at stage 0, is written back into stage 0's queue.
The queue [S, M, micro-batch, length, embed] (sharded like the buffer: only stage 0's copy is
read) starts as the micro-batches and ends as their outputs; a micro-batch written back at
iteration t is read again at t + M - S + 1, so circular schedules need M >= S. Each stage is busy
R M of the R M + S - 1 iterations: the bubble fraction is (S - 1) / (R M + S - 1) (GPipe: R = 1),
each iteration costing one chunk of L / (S R) layers. The backward pass comes from autodiff (the
roll's transpose is the reverse collective-permute).

Per micro-batch: micro-batch m holds rows m, m + M, m + 2 M, ... (each device keeps its own rows,
as in gradient accumulation); positions and segment ids are taken by micro-batch; the dropout key
of layer l is folded with m (masks differ from an unpipelined run's, with the same distribution);
the MoE balance statistics (nnxlm.modules.moe.balance_statistics) of every layer are averaged
over the micro-batches and give the whole batch's balance loss, as on one device.

Inside a stage, MoE layers run their one-device code partitioned by GSPMD (the expert-parallel
shard_map does not trace under the vmap over stages), and a mesh with both pipeline and expert
axes, or ring attention, is refused with the fix (nnxlm.recipes.validation).
Only the main stack (`layers`) is pipelined: DeepSeek-style `first_layers` run before it, on every
stage, as without a pipeline (their stack is split over the pipeline axis only if S divides it).
The embedding, the final norm and the head run on every stage too (replicated over pipeline).
"""

import contextlib
import contextvars
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from nnxlm.errors import UserError
from nnxlm.modules.moe import in_pipeline_stage
from nnxlm.sharding.rules import active_mesh, fit_spec, logical_to_spec, mesh_axes_of

SCHEDULES = ("gpipe", "circular")
STATISTICS = "moe_balance_statistics"  # what a MoE layer sows inside a pipeline (see moe.py)


@dataclasses.dataclass(frozen=True)
class PipelineSchedule:
    """How micro-batches flow through the stages (the Trainer's pipeline_* fields).

    microbatches: M, the micro-batches each (gradient-accumulation) step's rows are cut into;
      None: as many as stages. kind: "gpipe" or "circular". repeats: R, rounds of the ring a
      micro-batch makes in the circular schedule (1 for GPipe).
    """

    microbatches: int | None = None
    kind: str = "gpipe"
    repeats: int = 1

    def resolved(self, stages: int) -> tuple[int, int]:
        """(M, R) on `stages` stages."""
        return self.microbatches or stages, self.repeats if self.kind == "circular" else 1


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """Share of a stage's iterations spent idle: (S - 1) / (R M + S - 1); 0 for one stage."""
    return (stages - 1) / (repeats * microbatches + stages - 1)


def schedule_problem(num_layers: int, rows: int, stages: int, schedule: PipelineSchedule):
    """(field, value, fix) of the first setting `stages` stages cannot run, or None. num_layers:
    of the pipelined stack; rows: of one (gradient-accumulation) micro-batch step."""
    if schedule.kind not in SCHEDULES:
        return "pipeline_schedule", schedule.kind, f"use one of {', '.join(map(repr, SCHEDULES))}"
    if schedule.kind == "gpipe" and schedule.repeats != 1:
        return "pipeline_repeats", schedule.repeats, "repeats need pipeline_schedule='circular'; or use 1"
    microbatches, repeats = schedule.resolved(stages)
    if num_layers % (stages * repeats):
        fix = f"the {num_layers} pipelined layers must divide by stages ({stages}) x repeats ({repeats})"
        return "num_layers", num_layers, fix + "; change num_layers, the mesh's pipeline axis or pipeline_repeats"
    if rows % microbatches:
        return "pipeline_microbatches", microbatches, f"the {rows} rows of a step (per accumulation) must divide by it"
    if repeats > 1 and microbatches < stages:
        return "pipeline_microbatches", microbatches, f"the circular schedule needs at least the {stages} stages"
    return None


_SCHEDULE: contextvars.ContextVar = contextvars.ContextVar("nnxlm_pipeline_schedule", default=None)


@contextlib.contextmanager
def pipelining(schedule: PipelineSchedule):
    """While tracing inside, a pipelined Transformer follows `schedule` (the Trainer's step)."""
    token = _SCHEDULE.set(schedule)
    try:
        yield
    finally:
        _SCHEDULE.reset(token)


def stage_axes() -> tuple[str, ...]:
    """The mesh axes of size > 1 the `layers` axis is split over in the active mesh (() outside one)."""
    active = active_mesh()
    if active is None:
        return ()
    mesh, rules = active
    return tuple(a for a in mesh_axes_of(logical_to_spec(("layers",), rules)[0]) if mesh.shape[a] > 1)


def pipeline_stages() -> int:
    """S: the stages of the active mesh (1: no pipeline)."""
    axes = stage_axes()
    return math.prod(active_mesh()[0].shape[a] for a in axes) if axes else 1


def run_pipeline(layers, x_btd, positions_bt, segment_ids_bt, keys_l, values_l, *, policy, capture):
    """The stack `layers` (stacked parameters [L, ...]) applied to x [batch, length, embed] in
    pipeline stages; returns (x, balance losses [L, ...] of its MoE layers or None).

    keys_l: dropout keys [L] or None; values_l: per-layer attention settings (dicts of [L, ...])
    or None; policy: a jax.checkpoint policy of each layer, or None; capture: whether the caller
    runs under nnx.capture (the MoE layers then report their balance statistics).
    """
    mesh, rules = active_mesh()
    axes = stage_axes()
    stages = math.prod(mesh.shape[a] for a in axes)
    # what nnx.capture put on the modules (empty) stays out of the stacked state
    graphdef, captures, state = nnx.split(layers, nnx.Intermediate, ...)
    num_layers = jax.tree.leaves(state)[0].shape[0]
    schedule = _SCHEDULE.get() or PipelineSchedule()
    batch = x_btd.shape[0]
    problem = schedule_problem(num_layers, batch, stages, schedule)
    if problem is not None:
        field, value, fix = problem
        raise UserError(f"pipeline {field} is {value!r} on {stages} stages: {fix}")
    if mesh.shape.get("expert", 1) > 1:
        raise UserError("a mesh with both pipeline and expert axes is not supported yet: drop one of the two")
    microbatches, repeats = schedule.resolved(stages)
    chunk = num_layers // (stages * repeats)
    stage_entry = axes[0] if len(axes) == 1 else axes

    def pin(x, *logical):  # [S, *logical]: the stage dimension over the pipeline axes
        tail = fit_spec(x.shape[1:], logical_to_spec(logical, rules), mesh)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(stage_entry, *tail)))

    def by_stage(x, logical=None):  # [L, ...] -> [S, R, C, ...]: stage s, round r: chunk r S + s
        x = x.reshape(repeats, stages, chunk, *x.shape[1:]).swapaxes(0, 1)
        return x if logical is None else pin(x, None, None, *logical)

    def by_stage_variable(variable):
        logical = variable.get_metadata().get("logical_axes") or (None,) * variable.ndim
        return variable.replace(by_stage(variable[...], tuple(logical)[1:]))

    state_src = jax.tree.map(by_stage_variable, state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    keys_src = None if keys_l is None else by_stage(keys_l)
    values_src = None if values_l is None else jax.tree.map(by_stage, values_l)

    def micro(x):  # [batch, ...] -> [M, batch / M, ...]: micro-batch m holds rows m, m + M, ...
        return x.reshape(batch // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)

    x_mbtd, positions_mbt, segment_ids_mbt = micro(x_btd), micro(positions_bt), micro(segment_ids_bt)
    queue_smbtd = pin(jnp.broadcast_to(x_mbtd, (stages, *x_mbtd.shape)), None, "batch", "length", None)
    state_sbtd = pin(jnp.zeros((stages, *x_mbtd.shape[1:]), x_btd.dtype), "batch", "length", None)

    layer_fn = _layer_fn(graphdef, captures, capture)
    if policy is not None:
        layer_fn = jax.checkpoint(layer_fn, policy=policy)

    def stage_fn(state_rc, keys_rc, values_rc, x_btd, positions_bt, segment_ids_bt, round_, micro_batch):
        """One stage's chunk (round `round_` of its R) on one micro-batch."""
        pick = (lambda a: a[0]) if repeats == 1 else (lambda a: jax.lax.dynamic_index_in_dim(a, round_, 0, False))
        state_c, keys_c, values_c = jax.tree.map(pick, (state_rc, keys_rc, values_rc))
        if keys_c is not None:
            keys_c = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_c, micro_batch)

        def layer(x, inputs):
            return layer_fn(inputs[0], x, positions_bt, segment_ids_bt, inputs[1], inputs[2])

        return jax.lax.scan(layer, x_btd, (state_c, keys_c, values_c))

    run_stages = jax.vmap(stage_fn, spmd_axis_name=stage_entry)
    plan = _Plan(stages, microbatches, repeats)

    def iteration(carry, step):
        state_sbtd, queue_smbtd = carry
        load, load_slot, round_s, micro_s, store, store_slot = step
        loaded_sbtd = jax.lax.dynamic_index_in_dim(queue_smbtd, load_slot, 1, False)
        first = (jnp.arange(stages) == 0) & load
        state_sbtd = jnp.where(first[:, None, None, None], loaded_sbtd, state_sbtd)
        positions_sbt = pin(positions_mbt[micro_s], "batch", "length")
        segment_ids_sbt = pin(segment_ids_mbt[micro_s], "batch", "length")
        state_sbtd, statistics = run_stages(
            state_src, keys_src, values_src, state_sbtd, positions_sbt, segment_ids_sbt, round_s, micro_s
        )
        # one stage on; what left the last stage arrives at stage 0 and goes back into its queue
        state_sbtd = pin(jnp.roll(state_sbtd, 1, axis=0), "batch", "length", None)
        kept_sbtd = jax.lax.dynamic_index_in_dim(queue_smbtd, store_slot, 1, False)
        written_sbtd = jnp.where(store, state_sbtd, kept_sbtd)
        queue_smbtd = jax.lax.dynamic_update_index_in_dim(queue_smbtd, written_sbtd, store_slot, 1)
        return (state_sbtd, queue_smbtd), statistics

    (_, queue_smbtd), statistics = jax.lax.scan(iteration, (state_sbtd, queue_smbtd), plan.steps())
    out_mbtd = queue_smbtd[0]
    out_btd = out_mbtd.swapaxes(0, 1).reshape(x_btd.shape)
    return out_btd, plan.balance_losses(statistics)


def _layer_fn(graphdef, captures, capture: bool):
    """(one layer's state, x, positions, segment ids, key, settings) -> (x, its MoE statistics or None)."""

    def apply(layer_state, x_btd, positions_bt, segment_ids_bt, key, values):
        block = nnx.merge(graphdef, captures, layer_state)
        settings = {} if values is None else {"layer": values}
        with in_pipeline_stage():
            if not capture:
                return block(x_btd, positions_bt, segment_ids_bt, key, **settings), None
            x_btd, sown = nnx.capture(block, nnx.Intermediate)(x_btd, positions_bt, segment_ids_bt, key, **settings)
        found = []
        for path, variable in nnx.to_flat_state(sown):
            if path[-1] != STATISTICS:
                raise UserError(f"a pipelined layer sows {'.'.join(map(str, path))}: only MoE statistics are supported")
            found += jax.tree.leaves(variable.get_value())
        return x_btd, jnp.stack(found) if found else None

    return apply


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What each of the R M + S - 1 iterations does, known when tracing (numpy arrays)."""

    stages: int
    microbatches: int
    repeats: int

    @property
    def items(self) -> int:  # (micro-batch, round) pairs each stage works through
        return self.repeats * self.microbatches

    def item_ts(self) -> np.ndarray:
        """[iterations, S]: the item stage s works on at iteration t (t - s; outside [0, R M): idle)."""
        iterations = self.items + self.stages - 1
        return np.arange(iterations)[:, None] - np.arange(self.stages)[None, :]

    def steps(self):
        """Per iteration: load (stage 0 takes a new item), its queue slot, each stage's round and
        micro-batch, store (an item left the last stage) and its queue slot."""
        item_ts, m = self.item_ts(), self.microbatches
        t = item_ts[:, 0]
        done = t - (self.stages - 1)  # the item leaving the last stage at the end of iteration t
        round_ts = np.clip(item_ts // m, 0, self.repeats - 1)
        as_int = lambda a: jnp.asarray(a, jnp.int32)  # noqa: E731
        return (
            jnp.asarray(t < self.items),
            as_int(t % m),
            as_int(round_ts),
            as_int(item_ts % m),
            jnp.asarray((done >= 0) & (done < self.items)),
            as_int(done % m),
        )

    def balance_losses(self, statistics_ts):
        """Balance losses [L, moe layers] from the per-iteration statistics [iterations, S, C, k, 2, E]:
        the statistics of each layer averaged over its M micro-batches, then E sum_e f_e P_e."""
        if statistics_ts is None:
            return None
        item_ts = self.item_ts()
        busy_ts = (item_ts >= 0) & (item_ts < self.items)
        # weight of iteration t's statistics in stage s's round r: 1 / M when busy with round r
        round_ts = np.clip(item_ts // self.microbatches, 0, self.repeats - 1)
        weights_tsr = busy_ts[:, :, None] * (round_ts[:, :, None] == np.arange(self.repeats)) / self.microbatches
        mean_src = jnp.einsum("tsr,tsc...->src...", jnp.asarray(weights_tsr, jnp.float32), statistics_ts)
        experts = mean_src.shape[-1]
        losses_src = experts * jnp.sum(mean_src[..., 0, :] * mean_src[..., 1, :], axis=-1)
        return losses_src.swapaxes(0, 1).reshape(-1, *losses_src.shape[3:])  # layer (r S + s) C + c
