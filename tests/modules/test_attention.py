import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxlm.modules import Attention
from nnxlm.modules.rope import apply_rope


def reference_multi_head_attention(attention, x_btd):
    """Textbook causal multi-head attention with the same weights (no GQA, no packing)."""
    q = jnp.einsum("btd,dnh->bnth", x_btd, attention.q_proj.kernel[...])
    k = jnp.einsum("btd,dnh->bnth", x_btd, attention.k_proj.kernel[...])
    v = jnp.einsum("btd,dnh->bnth", x_btd, attention.v_proj.kernel[...])
    positions = jnp.arange(x_btd.shape[1])[None]
    q = apply_rope(q.transpose(0, 2, 1, 3), positions, attention.rope_theta).transpose(0, 2, 1, 3)
    k = apply_rope(k.transpose(0, 2, 1, 3), positions, attention.rope_theta).transpose(0, 2, 1, 3)
    scores = jnp.einsum("bnth,bnsh->bnts", q, k) / np.sqrt(attention.head_dim)
    causal = np.tril(np.ones((x_btd.shape[1],) * 2, bool))
    weights = jax.nn.softmax(jnp.where(causal, scores, -np.inf), axis=-1)
    out = jnp.einsum("bnts,bnsh->btnh", weights, v)
    return jnp.einsum("btnh,nhd->btd", out, attention.o_proj.kernel[...])


def test_gqa_with_as_many_kv_heads_as_heads_is_multi_head_attention():
    attention = Attention(32, num_heads=4, num_kv_heads=4, head_dim=8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 9, 32))
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    out = attention(x, positions, jnp.ones((2, 9), jnp.int32))
    np.testing.assert_allclose(out, reference_multi_head_attention(attention, x), atol=1e-5, rtol=1e-5)


def test_gqa_equals_multi_head_attention_with_repeated_kv_heads():
    gqa = Attention(32, num_heads=6, num_kv_heads=2, head_dim=12, rngs=nnx.Rngs(0))
    mha = Attention(32, num_heads=6, num_kv_heads=6, head_dim=12, rngs=nnx.Rngs(1))
    mha.q_proj.kernel[...], mha.o_proj.kernel[...] = gqa.q_proj.kernel[...], gqa.o_proj.kernel[...]
    # query head n uses kv head n // (num_heads / num_kv_heads)
    mha.k_proj.kernel[...] = jnp.repeat(gqa.k_proj.kernel[...], 3, axis=1)
    mha.v_proj.kernel[...] = jnp.repeat(gqa.v_proj.kernel[...], 3, axis=1)
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


def _inputs(length=10, batch=2, seed=7):
    x = jax.random.normal(jax.random.key(seed), (batch, length, 32))
    return x, jnp.broadcast_to(jnp.arange(length), (batch, length)), jnp.ones((batch, length), jnp.int32)


def _twin(**options):
    """An Attention with options and the plain one holding the same projection weights."""
    plain = Attention(32, num_heads=4, num_kv_heads=2, head_dim=12, rngs=nnx.Rngs(0))
    other = Attention(32, num_heads=4, num_kv_heads=2, head_dim=12, **options, rngs=nnx.Rngs(0))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(other, name).kernel[...] = getattr(plain, name).kernel[...]
    return plain, other


def test_default_options_keep_the_parameter_set():
    attention = Attention(32, num_heads=4, num_kv_heads=2, head_dim=12, rngs=nnx.Rngs(0))
    assert sorted(nnx.to_pure_dict(nnx.state(attention, nnx.Param))) == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_zero_qkv_biases_equal_no_bias_and_biases_shift_the_projections():
    plain, biased = _twin(qkv_bias=True)
    assert biased.q_bias.shape == (4, 12) and biased.k_bias.shape == biased.v_bias.shape == (2, 12)
    assert biased.q_bias.get_metadata()["logical_axes"] == ("heads", "head_dim")
    assert biased.k_bias.get_metadata()["logical_axes"] == ("kv_heads", "head_dim")
    x, positions, segments = _inputs()
    np.testing.assert_allclose(biased(x, positions, segments), plain(x, positions, segments), atol=1e-6)
    # a value bias b adds o_proj(b) to every output (attention weights sum to 1)
    biased.v_bias[...] = jax.random.normal(jax.random.key(3), (2, 12))
    shift = jnp.einsum("nh,nhd->d", jnp.repeat(biased.v_bias[...], 2, axis=0), biased.o_proj.kernel[...])
    np.testing.assert_allclose(biased(x, positions, segments), plain(x, positions, segments) + shift, atol=1e-5)


def test_qk_norm_normalises_each_query_and_key_head_before_rope():
    from nnxlm.modules import RMSNorm

    _, normed = _twin(qk_norm=RMSNorm)
    assert normed.q_norm.scale.shape == normed.k_norm.scale.shape == (12,)
    normed.q_norm.scale[...] = jax.random.normal(jax.random.key(4), (12,))
    normed.k_norm.scale[...] = jax.random.normal(jax.random.key(5), (12,))
    x, positions, segments = _inputs()

    def rms_norm(y, scale):
        return y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + 1e-6) * scale

    q = rms_norm(jnp.einsum("btd,dnh->btnh", x, normed.q_proj.kernel[...]), normed.q_norm.scale[...])
    k = rms_norm(jnp.einsum("btd,dnh->btnh", x, normed.k_proj.kernel[...]), normed.k_norm.scale[...])
    v = jnp.einsum("btd,dnh->btnh", x, normed.v_proj.kernel[...])
    q, k = apply_rope(q, positions, normed.rope_theta), apply_rope(k, positions, normed.rope_theta)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    expected = jnp.einsum("btnh,nhd->btd", out, normed.o_proj.kernel[...])
    np.testing.assert_allclose(normed(x, positions, segments), expected, atol=1e-5, rtol=1e-5)


def test_a_sliding_window_as_long_as_the_row_is_full_attention_and_a_shorter_one_is_not():
    plain, windowed = _twin(sliding_window=10)
    x, positions, segments = _inputs(length=10)
    np.testing.assert_allclose(windowed(x, positions, segments), plain(x, positions, segments), atol=1e-6)
    _, short = _twin(sliding_window=4)
    out = short(x, positions, segments)
    np.testing.assert_allclose(out[:, :4], plain(x, positions, segments)[:, :4], atol=1e-5)  # within the window
    assert not np.allclose(out[:, 4:], plain(x, positions, segments)[:, 4:], atol=1e-3)
    # token t sees exactly tokens t-3..t: equal to attention over that slice alone (positions shifted)
    t = 8
    alone = short(x[:, t - 3 : t + 1], positions[:, t - 3 : t + 1], segments[:, t - 3 : t + 1])
    np.testing.assert_allclose(out[:, t], alone[:, -1], atol=1e-5)


def test_sliding_window_positions_restart_in_each_packed_document():
    _, short = _twin(sliding_window=3)
    x, _, _ = _inputs(length=10, batch=1)
    positions = jnp.array([list(range(6)) + list(range(4))])
    segments = jnp.array([[1] * 6 + [2] * 4])
    packed = short(x, positions, segments)
    np.testing.assert_allclose(packed[:, :6], short(x[:, :6], positions[:, :6], segments[:, :6]), atol=1e-5)
    np.testing.assert_allclose(packed[:, 6:], short(x[:, 6:], positions[:, 6:], segments[:, 6:]), atol=1e-5)


def test_rope_scaling_reaches_the_attention():
    scaling = {"type": "linear", "factor": 4.0}
    _, scaled = _twin(rope_scaling=scaling)
    plain, _ = _twin()
    assert scaled.rope_scaling == scaling
    x, positions, segments = _inputs()
    # linear scaling by 4 is rope at a quarter of the positions
    np.testing.assert_allclose(scaled(x, positions * 4, segments), plain(x, positions, segments), atol=1e-4, rtol=1e-4)
