import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nnxlm.modules.grouped import capacity_layout, grouped_matmul, sorted_layout

E, D, F = 4, 8, 6


def slots(seed=0, count=50):
    """Expert ids of `count` slots, uneven: expert 2 gets none, E marks a slot with no expert."""
    ids = jax.random.choice(jax.random.key(seed), jnp.array([0, 0, 0, 1, 3, 3, E]), (count,))
    x = jax.random.normal(jax.random.key(seed + 1), (count, D))
    w = jax.random.normal(jax.random.key(seed + 2), (E, D, F))
    return ids, x, w


def reference(x, w, ids, kept):
    """Slot s times its expert's weight, float64; zero where no expert or not kept."""
    x, w, ids = np.asarray(x, np.float64), np.asarray(w, np.float64), np.asarray(ids)
    return np.stack([x[s] @ w[e] if e < E and kept[s] else np.zeros(F) for s, e in enumerate(ids)])


def through(layout, x, w):
    return layout.gather(grouped_matmul(layout.scatter(x), w, layout))


@pytest.mark.parametrize("kind", ["tiles", "ragged", "capacity"])
def test_each_slot_is_multiplied_by_its_own_expert_in_value_and_gradients(kind):
    ids, x, w = slots()
    kept = np.ones(len(ids), bool)
    if kind == "capacity":  # place of each slot in its expert's queue; 5 rows an expert: some dropped
        place = np.array([np.sum(np.asarray(ids[:s]) == e) for s, e in enumerate(np.asarray(ids))])
        kept = place < 5
        layout = capacity_layout(ids, jnp.asarray(place), E, 5)
    else:
        layout = sorted_layout(ids, E, tiles=kind == "tiles")
    assert layout.kind == kind
    if kind == "tiles":  # several tiles for expert 0: the loop crosses tile and group boundaries
        assert layout.tile == 16 and int(layout.used_tiles) == 2 + 1 + 1
    assert 0 < kept.sum() < len(ids) - 3 if kind == "capacity" else kept.all()
    np.testing.assert_allclose(through(layout, x, w), reference(x, w, ids, kept), rtol=1e-5, atol=1e-5)

    r = jax.random.normal(jax.random.key(9), (len(ids), F))
    grads = jax.grad(lambda x, w: jnp.sum(through(layout, x, w) * r), argnums=(0, 1))(x, w)
    # the same function written densely: every expert on every slot, the slot's own one picked
    pick = jax.nn.one_hot(jnp.where(jnp.asarray(kept), ids, E), E)

    def dense(x, w):
        return jnp.sum(jnp.einsum("sd,edf,se->sf", x, w, pick) * r)

    for got, expected in zip(grads, jax.grad(dense, argnums=(0, 1))(x, w), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_cpu_uses_tiles_elsewhere_ragged_dot():
    ids, _, _ = slots()
    assert sorted_layout(ids, E).kind == ("tiles" if jax.default_backend() == "cpu" else "ragged")


def test_tiles_compute_only_the_tiles_in_use():
    ids = jnp.zeros((4096,), jnp.int32)  # everything to expert 0: 64 full tiles of 64 rows
    layout = sorted_layout(ids, 8, tiles=True)
    assert layout.tile == 64 and int(layout.used_tiles) == 64
    assert layout.rows == (64 + 8) * 64  # the bound: ceil(S / T) + E tiles of buffer, not E x S rows
    x = jnp.ones((4096, D))
    text = jax.make_jaxpr(lambda x: grouped_matmul(layout.scatter(x), jnp.ones((8, D, F)), layout))(x)
    assert "ragged_dot" not in str(text) and "while" in str(text)
