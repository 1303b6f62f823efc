import types

import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from nnxlm.errors import UserError
from nnxlm.sharding import fit_spec, logical_to_spec, make_mesh, unsplit_dimensions
from nnxlm.sharding.mesh import resolve_axis_sizes


def test_logical_names_map_through_the_one_table():
    assert logical_to_spec(("embed", "mlp")) == P(("fsdp", "sequence"), "tensor")
    layers = P("pipeline", ("fsdp", "sequence"), "tensor", None)  # the layer stack splits into pipeline stages
    assert logical_to_spec(("layers", "embed", "kv_heads", "head_dim")) == layers
    assert logical_to_spec(("batch", "length")) == P(("data", "fsdp", "expert"), "sequence")
    assert logical_to_spec(("expert", "embed", "mlp")) == P("expert", ("fsdp", "sequence"), "tensor")
    assert logical_to_spec(("embed", "mlp"), {"mlp": None}) == P(("fsdp", "sequence"), None)
    assert logical_to_spec(("heads", "vocab")) == P("tensor", None)  # a mesh axis is used once
    assert logical_to_spec(("batch", "length", "embed")) == P(("data", "fsdp", "expert"), "sequence", None)


def test_a_dimension_the_mesh_does_not_divide_is_kept_whole_and_reported():
    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 2, "expert": 1, "sequence": 2, "tensor": 4})
    assert fit_spec((64, 2, 16), P(("fsdp", "sequence"), "tensor", None), mesh) == P(("fsdp", "sequence"), None, None)
    assert fit_spec((6, 8), P(("fsdp", "sequence"), "tensor"), mesh) == P("fsdp", "tensor")
    k_proj = nnx.Param(jnp.zeros((64, 2, 16)), logical_axes=("embed", "kv_heads", "head_dim"))
    notes = unsplit_dimensions(nnx.State({"k_proj": k_proj}), mesh)
    assert notes == ["k_proj: kv_heads (2) not split over tensor"]


def test_mesh_sizes_resolve_the_remaining_devices():
    assert resolve_axis_sizes({"data": -1, "tensor": 2}, 8) == {
        "pipeline": 1,
        "data": 4,
        "fsdp": 1,
        "expert": 1,
        "sequence": 1,
        "tensor": 2,
    }
    assert make_mesh({"data": -1}).shape["data"] == 1  # one CPU device in this process


@pytest.mark.parametrize(
    "sizes, message",
    [
        ({"data": 3}, "needs 3 devices but 8"),
        ({"data": -1, "fsdp": -1}, "at most one"),
        ({"pipe": 2}, "unknown mesh axis"),
    ],
)
def test_bad_mesh_sizes_are_rejected(sizes, message):
    with pytest.raises(UserError, match=message):
        resolve_axis_sizes(sizes, 8)
