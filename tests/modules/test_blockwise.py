"""Blockwise attention equals the dense path in values and gradients, whatever the mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nnxlm.modules import flash
from nnxlm.modules.flash import blockwise_attention
from tests.modules.helpers import dense_attention


def inputs(length, heads=4, kv_heads=2, head_dim=8, v_dim=8, packed=False, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (2, length, heads, head_dim))
    k = jax.random.normal(keys[1], (2, length, kv_heads, head_dim))
    v = jax.random.normal(keys[2], (2, length, kv_heads, v_dim))
    if packed:  # row 0: documents of 7, 12 and the rest; row 1: one document after left padding
        bounds = jnp.array([7, 19])
        index = jnp.arange(length)
        row0 = 1 + jnp.searchsorted(bounds, index, side="right")
        starts = jnp.concatenate([jnp.array([0]), bounds])[row0 - 1]
        row1 = jnp.where(index < 5, 0, 1)
        segment_ids = jnp.stack([row0, row1]).astype(jnp.int32)
        positions = jnp.stack([index - starts, jnp.maximum(index - 5, 0)]).astype(jnp.int32)
    else:
        segment_ids = jnp.ones((2, length), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (2, length))
    return q, k, v, segment_ids, positions


CASES = {
    "causal GQA": dict(),
    "multi-head": dict(kv_heads=4),
    "multi-query": dict(kv_heads=1),
    "packed segments": dict(packed=True),
    "sliding window": dict(window=5),
    "window and packed": dict(window=6, packed=True),
    "soft-cap": dict(softcap=2.0),
    "latent-attention dims": dict(head_dim=12, v_dim=8),
}


@pytest.mark.parametrize(
    "case, length, block",
    [(case, 37, 8) for case in CASES] + [("packed segments", 20, 64)],  # 5 uneven blocks; one padded block
)
def test_blockwise_equals_dense_in_values_and_gradients(case, length, block):
    options = dict(CASES[case])
    window, softcap = options.pop("window", None), options.pop("softcap", None)
    q, k, v, segment_ids, positions = inputs(length, **options)
    scale = q.shape[-1] ** -0.5

    def loss(attend, q, k, v):
        out = attend(q, k, v)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))  # every output weighted

    def ours(q, k, v):
        return blockwise_attention(
            q, k, v, segment_ids, positions, scale=scale, window=window, softcap=softcap, block_size=block
        )

    def reference(q, k, v):
        return dense_attention(q, k, v, segment_ids, positions, scale, window, softcap)

    np.testing.assert_allclose(ours(q, k, v), reference(q, k, v), atol=1e-5)
    grads = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_a_traced_window_per_layer_and_uneven_blocks():
    q, k, v, segment_ids, positions = inputs(30)
    run = jax.jit(
        lambda window: blockwise_attention(q, k, v, segment_ids, positions, scale=0.3, window=window, block_size=8)
    )
    for window in (1, 4, 2**31 - 1):
        expected = dense_attention(q, k, v, segment_ids, positions, 0.3, None if window > 100 else window)
        np.testing.assert_allclose(run(jnp.int32(window)), expected, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2", "deepseek"])
def test_models_computed_blockwise_equal_dense_in_logits_and_gradients(family):
    """Whole models: Llama (GQA), Gemma 2 (soft-caps, local and global layers), DeepSeek (latent
    attention), with 8-token blocks over 27 tokens in two packed documents."""
    import fiddle as fdl
    from flax import nnx

    from nnxlm.recipes import models
    from tests.modules.helpers import tiny_deepseek

    def build(implementation):
        if family == "deepseek":
            model = tiny_deepseek(False)
        else:
            cfg = models.llama_tiny(vocab_size=97)
            if family == "gemma2":
                cfg.block.attention.softcap = 20.0
                cfg.layer_pattern = ({"sliding_window": 4}, {"sliding_window": None})
            model = fdl.build(cfg)(rngs=nnx.Rngs(0))
        for _, module in nnx.iter_graph(model):
            if hasattr(module, "implementation"):
                module.implementation, module.block_size = implementation, 8
        return model

    ids = jax.random.randint(jax.random.key(0), (2, 27), 0, 97)
    segment_ids = jnp.where(jnp.arange(27) < 11, 1, 2)[None].repeat(2, 0).astype(jnp.int32)
    positions = jnp.where(jnp.arange(27) < 11, jnp.arange(27), jnp.arange(27) - 11)[None].repeat(2, 0)

    def loss(model):
        return jnp.mean(jax.nn.logsumexp(model(ids, positions, segment_ids), axis=-1))

    results = []
    for implementation in ("dense", "blockwise"):
        model = build(implementation)
        results.append((loss(model), nnx.grad(loss)(model)))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
    for got, want in zip(jax.tree.leaves(results[1][1]), jax.tree.leaves(results[0][1]), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("num_blocks, chunk", [(1, 1), (5, 1), (5, 2), (6, 4), (4, 64)])
def test_the_chunk_schedule_visits_every_causal_block_pair_once(num_blocks, chunk):
    seen = []
    for pairs, starts in flash.chunk_schedule(num_blocks, chunk):
        assert pairs <= chunk and starts.dtype == np.int32
        for first_query, first_key in starts:
            seen += [(first_query + i, first_key + i) for i in range(pairs)]
    assert sorted(seen) == [(i, j) for i in range(num_blocks) for j in range(i + 1)]


@pytest.mark.parametrize("chunk_elements", [1, 2 * 4 * 8 * 8 * 3])  # one pair a chunk; runs of 3, 2 and 1
def test_small_chunks_equal_dense(monkeypatch, chunk_elements):
    """With the scores of only one or three block pairs allowed at once (what a large model gets),
    the pairs are walked in runs of several lengths: still the dense values and gradients."""
    monkeypatch.setattr(flash, "CHUNK_ELEMENTS", chunk_elements)
    q, k, v, segment_ids, positions = inputs(37, packed=True)

    def ours(q, k, v):
        return blockwise_attention(q, k, v, segment_ids, positions, scale=0.3, window=6, block_size=8)

    def reference(q, k, v):
        return dense_attention(q, k, v, segment_ids, positions, 0.3, 6)

    np.testing.assert_allclose(ours(q, k, v), reference(q, k, v), atol=1e-5)
    grads = jax.grad(lambda *a: jnp.sum(jnp.sin(ours(*a))), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(lambda *a: jnp.sum(jnp.sin(reference(*a))), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Over a KV cache: a long prefill attends over the cache slots blockwise.


def cache_inputs(kv_heads, int8, per_row, seed=0):
    """9 queries of a 40-slot cache, written at slot 5 of every row (a left-padded prompt: row 1's
    first 3 slots hold padding, segment 0) or at each row's own index (3 and 17); the slots after
    the queries hold stale values."""
    from nnxlm.modules.kv_cache import KVCache
    from nnxlm.modules.quantization import quantize_int8

    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (2, 9, 4, 8))
    k, v = (jax.random.normal(key, (2, kv_heads, 40, 8)) for key in keys[1:])
    index = jnp.array([3, 17], jnp.int32) if per_row else jnp.int32(5)
    filled = jnp.reshape(index, (-1, 1)) + 9  # slots before this hold a token
    segments = jnp.where(jnp.arange(40) < filled, 1, 0)
    if not per_row:
        segments = segments.at[1, :3].set(0)
    segments = jnp.broadcast_to(segments, (2, 40)).astype(jnp.int32)
    query_segments = jnp.ones((2, 9), jnp.int32)
    if int8:
        (k, k_scale), (v, v_scale) = quantize_int8(k, axis=-1), quantize_int8(v, axis=-1)
        return q, KVCache(k, v, segments, index, k_scale[..., 0], v_scale[..., 0]), query_segments
    return q, KVCache(k, v, segments, index), query_segments


@pytest.mark.parametrize(
    "kv_heads, int8, per_row, window, softcap",
    [(2, True, False, 4, 3.0), (4, False, True, 6, None)],  # float, scalar index, no window: the next test
)
def test_blockwise_over_a_cache_equals_the_dense_cached_attention(kv_heads, int8, per_row, window, softcap):
    from nnxlm.modules.blockwise import blockwise_cached_attention
    from nnxlm.modules.kv_cache import cached_attention, cached_attention_mask

    q, cache, segments = cache_inputs(kv_heads, int8, per_row)
    mask = cached_attention_mask(segments, cache.segment_ids, cache.index, window)
    expected = cached_attention(q, cache, mask, 0.3, softcap)
    got = blockwise_cached_attention(
        q, cache, segments, scale=0.3, window=window, softcap=softcap, block_q=4, block_k=8
    )  # 3 query blocks (one padded), 5 key blocks
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_key_blocks_after_the_last_query_are_never_read():
    """NaN in every slot after the last query's key block: the dense path, which reads them
    (masked scores times NaN values), is NaN; the blockwise one skips them."""
    from nnxlm.modules.blockwise import blockwise_cached_attention
    from nnxlm.modules.kv_cache import KVCache, cached_attention, cached_attention_mask

    q, cache, segments = cache_inputs(2, False, False)  # queries at slots 5..13: key blocks 0 and 1 of 8
    poisoned = KVCache(cache.k.at[:, :, 16:].set(jnp.nan), cache.v.at[:, :, 16:].set(jnp.nan), *dataclass_rest(cache))
    mask = cached_attention_mask(segments, cache.segment_ids, cache.index)
    assert bool(jnp.all(jnp.isnan(cached_attention(q, poisoned, mask, 0.3))))
    got = blockwise_cached_attention(q, poisoned, segments, scale=0.3, block_q=4, block_k=8)
    np.testing.assert_allclose(got, cached_attention(q, cache, mask, 0.3), atol=1e-5, rtol=1e-5)


def dataclass_rest(cache):
    return cache.segment_ids, cache.index, cache.k_scale, cache.v_scale


def cached_model(kind):
    """A model whose attention layers go blockwise over the cache (block_size 8) or not."""
    from flax import nnx

    from nnxlm.modules.quantization import Quantization
    from tests.modules.helpers import tiny_model

    model = tiny_model(False)
    if kind == "int8":
        Quantization(weights=None, kv="int8").apply(model)

    def set_implementation(implementation):
        for _, module in nnx.iter_graph(model):
            if hasattr(module, "implementation"):
                module.implementation, module.block_size = implementation, 8

    return model, set_implementation


@pytest.mark.parametrize("kind", ["float", "int8"])
def test_a_long_prefill_through_the_cache_blockwise_equals_the_dense_cached_path(kind):
    """A 37-token prefill (one row left-padded) into a 48-slot cache: the logits and the cache of
    blockwise attention over the slots equal the dense path's (decoding after it: the next test)."""
    model, set_implementation = cached_model(kind)
    ids = jax.random.randint(jax.random.key(0), (2, 37), 1, model.vocab_size)
    segments = jnp.ones((2, 37), jnp.int32).at[1, :6].set(0)
    positions = jnp.maximum(jnp.arange(37) - jnp.array([[0], [6]]), 0).astype(jnp.int32)
    results = []
    for implementation in ("dense", "blockwise"):
        set_implementation(implementation)
        results.append(model(ids, positions, segments, cache=model.init_cache(2, 48, stacked=False)))
    for got, want in zip(jax.tree.leaves(results[1]), jax.tree.leaves(results[0]), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("int8", [False, True])
def test_latent_attention_prefill_blockwise_over_its_latent_cache_equals_the_dense_path(int8):
    """MLA's absorbed cached path (one layer: tiny_deepseek's expert routing would amplify
    rounding): 21 queries, one row left-padded, into a 32-slot cache of latents, float or int8."""
    from nnxlm.modules.kv_cache import KVCache
    from tests.modules.helpers import tiny_deepseek

    attention = tiny_deepseek(False).first_layers[0].attention
    x = jax.random.normal(jax.random.key(0), (2, 21, 32))
    segments = jnp.ones((2, 21), jnp.int32).at[1, :4].set(0)
    positions = jnp.maximum(jnp.arange(21) - jnp.array([[0], [4]]), 0).astype(jnp.int32)
    k, v = attention.init_cache(2, 32)
    key_segments = jnp.zeros((2, 32), jnp.int32).at[:, :21].set(segments)
    if int8:
        scales = jnp.zeros(k.shape[:-1]), jnp.zeros(v.shape[:-1])
        cache = KVCache(k.astype(jnp.int8), v.astype(jnp.int8), key_segments, jnp.int32(0), *scales)
    else:
        cache = KVCache(k, v, key_segments, jnp.int32(0))
    results = []
    for implementation in ("dense", "blockwise"):
        attention.implementation, attention.block_size = implementation, 8
        results.append(attention(x, positions, segments, cache))
    for got, want in zip(jax.tree.leaves(results[1]), jax.tree.leaves(results[0]), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_generation_after_a_blockwise_prefill_gives_the_same_tokens():
    from nnxlm.generation import generate

    model, set_implementation = cached_model("float")
    prompts = [list(range(1, 71)), list(range(5, 30))]  # 70 and 25 tokens: a left-padded 128-token bucket
    set_implementation("dense")
    expected = generate(model, prompts, max_new_tokens=6)
    set_implementation("blockwise")
    np.testing.assert_array_equal(generate(model, prompts, max_new_tokens=6), expected)
