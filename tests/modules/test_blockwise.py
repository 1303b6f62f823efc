"""Blockwise attention equals the dense path in values and gradients, whatever the mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nnxlm.modules.attention import attention_mask
from nnxlm.modules.blockwise import blockwise_attention


def dense(q, k, v, segment_ids, positions, scale, window=None, softcap=None):
    """The dense path's arithmetic: float32 scores, soft-cap, mask at float32's lowest, softmax."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    mask = attention_mask(segment_ids, positions, window)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bnts,bsnv->btnv", jax.nn.softmax(scores, axis=-1), v)


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
            q, k, v, segment_ids, positions, scale=scale, window=window, softcap=softcap, block_q=block, block_k=block
        )

    def reference(q, k, v):
        return dense(q, k, v, segment_ids, positions, scale, window, softcap)

    np.testing.assert_allclose(ours(q, k, v), reference(q, k, v), atol=1e-5)
    grads = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_a_traced_window_per_layer_and_uneven_blocks():
    q, k, v, segment_ids, positions = inputs(30)
    run = jax.jit(
        lambda window: blockwise_attention(
            q, k, v, segment_ids, positions, scale=0.3, window=window, block_q=8, block_k=16
        )
    )
    for window in (1, 4, 2**31 - 1):
        expected = dense(q, k, v, segment_ids, positions, 0.3, None if window > 100 else window)
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
