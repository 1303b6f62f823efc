"""Per-slot sampling: each row keeps its own temperature, top_k, top_p and seed."""

import jax
import jax.numpy as jnp
import numpy as np

from nnxlm.serving.steps import Sampling, sample_rows


def test_each_row_samples_with_its_own_settings_and_seed():
    logits = jnp.log(jnp.array([0.4, 0.3, 0.2, 0.1] + [0.0] * 4) + 1e-30)
    logits_sv = jnp.tile(logits, (4, 1))
    sampling = Sampling(
        seed=jnp.array([1, 2, 3, 4], jnp.uint32),
        temperature=jnp.array([0.0, 1.0, 1.0, 1.0], jnp.float32),  # row 0 greedy
        top_k=jnp.array([0, 2, 0, 0], jnp.int32),  # row 1: the 2 most likely
        top_p=jnp.array([1.0, 1.0, 0.6, 1.0], jnp.float32),  # row 2: 0.4 + 0.3 reach 0.6
    )
    draw = jax.jit(lambda n: sample_rows(logits_sv, sampling, jnp.full((4,), n, jnp.int32)))
    tokens = np.array([draw(n) for n in range(400)])  # token n of each row: key fold_in(key(seed), n)
    assert set(tokens[:, 0]) == {0}
    assert set(tokens[:, 1]) == {0, 1} and set(tokens[:, 2]) == {0, 1}
    assert set(tokens[:, 3]) == {0, 1, 2, 3}  # never a token of probability 0
    counts = np.bincount(tokens[:, 3], minlength=4) / 400
    np.testing.assert_allclose(counts, [0.4, 0.3, 0.2, 0.1], atol=0.08)
    # the same seed and index give the same token whatever the other rows do
    alone = sample_rows(logits_sv[3:], Sampling(*(x[3:] for x in sampling)), jnp.array([7], jnp.int32))
    assert int(alone[0]) == int(tokens[7, 3])
