import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nnxlm.generation import generate, sample_logits
from tests.modules.helpers import tiny_model


def greedy_reference(model, prompt, steps):
    """Greedy decoding by re-running the full model on the growing sequence."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(jnp.argmax(model(jnp.array([ids]))[0, -1])))
    return ids[len(prompt) :]


@pytest.mark.parametrize("scan_layers", [True, False])
def test_greedy_generation_matches_step_by_step_argmax(scan_layers):
    model = tiny_model(scan_layers)
    prompt = [5, 17, 3, 42]
    out = generate(model, [prompt], max_new_tokens=6)
    assert out.shape == (1, 6)
    assert out[0].tolist() == greedy_reference(model, prompt, 6)


def test_prompts_of_mixed_lengths_give_the_tokens_of_each_alone():
    model = tiny_model()
    prompts = [[4, 8, 15, 16, 23, 42], [7], [9, 9, 2]]
    batch = generate(model, prompts, max_new_tokens=5)
    for row, prompt in zip(batch, prompts, strict=True):
        np.testing.assert_array_equal(row, generate(model, [prompt], max_new_tokens=5)[0])


def test_sampling_is_reproducible_by_seed():
    model = tiny_model()
    a = generate(model, [[1, 2, 3]], max_new_tokens=8, temperature=1.0, seed=3)
    b = generate(model, [[1, 2, 3]], max_new_tokens=8, temperature=1.0, seed=3)
    c = generate(model, [[1, 2, 3]], max_new_tokens=8, temperature=1.0, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_temperature_zero_is_argmax():
    logits = jax.random.normal(jax.random.key(0), (4, 50))
    np.testing.assert_array_equal(sample_logits(logits, jax.random.key(1)), jnp.argmax(logits, -1))


def test_top_k_and_top_p_never_leave_their_support():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.05, 0.05]] * 2000))
    keys = jax.random.split(jax.random.key(0), 2)
    top_k = sample_logits(logits, keys[0], temperature=1.0, top_k=2)
    assert set(np.unique(top_k)) == {0, 1}
    top_p = sample_logits(logits, keys[1], temperature=1.0, top_p=0.85)  # 0.5 + 0.3 < 0.85: three tokens
    assert set(np.unique(top_p)) == {0, 1, 2}
    both = sample_logits(logits, keys[1], temperature=2.0, top_k=3, top_p=0.5)
    assert set(np.unique(both)) <= {0, 1}
