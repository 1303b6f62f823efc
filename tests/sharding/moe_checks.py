"""One MoE layer under expert parallelism (shard_map, all-to-all) against one device, on 8 fake CPU
devices: the loss and the gradients of every parameter and of the input. Called from
mesh_runs.py's `meshes` case (one subprocess for every 8-device check); returns {case: {"value":
relative error, "grads": largest relative error, "expert_parallel": whether the layer took the
shard_map path}}. Importing this module records every mesh the shard_map path is traced under
(TRACED), so that the training runs can show they took it too."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from nnxlm.modules import expert_parallel
from nnxlm.modules.moe import MoE
from nnxlm.sharding import activation_sharding, make_mesh, state_shardings

TRACED = []  # "axis=size ... ep=N" of the meshes routed_experts was traced under, N experts' devices
_routed_experts = expert_parallel.routed_experts


def _recording(plan, *args, **kwargs):
    sizes = [f"{axis}={size}" for axis, size in sorted(plan.mesh.shape.items()) if size > 1]
    TRACED.append(" ".join([*sizes, f"ep={plan.ep}"]))
    return _routed_experts(plan, *args, **kwargs)


expert_parallel.routed_experts = _recording

# (mesh, capacity factor, router): the training runs cover expert x data and expert x fsdp x data,
# dropless; here the hidden axis split over tensor inside the shard_map, a capacity with the
# sequences split over a sequence axis (their capacity counted across its devices), and a mesh
# without an expert axis (every device all experts, its own tokens, no exchange)
CASES = {
    "expert=2 tensor=2 data=2": ({"expert": 2, "tensor": 2, "data": 2}, None, "softmax"),
    "expert=2 sequence=2 fsdp=2, capacity 0.75, sigmoid": ({"expert": 2, "sequence": 2, "fsdp": 2}, 0.75, "sigmoid"),
    "fsdp=4 tensor=2, no expert axis": ({"fsdp": 4, "tensor": 2}, None, "softmax"),
}


def _value_and_grads(graphdef, state, x_btd, mesh=None):
    def loss(state, x_btd):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x_btd)))

    if mesh is None:
        return jax.value_and_grad(loss, argnums=(0, 1))(state, x_btd)
    with activation_sharding(mesh):
        return jax.value_and_grad(loss, argnums=(0, 1))(state, x_btd)


def moe_checks() -> dict:
    x_btd = jax.random.normal(jax.random.key(1), (8, 16, 16))
    result, one_device = {}, {}  # one device's figures, computed once a configuration
    for name, (sizes, capacity_factor, router) in CASES.items():
        moe = MoE(
            16,
            num_experts=4,
            num_experts_per_token=2,
            expert_hidden_dim=16,
            router=router,
            capacity_factor=capacity_factor,
            rngs=nnx.Rngs(0),
        )
        if router == "sigmoid":  # a bias that changes the choice
            moe.score_correction_bias[...] = 0.5 * jax.random.normal(jax.random.key(3), (4,))
        graphdef, state = nnx.split(moe)
        if (capacity_factor, router) not in one_device:
            one_device[capacity_factor, router] = jax.jit(functools.partial(_value_and_grads, graphdef))(state, x_btd)
        expected = one_device[capacity_factor, router]
        mesh = make_mesh(sizes)
        traced = len(TRACED)
        sharded = jax.device_put(state, state_shardings(state, mesh))
        got = jax.jit(functools.partial(_value_and_grads, graphdef, mesh=mesh))(sharded, x_btd)
        pairs = zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True)
        errors = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in pairs]
        result[name] = {"value": errors[0], "grads": max(errors[1:]), "expert_parallel": len(TRACED) > traced}
    return result
