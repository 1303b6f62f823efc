import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nnxlm.checksums import checksums, malformed, mismatch


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32, jnp.uint8, jnp.bool_])
def test_one_changed_element_or_two_swapped_change_the_checksum(dtype):
    x = (np.arange(2 * 3 * 5).reshape(2, 3, 5) % 7).astype(dtype)
    changed, swapped = x.copy(), x.copy()
    changed[1, 2, 4] = 1 - changed[1, 2, 4]
    swapped[0, 0, 0], swapped[0, 0, 1] = x[0, 0, 1], x[0, 0, 0]
    sums = [checksums({"x": jnp.asarray(a)})["x"] for a in (x, changed, swapped)]
    assert len(set(sums)) == 3
    assert sums[0] == checksums({"x": x})["x"]  # numpy and jax arrays alike (to-hf reads numpy)


def test_a_checksum_is_of_the_values_and_their_places_not_the_layout():
    x = jax.random.normal(jax.random.key(0), (64, 48))
    assert checksums({"x": x}) == checksums({"x": np.asarray(x)})
    assert checksums({"x": x})["x"] != checksums({"x": x.T})["x"]  # same values, other places
    assert checksums({"x": x})["x"] != checksums({"x": x.reshape(48, 64)})["x"].replace("float32", "")
    keys = {"key": jax.random.key(3)}
    assert checksums(keys)["key"] != checksums({"key": jax.random.key(4)})["key"]


def test_a_mismatch_names_the_array_and_skips_what_was_saved_without_checksums():
    tree = {"model": {"a": jnp.ones(4), "b": jnp.zeros((2, 2), jnp.bfloat16)}}
    saved = checksums(tree)
    assert mismatch(tree, saved) is None and mismatch(tree, None) is None
    tree["model"]["b"] = tree["model"]["b"].at[1, 1].set(jnp.nan)
    assert mismatch(tree, saved) == "model/b"
    assert mismatch(tree, {"model/a": saved["model/a"]}) is None  # b saved before checksums were kept
    # readers read arrays as saved and cast after the comparison (checkpointing.as_saved): another dtype differs
    assert mismatch({"model": {"a": tree["model"]["a"].astype(jnp.bfloat16)}}, saved) == "model/a"


def test_saved_checksums_are_checked_as_untrusted_data():
    good = checksums({"a": jnp.ones(3)})
    assert malformed(good) is None and malformed(None) is None
    assert malformed([1]) == "holds checksums that are not a table"
    for entry in ("zzz", 5, "0123456789abcdef", "0123456789abcdef float32 x"):
        assert malformed({"a": entry}) == "holds a malformed checksum for a"
    assert malformed({"a": "0123456789abcdef nosuchtype"}) == "holds an unknown dtype for a"
