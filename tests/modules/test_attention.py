import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxlm.modules import Attention
from nnxlm.modules.rope import apply_rope


def reference_multi_head_attention(attention, x_btd):
    """Textbook causal multi-head attention with the same weights (no GQA, no packing)."""
    q = jnp.einsum("btd,dnh->bnth", x_btd, attention.q_proj[...])
    k = jnp.einsum("btd,dnh->bnth", x_btd, attention.k_proj[...])
    v = jnp.einsum("btd,dnh->bnth", x_btd, attention.v_proj[...])
    positions = jnp.arange(x_btd.shape[1])[None]
    q = apply_rope(q.transpose(0, 2, 1, 3), positions, attention.rope_theta).transpose(0, 2, 1, 3)
    k = apply_rope(k.transpose(0, 2, 1, 3), positions, attention.rope_theta).transpose(0, 2, 1, 3)
    scores = jnp.einsum("bnth,bnsh->bnts", q, k) / np.sqrt(attention.head_dim)
    causal = np.tril(np.ones((x_btd.shape[1],) * 2, bool))
    weights = jax.nn.softmax(jnp.where(causal, scores, -np.inf), axis=-1)
    out = jnp.einsum("bnts,bnsh->btnh", weights, v)
    return jnp.einsum("btnh,nhd->btd", out, attention.o_proj[...])


def test_gqa_with_as_many_kv_heads_as_heads_is_multi_head_attention():
    attention = Attention(32, num_heads=4, num_kv_heads=4, head_dim=8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 9, 32))
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    out = attention(x, positions, jnp.ones((2, 9), jnp.int32))
    np.testing.assert_allclose(out, reference_multi_head_attention(attention, x), atol=1e-5, rtol=1e-5)


def test_gqa_equals_multi_head_attention_with_repeated_kv_heads():
    gqa = Attention(32, num_heads=6, num_kv_heads=2, head_dim=12, rngs=nnx.Rngs(0))
    mha = Attention(32, num_heads=6, num_kv_heads=6, head_dim=12, rngs=nnx.Rngs(1))
    mha.q_proj[...], mha.o_proj[...] = gqa.q_proj[...], gqa.o_proj[...]
    # query head n uses kv head n // (num_heads / num_kv_heads)
    mha.k_proj[...] = jnp.repeat(gqa.k_proj[...], 3, axis=1)
    mha.v_proj[...] = jnp.repeat(gqa.v_proj[...], 3, axis=1)
    x = jax.random.normal(jax.random.key(2), (2, 7, 32))
    positions, segments = jnp.broadcast_to(jnp.arange(7), (2, 7)), jnp.ones((2, 7), jnp.int32)
    np.testing.assert_allclose(gqa(x, positions, segments), mha(x, positions, segments), atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    q = jax.random.normal(jax.random.key(3), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(4), (1, 1, 1, 16))

    def score(query_position, key_position):
        rq = apply_rope(q, jnp.array([[query_position]]), 10_000.0)
        rk = apply_rope(k, jnp.array([[key_position]]), 10_000.0)
        return float(jnp.sum(rq * rk))

    assert abs(score(5, 2) - score(105, 102)) < 1e-4
    assert abs(score(5, 2) - score(9, 6)) < 1e-4
    assert abs(score(5, 2) - score(5, 3)) > 1e-3  # a different offset gives a different score


def test_rope_preserves_norms_and_is_identity_at_position_zero():
    x = jax.random.normal(jax.random.key(5), (1, 3, 2, 8))
    np.testing.assert_allclose(apply_rope(x, jnp.zeros((1, 3), jnp.int32), 500.0), x, atol=1e-6)
    rotated = apply_rope(x, jnp.array([[1, 50, 3000]]), 500.0)
    np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
