"""Ring attention against dense attention on 8 fake CPU devices: values and gradients of q, k and
v. Called from mesh_runs.py's `meshes` case (one subprocess for every 8-device check); returns
{case: [value error, q, k and v gradient errors]} and whether the compiled program passes keys
and values around with collective-permutes instead of gathering them."""

import re

import jax
import jax.numpy as jnp

from nnxlm.modules.ring import ring_attention, use_ring
from nnxlm.sharding import activation_sharding, constrain, make_mesh
from tests.modules.helpers import dense_attention
from tests.modules.test_blockwise import inputs

# (mesh, sharding rules, inputs, window, soft-cap); 32 tokens in blocks of 4 on every device
CASES = {
    "sequence=4: packed, traced window, soft-cap, GQA": (
        {"sequence": 4, "fsdp": 2}, None, dict(packed=True), 5, 2.0
    ),
    "sequence x fsdp ring; heads split over tensor, the one KV head not; latent-attention dims": (
        {"sequence": 2, "fsdp": 2, "tensor": 2}, {"length": ("sequence", "fsdp"), "batch": "data"},
        dict(kv_heads=1, head_dim=12, v_dim=8, packed=True), 7, None,
    ),
}  # fmt: skip


def _loss(out):
    return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))  # every output weighted


def _with_grads(attend, *args):
    return attend(*args), jax.grad(lambda *a: _loss(attend(*a)), argnums=(0, 1, 2))(*args)


def _check(sizes, rules, options, window, softcap) -> tuple[list[float], list[str]]:
    q, k, v, segment_ids, positions = inputs(32, **options)
    scale = q.shape[-1] ** -0.5

    def ring(q, k, v, window):
        q, k, v = (constrain(x, ("batch", "length", None, None)) for x in (q, k, v))
        return ring_attention(
            q, k, v, segment_ids, positions, scale=scale, window=window, softcap=softcap, block_size=4
        )

    with activation_sharding(make_mesh(sizes), rules):
        assert use_ring("ring", *segment_ids.shape)
        traced = None if window is None else jnp.int32(window)
        compiled = jax.jit(lambda *args: _with_grads(ring, *args)).lower(q, k, v, traced).compile()
    out, grads = compiled(q, k, v, traced)
    want, want_grads = _with_grads(
        lambda *a: dense_attention(*a, segment_ids, positions, scale, window, softcap), q, k, v
    )
    errors = [float(jnp.max(jnp.abs(a - b))) for a, b in zip((out, *grads), (want, *want_grads), strict=True)]
    collectives = re.findall(r"\b(all-gather|collective-permute)(?:-start)?\(", compiled.as_text())
    return errors, sorted(set(collectives))


def ring_checks() -> dict:
    result = {}
    for name, case in CASES.items():
        result[name], result[name + " collectives"] = _check(*case)
    return result
