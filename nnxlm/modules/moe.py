"""Mixture-of-experts feed-forward layer (Mixtral, Qwen 3 MoE, DeepSeek-V3): a drop-in for GatedMLP.

Each token is sent to `num_experts_per_token` (k) of `num_experts` (E) gated MLPs, chosen by a
router, and gets the weighted sum of their outputs (plus, for DeepSeek, always-on shared experts).
Dropless by default: every token is processed by all of its k experts.

Routers (the semantics of the Hugging Face reference modules, exactly):
  softmax  Mixtral, Qwen 3 MoE: probabilities = softmax(router logits) over all experts; the top k
           are kept and, when normalize_top_k, renormalised to sum 1 (Qwen's norm_topk_prob).
  sigmoid  DeepSeek-V3: scores = sigmoid(router logits). A non-trainable per-expert bias
           (`score_correction_bias`, HF's e_score_correction_bias, updated outside the gradient by
           the auxiliary-loss-free balancing rule) is added to the scores for *choosing* only:
           experts are split into num_groups groups, each group is scored by the sum of its two
           best biased scores, the num_groups_per_token best groups are kept and the top k experts
           are picked inside them. The weights are the unbiased scores of the chosen experts,
           normalised to sum 1 when normalize_top_k; then multiplied by routed_scaling_factor.

Two ways to compute the same thing (`dispatch`):
  sorted  (default) the k token-slots of every token are laid out by expert and each expert
          multiplies only its own rows (a grouped matmul, nnxlm.modules.grouped: ragged_dot on
          TPU / GPU, tiles of rows on CPU, where ragged_dot computes every expert on every row),
          then each token sums its slots' results: the FLOPs of k experts per token, with static
          shapes. Under a mesh with an `expert` axis > 1 the experts run in parallel, the slots
          exchanged by all-to-all (nnxlm.modules.expert_parallel).
  dense   every expert runs on every token and a [tokens, experts] combine matrix, zero outside
          each token's top k, weights the results. Simple, exact, one compile; it costs E / k times
          the expert FLOPs of the sorted dispatch (E = 8, k = 2: 4x; DeepSeek-V3's E = 256,
          k = 8: 32x). A reference, and for few experts.

Capacity (`capacity_factor` c; None, the default: dropless). Capacity is counted per sequence:
each expert takes at most C = min(length, ceil(c * length * k / E)) of one sequence's token-slots,
first come first served in token order (the slots of token t before those of token t + 1; a
token's k slots go to k different experts). Slots beyond an expert's C are dropped: they
contribute zero, the other slots keep their weights (no renormalisation) and the token keeps its
residual (a token all of whose slots are dropped passes through the layer unchanged, plus the
shared experts). Counting per sequence, not per batch or per device, makes the result the same
on any mesh (MaxText's dropping MoE counts per sequence too, rounding as int(ceil(length k / E)
c)); c >= E / k drops nothing. The sorted dispatch then computes fixed [E, batch * C] buffers
(bounded memory, the unused rows computed as zeros); the dense dispatch zeroes the dropped slots'
weights. The load-balancing loss counts the routing before any drop.

Load balancing: every call records the Switch Transformer / Mixtral auxiliary loss
    aux = E * sum_e f_e * P_e
with f_e the fraction of the batch's token-slots (tokens x k) routed to expert e and P_e the mean
over tokens of the router probability of e (sigmoid routers: the scores normalised per token, as
DeepSeek-V3's balance loss does). It is 1 when routing is uniform and grows to E when one expert
takes everything. (transformers' load_balancing_loss_func divides the counts by tokens instead of
token-slots, which gives k times this value.) Padding tokens are counted like the others.
The loss is recorded as `self.sow(nnx.Intermediate, "moe_aux_loss", aux)`. Collect it inside the
differentiated loss function, either with `logits, sown = nnx.capture(model, nnx.Intermediate)(ids)`
(flax's current route: nothing is stored on the model) or by calling the model and then
`nnx.pop(model, nnx.Intermediate)` (flax 0.12.8 warns that sow outside capture is deprecated). A
training step must do one of them: uncollected, the sown variable stays on the model and changes
the structure of its state. Under the Transformer's nnx.scan over layers the value comes out as one
array with a leading layers axis; with unscanned layers, one scalar a layer.
"""

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from flax import nnx

from nnxlm.modules import expert_parallel
from nnxlm.modules.dense import Dense, ExpertDense, fold_key
from nnxlm.modules.grouped import capacity_layout, sorted_layout
from nnxlm.modules.mlp import ACTIVATIONS, GatedMLP

ROUTERS = ("softmax", "sigmoid")
DISPATCHES = ("sorted", "dense")


class RoutingBias(nnx.Variable):
    """A per-expert bias used only to choose experts (DeepSeek-V3's e_score_correction_bias).

    Not an nnx.Param, so an optimizer built with wrt=nnx.Param leaves it alone; it is part of the
    model state (checkpointed, sharded by its logical axes) and is updated by a separate rule."""


class MoE(nnx.Module):
    """x [batch, length, embed] -> [batch, length, embed] through k of num_experts gated MLPs.

    Args:
      d_model: width of the residual stream (passed by the block).
      num_experts: routed experts E.
      num_experts_per_token: experts k each token is sent to.
      expert_hidden_dim: hidden width of each routed expert (HF: intermediate_size for Mixtral,
        moe_intermediate_size for Qwen 3 MoE and DeepSeek-V3).
      activation: of the gated MLPs, one of mlp.ACTIVATIONS.
      router: "softmax" (Mixtral, Qwen 3 MoE) or "sigmoid" (DeepSeek-V3); see the module docstring.
      normalize_top_k: renormalise the k chosen weights to sum 1 (Mixtral: always; Qwen 3 MoE and
        DeepSeek-V3: norm_topk_prob).
      num_shared_experts: DeepSeek's always-on experts, computed as one GatedMLP of
        shared_hidden_dim (default num_shared_experts * expert_hidden_dim) added to the output.
      routed_scaling_factor: multiplies the routed experts' weights (DeepSeek-V3: 2.5).
      num_groups, num_groups_per_token: group-limited routing of the sigmoid router (DeepSeek-V3:
        n_group=8, topk_group=4); 1 and 1 turn it off.
      router_bias: a trainable bias on the router logits (off in all three families).
      dispatch: "sorted" or "dense" (see the module docstring); the same numbers either way.
      capacity_factor: None (dropless) or c > 0: each expert takes at most
        min(length, ceil(c * length * k / E)) token-slots of each sequence (module docstring).
    """

    def __init__(
        self,
        d_model: int,
        *,
        num_experts: int,
        num_experts_per_token: int,
        expert_hidden_dim: int,
        activation: str = "silu",
        router: str = "softmax",
        normalize_top_k: bool = True,
        num_shared_experts: int = 0,
        shared_hidden_dim: int | None = None,
        routed_scaling_factor: float = 1.0,
        num_groups: int = 1,
        num_groups_per_token: int = 1,
        router_bias: bool = False,
        dispatch: str = "sorted",
        capacity_factor: float | None = None,
        dtype="float32",
        param_dtype="float32",
        rngs: nnx.Rngs,
    ):
        _check(
            num_experts, num_experts_per_token, activation, router, num_shared_experts, shared_hidden_dim,
            num_groups, num_groups_per_token, dispatch, capacity_factor,
        )  # fmt: skip
        self.num_experts, self.num_experts_per_token = num_experts, num_experts_per_token
        self.activation, self.router_type, self.dispatch = activation, router, dispatch
        self.normalize_top_k, self.routed_scaling_factor = normalize_top_k, float(routed_scaling_factor)
        self.num_groups, self.num_groups_per_token = num_groups, num_groups_per_token
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.dtype = jnp.dtype(dtype)

        e, d, f = num_experts, d_model, expert_hidden_dim
        self.router = Dense(d, e, logical_axes=("embed", "expert"), param_dtype=param_dtype, rngs=rngs)
        if router_bias:
            self.router_bias = nnx.Param(jnp.zeros((e,), param_dtype), logical_axes=("expert",))
        else:
            self.router_bias = None
        if router == "sigmoid":
            self.score_correction_bias = RoutingBias(jnp.zeros((e,), jnp.float32), logical_axes=("expert",))
        else:
            self.score_correction_bias = None
        axes_in, axes_out = ("expert", "embed", "mlp"), ("expert", "mlp", "embed")
        self.gate = ExpertDense(e, d, f, logical_axes=axes_in, param_dtype=param_dtype, rngs=rngs)
        self.up = ExpertDense(e, d, f, logical_axes=axes_in, param_dtype=param_dtype, rngs=rngs)
        self.down = ExpertDense(e, f, d, logical_axes=axes_out, param_dtype=param_dtype, rngs=rngs)
        if num_shared_experts:
            hidden = shared_hidden_dim or num_shared_experts * expert_hidden_dim
            self.shared = GatedMLP(
                d_model, hidden_dim=hidden, activation=activation, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )
        else:
            self.shared = None

    def __call__(self, x_btd: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """dropout_key: of the expert projections' LoRA dropout (training)."""
        batch, length, d_model = x_btd.shape
        k = self.num_experts_per_token
        x_nd = x_btd.astype(self.dtype).reshape(batch * length, d_model)
        weights_nk, experts_nk, probs_ne = self.route(x_nd)
        in_stage = _IN_PIPELINE_STAGE.get()
        if hasattr(self, "__captures__") and in_stage:  # one micro-batch of the whole batch
            statistics = balance_statistics(experts_nk, probs_ne, self.num_experts)
            self.sow(nnx.Intermediate, "moe_balance_statistics", statistics)
        elif hasattr(self, "__captures__"):  # only under nnx.capture: flax 0.12 would otherwise keep
            # appending the loss to the module's own state on every call (inference included)
            self.sow(nnx.Intermediate, "moe_aux_loss", load_balancing_loss(experts_nk, probs_ne, self.num_experts))
        keys = [fold_key(dropout_key, i) for i in range(4)]
        rows_nk = None  # with a capacity: each slot's place among its sequence's slots of its expert
        if self.capacity_factor is not None:
            rows_nk = rows_in_expert(experts_nk.reshape(batch, length * k)).reshape(batch * length, k)
        plan = None
        if self.dispatch == "sorted" and not self._adapter_dropout(dropout_key) and not in_stage:
            plan = expert_parallel.plan(self.gate.kernel, x_btd.shape)
        if self.dispatch == "dense":
            y_nd = self._dense(x_nd, weights_nk, experts_nk, rows_nk, length, keys)
        elif plan is not None:
            split = (batch, length, k)
            y_nd = expert_parallel.routed_experts(
                plan,
                x_nd.reshape(batch, length, d_model),
                weights_nk.astype(self.dtype).reshape(split),
                experts_nk.reshape(split),
                None if rows_nk is None else rows_nk.reshape(split),
                self._expert_kernels(),
                activation=self.activation,
                capacity=None if rows_nk is None else self.capacity(length),
            ).reshape(batch * length, d_model)
        else:
            y_nd = self._sorted(x_nd, weights_nk, experts_nk, rows_nk, batch, length, keys)
        y_btd = y_nd.reshape(batch, length, d_model)
        if self.shared is not None:
            y_btd = y_btd + self.shared(x_btd, keys[3])
        return y_btd

    def capacity(self, length: int) -> int:
        """C: the token-slots of one sequence of `length` tokens each expert takes at most."""
        wanted = math.ceil(self.capacity_factor * length * self.num_experts_per_token / self.num_experts)
        return min(length, wanted)  # k distinct experts a token: no expert gets more than length slots

    def route(self, x_nd: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Tokens [n, embed] -> (weights [n, k] float32, expert ids [n, k] int32, probabilities [n, E]).

        The probabilities are what the load-balancing loss averages (softmax, or the sigmoid scores
        normalised per token). The router runs in float32, as in the reference implementations.
        """
        logits_ne = self.router(x_nd.astype(jnp.float32))
        if self.router_bias is not None:
            logits_ne = logits_ne + self.router_bias[...].astype(jnp.float32)
        k = self.num_experts_per_token
        if self.router_type == "softmax":
            probs_ne = jax.nn.softmax(logits_ne, axis=-1)
            weights_nk, experts_nk = jax.lax.top_k(probs_ne, k)
            if self.normalize_top_k:
                weights_nk = weights_nk / jnp.sum(weights_nk, axis=-1, keepdims=True)
        else:
            scores_ne = jax.nn.sigmoid(logits_ne)
            choice_ne = scores_ne + jax.lax.stop_gradient(self.score_correction_bias[...].astype(jnp.float32))
            if self.num_groups > 1:
                choice_ne = self._keep_best_groups(choice_ne)
            _, experts_nk = jax.lax.top_k(choice_ne, k)
            weights_nk = jnp.take_along_axis(scores_ne, experts_nk, axis=-1)
            if self.normalize_top_k:
                weights_nk = weights_nk / (jnp.sum(weights_nk, axis=-1, keepdims=True) + 1e-20)
            probs_ne = scores_ne / jnp.sum(scores_ne, axis=-1, keepdims=True)
        return weights_nk * self.routed_scaling_factor, experts_nk, probs_ne

    def _keep_best_groups(self, choice_ne: jax.Array) -> jax.Array:
        """-inf outside the num_groups_per_token groups whose two best scores sum highest."""
        n, groups = choice_ne.shape[0], self.num_groups
        choice_ngs = choice_ne.reshape(n, groups, self.num_experts // groups)
        best_ngs, _ = jax.lax.top_k(choice_ngs, min(2, choice_ngs.shape[-1]))
        _, kept_groups = jax.lax.top_k(jnp.sum(best_ngs, axis=-1), self.num_groups_per_token)
        kept_ng = jnp.any(kept_groups[:, :, None] == jnp.arange(groups), axis=1)
        return jnp.where(kept_ng[:, :, None], choice_ngs, -jnp.inf).reshape(n, self.num_experts)

    def _dense(self, x_nd, weights_nk, experts_nk, rows_nk, length, keys):
        """All experts on all tokens, weighted by a combine matrix that is zero outside the top k
        (and, with a capacity, at the dropped slots)."""
        if rows_nk is not None:
            weights_nk = jnp.where(rows_nk < self.capacity(length), weights_nk, 0.0)
        one_hot_nke = jax.nn.one_hot(experts_nk, self.num_experts, dtype=jnp.float32)
        combine_ne = jnp.einsum("nk,nke->ne", weights_nk, one_hot_nke).astype(self.dtype)
        gate_nef, up_nef = self.gate.all(x_nd, keys[0]), self.up.all(x_nd, keys[1])
        # weighting the hidden units before the (linear) down projection lets one matmul contract
        # experts and hidden units together: [n, E*F] x [E*F, embed]
        hidden_nef = ACTIVATIONS[self.activation](gate_nef) * up_nef * combine_ne[:, :, None]
        return self.down.combine(hidden_nef, keys[2])

    def _sorted(self, x_nd, weights_nk, experts_nk, rows_nk, batch, length, keys):
        """Token-slots laid out by expert (dropless: sorted; with a capacity: [E, batch * C] rows);
        one grouped matmul per projection."""
        n, k = experts_nk.shape
        experts_s = experts_nk.reshape(n * k)
        if rows_nk is None:
            layout = sorted_layout(experts_s, self.num_experts)
        else:  # sequence b's slots of expert e take rows b C ... b C + C - 1 of e's batch * C rows
            capacity, rows_s = self.capacity(length), rows_nk.reshape(n * k)
            sequence_s = jnp.arange(n * k) // (length * k)
            rows_s = jnp.where(rows_s < capacity, sequence_s * capacity + rows_s, batch * capacity)  # else dropped
            layout = capacity_layout(experts_s, rows_s, self.num_experts, batch * capacity)
        x_rd = layout.scatter(x_nd[jnp.arange(n * k) // k])
        gate_rf, up_rf = self.gate.grouped(x_rd, layout, keys[0]), self.up.grouped(x_rd, layout, keys[1])
        y_rd = self.down.grouped(ACTIVATIONS[self.activation](gate_rf) * up_rf, layout, keys[2])
        y_sd = layout.gather(y_rd)  # back to token-major slot order; dropped slots: zeros
        return jnp.einsum("nkd,nk->nd", y_sd.reshape(n, k, -1), weights_nk.astype(self.dtype))

    def _adapter_dropout(self, dropout_key) -> bool:
        """Whether an expert projection's LoRA adapter applies dropout in this call."""
        adapters = (p._lora() for p in (self.gate, self.up, self.down))
        return dropout_key is not None and any(a is not None and a.dropout > 0 for a in adapters)

    def _expert_kernels(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """gate, up and down as float arrays in self.dtype, an active LoRA adapter merged in
        (W + scale A B: the same function and gradients, without dropout)."""
        from nnxlm.modules.lora import lora_delta

        kernels = []
        for projection in (self.gate, self.up, self.down):
            kernel = projection.float_kernel(jnp.float32 if projection._lora() is not None else self.dtype)
            if projection._lora() is not None:
                kernel = kernel + lora_delta(projection)
            kernels.append(kernel.astype(self.dtype))
        return tuple(kernels)


def rows_in_expert(experts_bs: jax.Array) -> jax.Array:
    """For slots [batch, slots] of expert ids in token order: how many earlier slots of the same
    sequence went to the same expert (the slot's place in that expert's queue), [batch, slots]."""
    order_bs = jnp.argsort(experts_bs, axis=-1, stable=True)  # stable: token order within an expert
    sorted_bs = jnp.take_along_axis(experts_bs, order_bs, axis=-1)
    slots = jnp.arange(experts_bs.shape[-1], dtype=order_bs.dtype)
    rank_bs = jnp.zeros_like(order_bs).at[jnp.arange(experts_bs.shape[0])[:, None], order_bs].set(slots)
    first_bs = jax.vmap(jnp.searchsorted)(sorted_bs, experts_bs)  # where the slot's expert starts
    return (rank_bs - first_bs).astype(jnp.int32)


def load_balancing_loss(experts_nk: jax.Array, probs_ne: jax.Array, num_experts: int) -> jax.Array:
    """num_experts * sum_e f_e * P_e: f_e the fraction of token-slots sent to expert e, P_e the mean
    router probability of e over tokens. A float32 scalar; gradients flow through P only."""
    fraction_e, mean_probs_e = balance_statistics(experts_nk, probs_ne, num_experts)
    return num_experts * jnp.sum(fraction_e * mean_probs_e)


def balance_statistics(experts_nk: jax.Array, probs_ne: jax.Array, num_experts: int) -> jax.Array:
    """float32 [2, num_experts]: f_e and P_e of load_balancing_loss. Means over equal numbers of
    tokens, so that the statistics of equal micro-batches average to the whole batch's."""
    slots_e = jnp.sum(jax.nn.one_hot(experts_nk, num_experts, dtype=jnp.float32), axis=(0, 1))
    return jnp.stack([slots_e / experts_nk.size, jnp.mean(probs_ne.astype(jnp.float32), axis=0)])


_IN_PIPELINE_STAGE = contextvars.ContextVar("nnxlm_moe_in_pipeline_stage", default=False)


@contextlib.contextmanager
def in_pipeline_stage():
    """While tracing inside (a stage of nnxlm.modules.pipeline, which runs each layer on
    micro-batches), a captured MoE sows "moe_balance_statistics" (balance_statistics) instead of
    "moe_aux_loss", which the pipeline averages over the micro-batches into the whole batch's
    loss; and the routed experts run as on one device, partitioned by GSPMD: the expert-parallel
    shard_map does not trace under the pipeline's vmap over stages (loops inside it pick up the
    stage axis), so a pipeline mesh takes no expert axis (checked with the recipe)."""
    token = _IN_PIPELINE_STAGE.set(True)
    try:
        yield
    finally:
        _IN_PIPELINE_STAGE.reset(token)


def _check(
    num_experts, k, activation, router, num_shared_experts, shared_hidden_dim, num_groups, groups_per_token, dispatch,
    capacity_factor,
):  # fmt: skip
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown MoE activation {activation!r}: use one of {sorted(ACTIVATIONS)}")
    if router not in ROUTERS:
        raise ValueError(f"unknown MoE router {router!r}: use one of {list(ROUTERS)}")
    if dispatch not in DISPATCHES:
        raise ValueError(f"unknown MoE dispatch {dispatch!r}: use one of {list(DISPATCHES)}")
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"MoE capacity_factor is {capacity_factor!r}: use a number > 0, or None (dropless)")
    if not 1 <= k <= num_experts:
        raise ValueError(f"num_experts_per_token ({k}) must be between 1 and num_experts ({num_experts})")
    if shared_hidden_dim is not None and not num_shared_experts:
        raise ValueError("shared_hidden_dim is set but num_shared_experts is 0: set num_shared_experts too")
    if num_groups == 1 and groups_per_token == 1:
        return
    if router != "sigmoid":
        raise ValueError(f"num_groups={num_groups} (group-limited routing) needs router='sigmoid'")
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"num_experts ({num_experts}) must be a multiple of num_groups ({num_groups})")
    if not 1 <= groups_per_token <= num_groups:
        raise ValueError(f"num_groups_per_token ({groups_per_token}) must be between 1 and num_groups ({num_groups})")
    if k > groups_per_token * (num_experts // num_groups):
        raise ValueError(
            f"num_experts_per_token ({k}) exceeds the experts of {groups_per_token} groups of "
            f"{num_experts // num_groups}: raise num_groups_per_token"
        )
