import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.modules.helpers import copy_weights, tiny_model


@pytest.mark.parametrize("scan_layers", [True, False])
def test_changing_a_token_changes_no_earlier_logit(scan_layers):
    model = tiny_model(scan_layers)
    ids = jax.random.randint(jax.random.key(0), (2, 12), 0, 97)
    t = 7
    changed = ids.at[:, t].set((ids[:, t] + 1) % 97)
    before, after = model(ids), model(changed)
    np.testing.assert_array_equal(before[:, :t], after[:, :t])
    assert not np.allclose(before[:, t:], after[:, t:])  # the change is seen from t on


@pytest.mark.parametrize("scan_layers", [True, False])
def test_two_packed_documents_give_the_logits_of_each_alone(scan_layers):
    model = tiny_model(scan_layers)
    doc_a = jax.random.randint(jax.random.key(1), (1, 5), 0, 97)
    doc_b = jax.random.randint(jax.random.key(2), (1, 7), 0, 97)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    segment_ids = jnp.array([[1] * 5 + [2] * 7])
    positions = jnp.array([list(range(5)) + list(range(7))])
    logits = model(packed, positions, segment_ids)
    np.testing.assert_allclose(logits[:, :5], model(doc_a), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logits[:, 5:], model(doc_b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("remat_policy", ["none", "full"])
def test_scan_and_loop_models_with_the_same_weights_agree(remat_policy):
    scanned = tiny_model(True, remat_policy=remat_policy)
    looped = tiny_model(False, seed=1, remat_policy=remat_policy)
    ids = jax.random.randint(jax.random.key(3), (2, 10), 0, 97)
    assert not np.allclose(scanned(ids), looped(ids))  # different initial weights
    copy_weights(scanned, looped)
    np.testing.assert_allclose(scanned(ids), looped(ids), atol=1e-5, rtol=1e-5)


def test_remat_policies_give_the_same_gradients():
    from flax import nnx

    ids = jax.random.randint(jax.random.key(4), (2, 10), 0, 97)
    grads = {}
    for policy in ["none", "full", "dots"]:
        model = tiny_model(True, remat_policy=policy)
        grads[policy] = nnx.grad(lambda m: m(ids).mean())(model)
    for policy in ["full", "dots"]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads["none"], grads[policy])


def test_tied_head_reuses_the_embedding_table():
    model = tiny_model(True, tie_embeddings=True)
    assert not hasattr(model, "head")
    ids = jnp.array([[1, 2, 3]])
    x = model.embedder.embedding[...]
    assert model(ids).shape == (1, 3, 97) and x.shape == (97, 64)


def test_compute_dtype_bfloat16_returns_float32_logits_close_to_float32():
    ids = jax.random.randint(jax.random.key(5), (1, 8), 0, 97)
    full = tiny_model(True)(ids)
    half = tiny_model(True, dtype="bfloat16")(ids)
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(half, full, atol=0.1)


def test_every_parameter_has_logical_axes_matching_its_rank():
    from flax import nnx

    for scan_layers in (True, False):
        for path, variable in nnx.iter_graph(tiny_model(scan_layers)):
            if isinstance(variable, nnx.Param):
                axes = variable.get_metadata()["logical_axes"]
                assert len(axes) == variable.ndim, path
                assert ("layers" in axes) == (scan_layers and "layers" in path), path
