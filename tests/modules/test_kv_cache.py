"""The KV cache: cached decoding gives the logits of the full forward pass, whatever the layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nnxlm.modules import KVCache
from nnxlm.sharding.rules import DEFAULT_RULES
from tests.modules.helpers import tiny_model


def gqa_model(scan_layers, num_kv_heads=2):
    model = tiny_model(scan_layers)  # 4 query heads
    attention = model.layers.attention if scan_layers else model.layers[0].attention
    assert attention.num_kv_heads == 2 and attention.num_heads == 4
    if num_kv_heads != 2:
        import fiddle as fdl

        from nnxlm.recipes import models

        cfg = models.llama_tiny(vocab_size=97)
        cfg.scan_layers = scan_layers
        cfg.block.attention.num_kv_heads = num_kv_heads
        model = fdl.build(cfg)(rngs=nnx.Rngs(0))
    return model


@pytest.mark.parametrize(
    "scan_layers, stacked, num_kv_heads",
    [(True, True, 2), (True, False, 1), (False, False, 2), (False, True, 4)],  # GQA, MQA, GQA, MHA
)
def test_cached_decoding_gives_the_full_forward_logits_at_every_position(scan_layers, stacked, num_kv_heads):
    model = gqa_model(scan_layers, num_kv_heads)
    ids = jax.random.randint(jax.random.key(0), (2, 11), 0, 97)
    full = model(ids)
    graphdef, state = nnx.split(model)
    call = jax.jit(lambda state, ids, cache: nnx.merge(graphdef, state)(ids, cache=cache))  # 2 shapes
    cache = model.init_cache(2, 16, stacked=stacked)
    logits, cache = call(state, ids[:, :4], cache)  # a prefill of 4 tokens, then one at a time
    pieces = [logits]
    for t in range(4, 11):
        logits, cache = call(state, ids[:, t : t + 1], cache)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5, rtol=1e-5)
    assert int(cache.index) == 11
    np.testing.assert_array_equal(cache.segment_ids, np.array([[1] * 11 + [0] * 5] * 2))


def test_a_left_padded_prompt_decodes_as_the_prompt_alone():
    model = tiny_model(False)
    prompt = jnp.array([[7, 3, 9]])
    ids = jnp.concatenate([jnp.zeros((1, 5), jnp.int32), prompt, jnp.array([[12, 40]])], axis=1)
    segment_ids = jnp.array([[0] * 5 + [1] * 5])  # 0 marks padding: no real token attends to it
    positions = jnp.array([[0] * 5 + list(range(5))])
    graphdef, state = nnx.split(model)
    call = jax.jit(lambda state, cache, *rows: nnx.merge(graphdef, state)(*rows, cache=cache))
    cache = model.init_cache(1, 12)
    logits, cache = call(state, cache, ids[:, :8], positions[:, :8], segment_ids[:, :8])
    step_9, cache = call(state, cache, ids[:, 8:9], positions[:, 8:9], segment_ids[:, 8:9])
    step_10, _ = call(state, cache, ids[:, 9:], positions[:, 9:], segment_ids[:, 9:])
    alone = model(ids[:, 5:])
    got = jnp.concatenate([logits[:, 5:], step_9, step_10], axis=1)
    np.testing.assert_allclose(got, alone, atol=1e-5, rtol=1e-5)


def test_unstacked_layers_compute_the_same_numbers():
    model = tiny_model(True)
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, 97)
    before = model(ids)
    model.unstack_layers()
    assert not model.scan_layers and len(model.layers) == 4
    np.testing.assert_allclose(model(ids), before, atol=1e-5, rtol=1e-5)


def test_cache_layout_and_logical_axes():
    stacked = tiny_model(True).init_cache(3, 32)
    assert stacked.k.shape == stacked.v.shape == (4, 3, 2, 32, 16)  # layers, batch, kv_heads, length, head_dim
    assert stacked.segment_ids.shape == (3, 32) and stacked.index.shape == ()
    axes = stacked.logical_axes()
    assert axes.k == ("layers", "batch", "kv_heads", "length", "head_dim") and axes.segment_ids == ("batch", "length")
    listed = tiny_model(False).init_cache(3, 32)
    assert isinstance(listed.k, tuple) and len(listed.k) == 4 and listed.k[0].shape == (3, 2, 32, 16)
    assert listed.logical_axes().v == (("batch", "kv_heads", "length", "head_dim"),) * 4
    for name in axes.k:
        assert name in DEFAULT_RULES  # shardable by the one table
    assert isinstance(jax.tree.map(lambda x: x, listed), KVCache)  # a pytree: jit, scan and while_loop carry it


ATTENTION_OPTIONS = {
    "qkv_bias": dict(qkv_bias=True),
    "qk_norm": dict(qk_norm="rmsnorm"),
    "rope_scaling": dict(
        rope_scaling={
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
    ),
    "sliding_window": dict(sliding_window=3),
    "all": dict(qkv_bias=True, qk_norm="rmsnorm", sliding_window=4),
}


def option_model(scan_layers=True, **options):
    """The tiny GQA model with attention options set and every parameter moved off its init value
    (zero biases and unit norm scales would hide a mistake)."""
    import fiddle as fdl

    from nnxlm.modules import RMSNorm
    from nnxlm.recipes import models

    cfg = models.llama_tiny(vocab_size=97)
    cfg.scan_layers = scan_layers
    for name, value in options.items():
        setattr(cfg.block.attention, name, fdl.Partial(RMSNorm, eps=1e-6) if value == "rmsnorm" else value)
    model = fdl.build(cfg)(rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(9), len(leaves))
    noisy = [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))
    return model


@pytest.mark.parametrize("option", sorted(ATTENTION_OPTIONS))
@pytest.mark.parametrize("stacked", [True, False])
def test_cached_decoding_equals_the_full_forward_with_every_attention_option(option, stacked):
    model = option_model(True, **ATTENTION_OPTIONS[option])
    ids = jax.random.randint(jax.random.key(0), (2, 11), 0, 97)
    full = model(ids)
    graphdef, state = nnx.split(model)
    call = jax.jit(lambda state, ids, cache: nnx.merge(graphdef, state)(ids, cache=cache))
    cache = model.init_cache(2, 16, stacked=stacked)
    logits, cache = call(state, ids[:, :5], cache)  # a prefill longer than the window, then steps
    pieces = [logits]
    for t in range(5, 11):
        logits, cache = call(state, ids[:, t : t + 1], cache)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5, rtol=1e-5)


def test_a_left_padded_prompt_decodes_as_the_prompt_alone_with_a_sliding_window():
    model = option_model(False, sliding_window=3)
    ids = jnp.concatenate([jnp.zeros((1, 5), jnp.int32), jnp.array([[7, 3, 9, 4, 60, 12, 40]])], axis=1)
    segment_ids = jnp.array([[0] * 5 + [1] * 7])
    positions = jnp.array([[0] * 5 + list(range(7))])
    graphdef, state = nnx.split(model)
    call = jax.jit(lambda state, cache, *rows: nnx.merge(graphdef, state)(*rows, cache=cache))
    cache = model.init_cache(1, 14)
    logits, cache = call(state, cache, ids[:, :10], positions[:, :10], segment_ids[:, :10])
    pieces = [logits[:, 5:]]
    for t in range(10, 12):
        step, cache = call(state, cache, ids[:, t : t + 1], positions[:, t : t + 1], segment_ids[:, t : t + 1])
        pieces.append(step)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), model(ids[:, 5:]), atol=1e-5, rtol=1e-5)


def gemma_tiny(version: int, scan_layers: bool):
    """A Gemma 2 (alternating window-4 / global layers, soft-capping) or Gemma 3 (two local layers
    of RoPE base 100 to one global with linear scaling, qk norms) model of 3 layers."""
    import fiddle as fdl

    from nnxlm.recipes import models

    shape = dict(vocab_size=97, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=48, head_dim=16)
    if version == 2:
        pattern = ({"sliding_window": 4}, {"sliding_window": None})
        cfg = models.gemma(**shape, post_norms=True, attn_softcap=5.0, final_logit_softcap=3.0, layer_pattern=pattern)
    else:
        local = {"sliding_window": 4, "rope_theta": 100.0}
        pattern = (local, local, {"sliding_window": None, "rope_scaling": {"type": "linear", "factor": 4.0}})
        cfg = models.gemma(**shape, post_norms=True, qk_norm=True, query_pre_attn_scalar=24, layer_pattern=pattern)
    cfg.scan_layers = scan_layers
    return fdl.build(cfg)(rngs=nnx.Rngs(0))


@pytest.mark.parametrize("version, scan_layers, stacked", [(2, True, True), (3, True, True), (3, False, False)])
def test_cached_decoding_of_local_and_global_layers_past_the_window(version, scan_layers, stacked):
    model = gemma_tiny(version, scan_layers)
    ids = jax.random.randint(jax.random.key(1), (2, 11), 0, 97)
    full = model(ids)
    cache = model.init_cache(2, 16, stacked=stacked)
    logits, cache = model(ids[:, :5], cache=cache)
    pieces = [logits]
    for t in range(5, 11):
        logits, cache = model(ids[:, t : t + 1], cache=cache)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5, rtol=1e-5)


def test_a_layer_pattern_changes_the_numbers_and_scanned_equals_unrolled():
    from tests.modules.helpers import copy_weights

    scanned, unrolled = gemma_tiny(3, True), gemma_tiny(3, False)
    copy_weights(scanned, unrolled)
    ids = jax.random.randint(jax.random.key(2), (1, 12), 0, 97)
    np.testing.assert_allclose(scanned(ids), unrolled(ids), atol=1e-5, rtol=1e-5)
    scanned._layer_pattern = None  # every layer global with the attention's own RoPE
    assert np.max(np.abs(scanned(ids) - unrolled(ids))) > 1e-3


@pytest.mark.parametrize("kind", ["sliding_window", "mla"])
def test_rows_at_their_own_cache_index_decode_as_each_row_alone(kind):
    """The serving engine's layout: index [batch], every row from slot 0 at its own length."""
    from tests.modules.helpers import tiny_deepseek

    model = option_model(False, sliding_window=3) if kind == "sliding_window" else tiny_deepseek(False)
    vocab = model.vocab_size
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, vocab)
    graphdef, state = nnx.split(model)
    call = jax.jit(lambda state, cache, *rows: nnx.merge(graphdef, state)(*rows, cache=cache))
    cache = model.init_cache(2, 12, stacked=False)
    cache = KVCache(cache.k, cache.v, cache.segment_ids, jnp.array([0, 0], jnp.int32))
    lengths = (3, 6)  # row 0 prefills 3 tokens, row 1 six (right-padded: segment 0 after)
    prefill = jnp.stack([jnp.where(jnp.arange(6) < n, ids[r, :6], 0) for r, n in enumerate(lengths)])
    segments = jnp.array([[1] * 3 + [0] * 3, [1] * 6])
    _, cache = call(state, cache, prefill, jnp.broadcast_to(jnp.arange(6), (2, 6)), segments)
    cache = KVCache(cache.k, cache.v, cache.segment_ids, jnp.array(lengths, jnp.int32))
    steps = []
    for t in range(3):  # one token a row at its own position: row 0 at 3, 4, 5; row 1 at 6, 7, 8
        step_ids = jnp.stack([ids[0, 3 + t], ids[1, 6 + t]])[:, None]
        logits, cache = call(state, cache, step_ids, cache.index[:, None], jnp.ones((2, 1), jnp.int32))
        steps.append(logits[:, 0])
    np.testing.assert_array_equal(cache.index, [6, 9])
    np.testing.assert_allclose(jnp.stack(steps, 1)[0], model(ids[:1, :6])[0, 3:], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(jnp.stack(steps, 1)[1], model(ids[1:, :9])[0, 6:], atol=1e-5, rtol=1e-5)


def int8_cache_model(kind):
    from nnxlm.modules.quantization import Quantization
    from tests.modules.helpers import tiny_deepseek

    model = tiny_deepseek(False) if kind == "mla" else tiny_model(kind == "scanned")
    Quantization(weights=None, kv="int8").apply(model)
    return model


@pytest.mark.parametrize("kind, stacked", [("scanned", True), ("listed", False)])
def test_an_int8_cache_decodes_close_to_the_full_forward_in_a_quarter_of_the_memory(kind, stacked):
    model = int8_cache_model(kind)
    ids = jax.random.randint(jax.random.key(3), (2, 10), 0, model.vocab_size)
    full = model(ids)
    graphdef, state = nnx.split(model)
    call = jax.jit(lambda state, ids, cache: nnx.merge(graphdef, state)(ids, cache=cache))
    cache = model.init_cache(2, 16, stacked=stacked)
    assert jax.tree.leaves(cache.k)[0].dtype == jnp.int8 and jax.tree.leaves(cache.k_scale)[0].dtype == jnp.float32
    logits, cache = call(state, ids[:, :6], cache)
    pieces = [logits]
    for t in range(6, 10):
        logits, cache = call(state, ids[:, t : t + 1], cache)
        pieces.append(logits)
    decoded = jnp.concatenate(pieces, axis=1)
    assert float(jnp.linalg.norm(decoded - full) / jnp.linalg.norm(full)) < 0.01
    assert bool(jnp.all(jnp.argmax(decoded, -1) == jnp.argmax(full, -1)))

    def nbytes(c):
        return sum(x.nbytes for x in jax.tree.leaves([c.k, c.v, c.k_scale, c.v_scale]))

    values = sum(x.size for x in jax.tree.leaves([cache.k, cache.v]))
    assert nbytes(cache) == values + 4 * sum(x.size for x in jax.tree.leaves([cache.k_scale, cache.v_scale]))
    model.quantization = None  # the same model with a float cache
    assert nbytes(model.init_cache(2, 16, stacked=stacked)) == 4 * values  # float32
    assert nbytes(cache) < 0.4 * 4 * values  # one byte a value, plus a float32 a slot and head


def test_latent_attention_over_an_int8_cache_is_close_to_over_a_float_one():
    """Per layer: tiny_deepseek's mixture-of-experts routing (a discrete choice) would turn the
    cache's rounding into different experts for some tokens, which is not what is tested here."""
    from tests.modules.helpers import tiny_deepseek

    attention = tiny_deepseek(False).first_layers[0].attention
    x = jax.random.normal(jax.random.key(0), (2, 10, 32))
    positions, segments = jnp.broadcast_to(jnp.arange(10), (2, 10)), jnp.ones((2, 10), jnp.int32)
    k, v = attention.init_cache(2, 16)
    key_segments = jnp.zeros((2, 16), jnp.int32).at[:, :10].set(1)
    float_cache = KVCache(k, v, key_segments, jnp.zeros((), jnp.int32))
    scales = jnp.zeros(k.shape[:-1]), jnp.zeros(v.shape[:-1])
    int8_cache = KVCache(k.astype(jnp.int8), v.astype(jnp.int8), key_segments, jnp.zeros((), jnp.int32), *scales)
    reference, _ = attention(x, positions, segments, float_cache)
    out, written = attention(x, positions, segments, int8_cache)
    assert written.k.dtype == jnp.int8 and float(jnp.min(written.k_scale[:, :, :10])) > 0
    assert float(jnp.linalg.norm(out - reference) / jnp.linalg.norm(reference)) < 0.01


def test_an_int8_cache_guards_zero_scales_and_serves_rows_at_their_own_index():
    model = int8_cache_model("listed")
    cache = model.init_cache(2, 8, stacked=False)
    layer = KVCache(
        cache.k[0], cache.v[0], cache.segment_ids, jnp.array([0, 3], jnp.int32), cache.k_scale[0], cache.v_scale[0]
    )
    zeros = jnp.zeros((2, 2, 1, 16))
    written = layer.write(zeros, zeros + 1.5)
    assert not bool(jnp.any(jnp.isnan(written.keys(jnp.float32))))
    np.testing.assert_array_equal(written.keys(jnp.float32), 0)
    np.testing.assert_allclose(written.values(jnp.float32)[0, :, 0], 1.5)  # row 0 at slot 0, row 1 at slot 3
    np.testing.assert_allclose(written.values(jnp.float32)[1, :, 3], 1.5)
    np.testing.assert_array_equal(written.values(jnp.float32)[1, :, 0], 0)
