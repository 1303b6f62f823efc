"""The fused kernels (cuDNN, splash) equal the dense path, and refuse what they cannot honour.

Neither kernel runs on this CPU. Splash runs in Pallas interpret mode (the kernel's own code,
blocks, masks and backward pass, executed by XLA:CPU). cuDNN's adapter is checked with
jax.nn.dot_product_attention(implementation="xla") in its place: the same call and arguments
(is_causal, local_window_size, mask, scale), so the mapping of nnxlm's mask onto them is tested,
not cuDNN itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nnxlm.errors import UserError
from nnxlm.modules import fused_attention
from nnxlm.modules.attention import Attention
from nnxlm.modules.fused_attention import cudnn_attention, splash_attention
from nnxlm.modules.mla import MLA
from tests.modules.helpers import dense_attention


def rows(length):
    """Packed rows (numpy, no compile): row 0 holds documents of 7 and 12 tokens and one to the end,
    row 1 five padding tokens (segment 0) then one document. Segment ids, positions [2, length]."""
    index = np.arange(length)
    starts = np.array([0, 7, 19])
    document = np.searchsorted(starts, index, side="right")
    segment_ids = np.stack([document, np.where(index < 5, 0, 1)])
    positions = np.stack([index - starts[document - 1], np.maximum(index - 5, 0)])
    return jnp.asarray(segment_ids, jnp.int32), jnp.asarray(positions, jnp.int32)


def inputs(length, heads=4, kv_heads=2, head_dim=8, v_dim=8):
    rng = np.random.default_rng(0)
    q, k, v = (
        jnp.asarray(rng.standard_normal((2, length, n, d)), jnp.float32)
        for n, d in ((heads, head_dim), (kv_heads, head_dim), (kv_heads, v_dim))
    )
    return q, k, v, *rows(length)


def values_and_gradients(attend, q, k, v, segment_ids):
    """attend(q, k, v) and the gradients of a weighted sum of its outputs, in one compiled program.
    Padding queries (segment 0) are left out: their outputs are masked out of every loss, and the
    kernels count windows in row indices where padding positions repeat (fused_attention's doc)."""
    valid = (segment_ids != 0)[:, :, None, None]
    out_shape = (*q.shape[:3], v.shape[3])
    weights = jnp.cos(jnp.arange(np.prod(out_shape), dtype=jnp.float32).reshape(out_shape)) * valid

    @jax.jit
    def run(q, k, v):
        out, vjp = jax.vjp(attend, q, k, v)
        return jnp.where(valid, out, 0.0), vjp(weights)

    return run(q, k, v)


def assert_close(got, want, atol=1e-5):
    for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got_leaf, want_leaf, atol=atol, rtol=1e-5)


def test_splash_equals_dense_in_values_and_gradients():
    """GQA, a window, a soft-cap, MLA's value dim, packed rows of 200 tokens padded to 2 x 2 blocks."""
    q, k, v, segment_ids, positions = inputs(200, head_dim=12, v_dim=8)
    scale, window, softcap = 12**-0.5, 5, 2.0

    def splash(q, k, v):
        return splash_attention(
            q, k, v, segment_ids, positions, scale=scale, window=window, softcap=softcap, block_size=128,
            interpret=True,
        )  # fmt: skip

    def reference(q, k, v):
        return dense_attention(q, k, v, segment_ids, positions, scale, window, softcap)

    assert_close(
        values_and_gradients(splash, q, k, v, segment_ids), values_and_gradients(reference, q, k, v, segment_ids)
    )


@pytest.mark.parametrize(
    "shape, window",
    [(dict(), 5), (dict(kv_heads=1, head_dim=12, v_dim=8), 2**31 - 1), (dict(kv_heads=4, v_dim=12), None)],
    ids=["GQA, window", "MQA, MLA dims, global window", "wider values"],
)
def test_cudnn_call_with_xla_in_its_place_equals_dense(shape, window):
    q, k, v, segment_ids, positions = inputs(27, **shape)

    def cudnn(q, k, v):
        return cudnn_attention(q, k, v, segment_ids, positions, scale=0.3, window=window, implementation="xla")

    def reference(q, k, v):
        return dense_attention(q, k, v, segment_ids, positions, 0.3, window)

    assert_close(
        values_and_gradients(cudnn, q, k, v, segment_ids), values_and_gradients(reference, q, k, v, segment_ids)
    )


def test_cudnn_folds_a_traced_window_into_its_mask():
    """A layer_pattern's per-layer window is traced under a scanned stack: it joins the mask."""
    q, k, v, segment_ids, positions = inputs(27)
    valid = (segment_ids != 0)[:, :, None, None]

    @jax.jit
    def both(window):
        cudnn = cudnn_attention(q, k, v, segment_ids, positions, scale=0.3, window=window, implementation="xla")
        reference = dense_attention(q, k, v, segment_ids, positions, 0.3, window)
        return jnp.where(valid, cudnn, 0.0), jnp.where(valid, reference, 0.0)

    for window in (3, 2**31 - 1):
        assert_close(*both(jnp.int32(window)))


def built(factory):
    """factory()'s module with random weights from numpy: no per-shape initialiser to compile."""
    graphdef, state = nnx.split(nnx.eval_shape(factory))
    rng = np.random.default_rng(0)
    return nnx.merge(graphdef, jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), state))


def test_attention_and_mla_through_the_kernels_equal_dense(monkeypatch):
    """The modules' wiring (scale, window, soft-cap, segments): the same weights, dense and fused."""
    monkeypatch.setattr(fused_attention, "INTERPRET", True)  # splash interpreted, cuDNN's call on XLA
    segment_ids, positions = rows(40)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 40, 32)), jnp.float32)
    valid = (segment_ids != 0)[:, :, None]

    def outputs(module, implementation):
        module.implementation = implementation
        return nnx.jit(lambda module: jnp.where(valid, module(x, positions, segment_ids), 0.0))(module)

    shape = dict(num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=6, query_pre_attn_scalar=10.0)
    attention = built(lambda: Attention(32, **shape, rngs=nnx.Rngs(0)))
    assert_close(outputs(attention, "cudnn"), outputs(attention, "dense"))
    attention.softcap = 3.0  # the same weights soft-capped (cuDNN has no soft-cap; splash has)
    assert_close(outputs(attention, "splash"), outputs(attention, "dense"))
    dims = dict(num_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    mla = built(lambda: MLA(32, **dims, rngs=nnx.Rngs(0)))
    assert_close(outputs(mla, "cudnn"), outputs(mla, "dense"))


def test_a_kernel_off_its_platform_names_the_platform_and_the_alternatives():
    x, (segment_ids, positions) = jnp.ones((2, 27, 32)), rows(27)
    for implementation, kernel in (("cudnn", "GPU"), ("splash", "TPU")):
        shape = dict(num_heads=4, num_kv_heads=2, head_dim=8, implementation=implementation)
        attention = built(lambda: Attention(32, **shape, rngs=nnx.Rngs(0)))  # noqa: B023 (built at once)
        with pytest.raises(UserError, match=f"'{implementation}' is a {kernel} kernel and this run is on cpu: use "):
            nnx.jit(lambda attention: attention(x, positions, segment_ids))(attention)  # raises when tracing


def test_kernels_refuse_what_they_cannot_honour(monkeypatch):
    shape = dict(num_heads=4, num_kv_heads=2, head_dim=8, rngs=nnx.Rngs(0))
    with pytest.raises(UserError, match="softcap 30.0 with implementation 'cudnn': cuDNN attention has no soft-cap"):
        Attention(32, **shape, softcap=30.0, implementation="cudnn")
    with pytest.raises(UserError, match="block_size 100 with implementation 'splash': .* multiples of 128 .* use 128"):
        Attention(32, **shape, implementation="splash", block_size=100)
    q, k, v, segment_ids, positions = inputs(27)
    with pytest.raises(UserError, match="'cudnn' takes bfloat16 or float16 and the model computes in float32"):
        cudnn_attention(q, k, v, segment_ids, positions, scale=0.3)
    monkeypatch.setattr(fused_attention, "INTERPRET", True)
    traced = jax.jit(
        lambda w: fused_attention.fused_attention("splash", q, k, v, segment_ids, positions, scale=0.3, window=w)
    )
    with pytest.raises(UserError, match="'splash' with a traced window: splash takes a sliding window fixed when"):
        traced(jnp.int32(4))
