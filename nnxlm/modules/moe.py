"""Mixture-of-experts feed-forward layer (Mixtral, Qwen 3 MoE, DeepSeek-V3): a drop-in for GatedMLP.

Each token is sent to `num_experts_per_token` (k) of `num_experts` (E) gated MLPs, chosen by a
router, and gets the weighted sum of their outputs (plus, for DeepSeek, always-on shared experts).
Dropless: every token is processed by all of its k experts; there is no capacity and nothing is
dropped.

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
  dense   (default) every expert runs on every token and a [tokens, experts] combine matrix,
          zero outside each token's top k, weights the results. Simple, exact, static shapes, one
          compile; it costs num_experts / k times the expert FLOPs of a sparse dispatch (E = 8,
          k = 2: 4x; DeepSeek-V3's E = 256, k = 8: 32x), so it suits tests, CPU and few experts.
  sorted  the k token-slots of every token are sorted by expert and each expert multiplies only its
          own contiguous rows with jax.lax.ragged_dot (grouped matmul), then the results are
          unsorted and summed per token: the FLOPs of k experts per token, with static shapes.

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

import jax
import jax.numpy as jnp
from flax import nnx

from nnxlm.modules.dense import Dense, ExpertDense, fold_key
from nnxlm.modules.mlp import ACTIVATIONS, GatedMLP

ROUTERS = ("softmax", "sigmoid")
DISPATCHES = ("dense", "sorted")


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
      dispatch: "dense" or "sorted" (see the module docstring); the same numbers either way.
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
        dispatch: str = "dense",
        dtype="float32",
        param_dtype="float32",
        rngs: nnx.Rngs,
    ):
        _check(
            num_experts, num_experts_per_token, activation, router, num_shared_experts, shared_hidden_dim,
            num_groups, num_groups_per_token, dispatch,
        )  # fmt: skip
        self.num_experts, self.num_experts_per_token = num_experts, num_experts_per_token
        self.activation, self.router_type, self.dispatch = activation, router, dispatch
        self.normalize_top_k, self.routed_scaling_factor = normalize_top_k, float(routed_scaling_factor)
        self.num_groups, self.num_groups_per_token = num_groups, num_groups_per_token
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
        x_nd = x_btd.astype(self.dtype).reshape(batch * length, d_model)
        weights_nk, experts_nk, probs_ne = self.route(x_nd)
        if hasattr(self, "__captures__"):  # only under nnx.capture: flax 0.12 would otherwise keep
            # appending the loss to the module's own state on every call (inference included)
            self.sow(nnx.Intermediate, "moe_aux_loss", load_balancing_loss(experts_nk, probs_ne, self.num_experts))
        keys = [fold_key(dropout_key, i) for i in range(4)]
        if self.dispatch == "dense":
            y_nd = self._dense(x_nd, weights_nk, experts_nk, keys)
        else:
            y_nd = self._sorted(x_nd, weights_nk, experts_nk, keys)
        y_btd = y_nd.reshape(batch, length, d_model)
        if self.shared is not None:
            y_btd = y_btd + self.shared(x_btd, keys[3])
        return y_btd

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

    def _dense(self, x_nd, weights_nk, experts_nk, keys):
        """All experts on all tokens, weighted by a combine matrix that is zero outside the top k."""
        one_hot_nke = jax.nn.one_hot(experts_nk, self.num_experts, dtype=jnp.float32)
        combine_ne = jnp.einsum("nk,nke->ne", weights_nk, one_hot_nke).astype(self.dtype)
        gate_nef, up_nef = self.gate.all(x_nd, keys[0]), self.up.all(x_nd, keys[1])
        # weighting the hidden units before the (linear) down projection lets one matmul contract
        # experts and hidden units together: [n, E*F] x [E*F, embed]
        hidden_nef = ACTIVATIONS[self.activation](gate_nef) * up_nef * combine_ne[:, :, None]
        return self.down.combine(hidden_nef, keys[2])

    def _sorted(self, x_nd, weights_nk, experts_nk, keys):
        """Token-slots sorted by expert; one grouped matmul (ragged_dot) per projection."""
        n, k = experts_nk.shape
        experts_s = experts_nk.reshape(n * k)
        order_s = jnp.argsort(experts_s, stable=True)  # slot s of the sorted list is slot order_s[s]
        x_sd = x_nd[order_s // k]
        group_sizes = jnp.bincount(experts_s, length=self.num_experts).astype(jnp.int32)
        gate_sf, up_sf = self.gate.grouped(x_sd, group_sizes, keys[0]), self.up.grouped(x_sd, group_sizes, keys[1])
        y_sd = self.down.grouped(ACTIVATIONS[self.activation](gate_sf) * up_sf, group_sizes, keys[2])
        unsorted_sd = jnp.zeros_like(y_sd).at[order_s].set(y_sd)  # back to token-major slot order
        weights_nk = weights_nk.astype(self.dtype)
        return jnp.einsum("nkd,nk->nd", unsorted_sd.reshape(n, k, -1), weights_nk)


def load_balancing_loss(experts_nk: jax.Array, probs_ne: jax.Array, num_experts: int) -> jax.Array:
    """num_experts * sum_e f_e * P_e: f_e the fraction of token-slots sent to expert e, P_e the mean
    router probability of e over tokens. A float32 scalar; gradients flow through P only."""
    slots_e = jnp.sum(jax.nn.one_hot(experts_nk, num_experts, dtype=jnp.float32), axis=(0, 1))
    fraction_e = slots_e / experts_nk.size
    return num_experts * jnp.sum(fraction_e * jnp.mean(probs_ne.astype(jnp.float32), axis=0))


def _check(
    num_experts, k, activation, router, num_shared_experts, shared_hidden_dim, num_groups, groups_per_token, dispatch
):
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown MoE activation {activation!r}: use one of {sorted(ACTIVATIONS)}")
    if router not in ROUTERS:
        raise ValueError(f"unknown MoE router {router!r}: use one of {list(ROUTERS)}")
    if dispatch not in DISPATCHES:
        raise ValueError(f"unknown MoE dispatch {dispatch!r}: use one of {list(DISPATCHES)}")
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
