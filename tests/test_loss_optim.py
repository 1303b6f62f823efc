import jax
import jax.numpy as jnp
import numpy as np

from nnxlm.loss import cross_entropy
from nnxlm.optim import AdamW


def test_cross_entropy_sums_unmasked_tokens_and_adds_z_loss():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
    targets = jnp.array([[1, 2, 3], [4, 0, 1]])
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    log_probs = np.asarray(jax.nn.log_softmax(logits))
    picked = [(0, 0), (0, 1), (1, 0)]
    expected_nll = -np.sum([log_probs[b, t, targets[b, t]] for b, t in picked])
    log_z = np.asarray(jax.nn.logsumexp(logits, axis=-1))
    expected_z = np.sum([log_z[b, t] ** 2 for b, t in picked])
    total, nll, count = cross_entropy(logits, targets, mask, z_loss_weight=1e-2)
    np.testing.assert_allclose(nll, expected_nll, rtol=1e-6)
    np.testing.assert_allclose(total, expected_nll + 1e-2 * expected_z, rtol=1e-6)
    assert count == 3


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    schedule = AdamW(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1).schedule(num_steps=110)
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(schedule(60), 0.55, atol=1e-6)  # half way down the cosine
    np.testing.assert_allclose(schedule(110), 0.1, atol=1e-6)


def test_clipping_bounds_the_update_of_a_huge_gradient():
    tx, _ = AdamW(learning_rate=1.0, warmup_steps=0, clip_norm=1.0, weight_decay=0.0).build(num_steps=10)
    params = {"w": jnp.zeros((3, 3))}
    state = tx.init(params)
    updates, _ = tx.update({"w": jnp.full((3, 3), 1e6)}, state, params)
    assert np.all(np.isfinite(updates["w"])) and np.max(np.abs(updates["w"])) <= 1.0 + 1e-6
