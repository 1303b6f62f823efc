"""Logical axis name -> mesh axis (or axes, or None for replicated): the one sharding table."""

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

# batch is split over every data-parallel axis; parameters are split over fsdp along their
# `embed` axis (ZeRO-3 style) and over tensor along heads / mlp / vocab (Megatron style).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "q_lora": None,  # MLA query / key-value latent ranks (nnxlm.modules.mla)
    "kv_lora": None,
    "norm": None,
    "layers": None,
    "expert": None,  # a later expert-parallel mesh axis goes here
    "length": None,
}


def logical_to_spec(logical_axes, rules=None) -> PartitionSpec:
    """PartitionSpec for a tuple of logical names; a mesh axis is used at most once."""
    rules = DEFAULT_RULES if rules is None else {**DEFAULT_RULES, **rules}
    used, spec = set(), []
    for name in logical_axes:
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule; add it to the rules table")
        mesh_axes = rules.get(name)
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        mesh_axes = tuple(axis for axis in mesh_axes if axis not in used)
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*spec)


def state_shardings(state, mesh, rules=None):
    """NamedShardings for an nnx.State (or module), from each variable's `logical_axes` metadata.

    Variables without logical axes (step counters, RNG keys) are replicated.
    """

    def sharding(variable):
        axes = variable.get_metadata().get("logical_axes") if isinstance(variable, nnx.Variable) else None
        return NamedSharding(mesh, logical_to_spec(axes, rules) if axes else PartitionSpec())

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
