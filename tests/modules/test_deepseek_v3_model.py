"""The DeepSeek-V3 assembly (see tests/modules/helpers.tiny_deepseek): a dense first-layer stack
before the mixture-of-experts stack, scanned or looped, with the same numbers and a checkpoint
layout either loads; cached decoding over MLA latents; multi-token prediction only under
nnx.capture, causal at every depth, its loss counted within row, document and loss mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nnxlm.checkpointing import stored_layout
from nnxlm.loss import multi_token_prediction_loss
from tests.modules.helpers import copy_weights, tiny_deepseek


@pytest.fixture(scope="module")
def model():
    return tiny_deepseek()


@pytest.fixture(scope="module")
def looped(model):
    looped = nnx.eval_shape(lambda: tiny_deepseek(scan_layers=False))  # filled from the scanned one
    copy_weights(model, looped)
    return looped


@nnx.jit
def forward(model, ids):
    return model(ids)


@nnx.jit
def captured(model, ids):
    """(logits, mtp_logits) of a call under nnx.capture."""
    logits, sown = nnx.capture(model, nnx.Intermediate)(ids)
    (mtp,) = dict(nnx.to_flat_state(sown))[("mtp_logits",)].get_value()
    return logits, mtp


def test_two_layer_stacks_scanned_or_looped_hold_the_same_numbers(model, looped):
    assert model.first_layers.mlp.gate.shape == (1, 32, 40) and model.layers.mlp.gate.shape == (2, 8, 32, 16)
    assert len(looped.first_layers) == 1 and len(looped.layers) == 2
    stored = stored_layout(nnx.to_pure_dict(nnx.state(looped)))  # the checkpoint layout
    assert stored["first_layers"]["mlp"]["gate"].shape == (1, 32, 40)
    assert stored["layers"]["mlp"]["score_correction_bias"].shape == (2, 8)
    ids = jax.random.randint(jax.random.key(0), (2, 9), 0, 97)
    np.testing.assert_allclose(forward(looped, ids), forward(model, ids), atol=1e-5, rtol=1e-5)


def test_cached_decoding_over_latents_gives_the_full_forward_logits(model):
    # a stacked cache through both scanned stacks (generation's unrolled layers: tests/convert)
    ids = jax.random.randint(jax.random.key(1), (2, 11), 0, 97)  # past YaRN's original 8 positions
    graphdef, state = nnx.split(model)
    call = jax.jit(lambda state, ids, cache: nnx.merge(graphdef, state)(ids, cache=cache))
    cache = model.init_cache(2, 16)
    assert cache.k[0].shape[-3:] == (1, 16, 16) and cache.v[0].shape[-3:] == (1, 16, 4)  # latent, rope key
    logits, cache = call(state, ids[:, :5], cache)
    pieces = [logits]
    for t in range(5, 11):
        logits, cache = call(state, ids[:, t : t + 1], cache)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), forward(model, ids), atol=1e-4, rtol=1e-4)


def test_mtp_runs_only_under_capture_and_leaves_the_main_logits_alone(model):
    ids = jax.random.randint(jax.random.key(2), (2, 9), 0, 97)
    state_before = jax.tree.map(jnp.shape, nnx.state(model))
    plain = forward(model, ids)
    assert jax.tree.map(jnp.shape, nnx.state(model)) == state_before  # nothing sown outside capture
    logits, mtp = captured(model, ids)
    np.testing.assert_allclose(logits, plain, atol=1e-6)
    assert mtp.shape == (2, 2, 9, 97) and mtp.dtype == jnp.float32
    assert not np.allclose(mtp[0], mtp[1])  # each depth its own module


def test_mtp_depth_k_at_position_i_sees_the_tokens_up_to_i_plus_k(model):
    ids = jax.random.randint(jax.random.key(3), (2, 9), 0, 97)
    t = 6
    _, before = captured(model, ids)
    _, after = captured(model, ids.at[:, t].set((ids[:, t] + 1) % 97))
    for k in (1, 2):  # depth k reads the embedding of token i + k
        np.testing.assert_array_equal(before[k - 1, :, : t - k], after[k - 1, :, : t - k])
        assert not np.allclose(before[k - 1, :, t - k], after[k - 1, :, t - k])


def test_mtp_loss_counts_each_depth_within_row_document_and_mask():
    depth, batch, length, vocab = 2, 2, 7, 11
    logits = np.asarray(jax.random.normal(jax.random.key(4), (depth, batch, length, vocab)))
    targets = np.asarray(jax.random.randint(jax.random.key(5), (batch, length), 0, vocab))
    segments = np.array([[1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 1, 1]])
    mask = np.ones((batch, length), np.float32)
    mask[1, 5] = 0.0  # e.g. a prompt token of an SFT row
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = []
    for k in (1, 2):
        nll = [
            -log_probs[k - 1, b, i, targets[b, i + k]]
            for b in range(batch)
            for i in range(length - k)
            if segments[b, i + k] == segments[b, i] and mask[b, i + k]
        ]
        expected.append(np.mean(nll))
    got = jax.jit(multi_token_prediction_loss)(logits, targets, mask, segments)
    np.testing.assert_allclose(got, np.mean(expected), rtol=1e-5)
