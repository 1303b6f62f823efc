"""Device meshes, the one table from logical axis names to mesh axes, and multi-host start-up.

Models name their parameter axes logically (`embed`, `vocab`, `heads`, ...: the `logical_axes`
metadata of every nnx.Param) and their activations' axes through `constrain`; this package alone
decides which mesh axis each name is split over.
"""

from nnxlm.sharding.mesh import MESH_AXES, make_mesh
from nnxlm.sharding.rules import (
    DEFAULT_RULES,
    activation_sharding,
    active_mesh,
    constrain,
    fit_spec,
    logical_to_spec,
    mesh_axes_of,
    mesh_axis_size,
    state_shardings,
    unsplit_dimensions,
)

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "activation_sharding",
    "active_mesh",
    "constrain",
    "fit_spec",
    "logical_to_spec",
    "make_mesh",
    "mesh_axes_of",
    "mesh_axis_size",
    "state_shardings",
    "unsplit_dimensions",
]
