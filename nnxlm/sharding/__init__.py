"""Device meshes and the one table from logical axis names to mesh axes.

Models name their parameter axes logically (`embed`, `vocab`, `heads`, ...: the `logical_axes`
metadata of every nnx.Param); this package alone decides which mesh axis each name is split over.
"""

from nnxlm.sharding.mesh import MESH_AXES, make_mesh
from nnxlm.sharding.rules import DEFAULT_RULES, logical_to_spec, state_shardings

__all__ = ["DEFAULT_RULES", "MESH_AXES", "logical_to_spec", "make_mesh", "state_shardings"]
