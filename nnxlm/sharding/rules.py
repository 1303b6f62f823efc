"""Logical axis name -> mesh axis (or axes, or None for replicated): the one sharding table.

Parameters carry logical names in their `logical_axes` metadata; activations are named where the
model calls `constrain`. A recipe overrides single entries with Trainer(sharding_rules={...}).
"""

import contextlib
import contextvars
import math

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# batch is split over every axis that holds different tokens; parameters are split over fsdp and
# sequence along their `embed` axis (ZeRO-3 style: sequence-parallel devices would otherwise hold
# full copies), over tensor along heads / mlp / vocab (Megatron style), over expert along the
# experts and, stacked layers, over pipeline along `layers` (each stage holds a block of layers).
# Within one name's list a mesh axis already taken by an earlier name is skipped, so
# ("batch", "length", "embed") on activations leaves embed unsplit.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),
    "length": "sequence",
    "embed": ("fsdp", "sequence"),
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "expert": "expert",
    "head_dim": None,
    "q_lora": None,  # MLA query / key-value latent ranks (nnxlm.modules.mla)
    "kv_lora": None,
    "norm": None,
    "layers": "pipeline",  # stacked layers: stages of a pipeline (nnxlm.modules.pipeline)
    "lora_rank": None,  # LoRA's rank axis is never split (nnxlm.modules.lora)
    "quant_blocks": None,  # a quantized kernel's scale blocks (nnxlm.modules.quantization)
}


def mesh_axes_of(entry) -> tuple[str, ...]:
    """The mesh axes of a rule or PartitionSpec entry: None, one name or a tuple of names."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def logical_to_spec(logical_axes, rules=None) -> PartitionSpec:
    """PartitionSpec for a tuple of logical names; a mesh axis is used at most once."""
    rules = DEFAULT_RULES if rules is None else {**DEFAULT_RULES, **rules}
    used, spec = set(), []
    for name in logical_axes:
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule; add it to the rules table")
        mesh_axes = rules.get(name)
        mesh_axes = mesh_axes_of(mesh_axes)
        mesh_axes = tuple(axis for axis in mesh_axes if axis not in used)
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*spec)


def fit_spec(shape, spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
    """`spec` with, on each dimension, only the leading mesh axes whose sizes divide it.

    A dimension smaller than its mesh axes (2 KV heads on tensor=4) is kept whole on the axes that
    do not divide it, i.e. replicated there: the usual treatment of few KV heads under tensor
    parallelism. `unsplit_dimensions` lists where this happened.
    """
    fitted = []
    for size, entry in zip(shape, (*spec, *(None,) * (len(shape) - len(spec))), strict=True):
        axes = mesh_axes_of(entry)
        kept = []
        for axis in axes:
            if size % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]):
                break
            kept.append(axis)
        fitted.append(kept[0] if len(kept) == 1 else (tuple(kept) or None))
    return PartitionSpec(*fitted)


def state_shardings(state, mesh, rules=None):
    """NamedShardings for an nnx.State (or module), from each variable's `logical_axes` metadata.

    Variables without logical axes (step counters, RNG keys) are replicated.
    """

    def sharding(variable):
        axes = variable.get_metadata().get("logical_axes") if isinstance(variable, nnx.Variable) else None
        if not axes:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, fit_spec(variable.shape, logical_to_spec(axes, rules), mesh))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def unsplit_dimensions(state, mesh, rules=None) -> list[str]:
    """'path: logical name (size) kept whole on mesh axes' for every dimension fit_spec left unsplit."""
    notes = []
    for path, variable in nnx.to_flat_state(state):
        axes = variable.get_metadata().get("logical_axes") if isinstance(variable, nnx.Variable) else None
        if not axes:
            continue
        wanted, fitted = logical_to_spec(axes, rules), fit_spec(variable.shape, logical_to_spec(axes, rules), mesh)
        for name, size, want, got in zip(axes, variable.shape, wanted, fitted, strict=False):
            want_axes = mesh_axes_of(want)
            got_axes = mesh_axes_of(got)
            missing = [a for a in want_axes if a not in got_axes and mesh.shape[a] > 1]
            if missing:
                name_path = ".".join(str(p) for p in path)
                notes.append(f"{name_path}: {name} ({size}) not split over {'x'.join(missing)}")
    return notes


# ---------------------------------------------------------------------------------------------------
# Activations: the model names their axes with `constrain`; the trainer says which mesh applies.

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("nnxlm_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=None):
    """While tracing inside this context, `constrain` pins activations to `mesh` by `rules`."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, logical_axes) -> jax.Array:
    """Pins x's sharding by logical axis names (e.g. ("batch", "length", None)); the identity
    outside `activation_sharding` (generation, conversion, notebooks)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = fit_spec(x.shape, logical_to_spec(logical_axes, rules), mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def active_mesh() -> tuple[Mesh, dict | None] | None:
    """(mesh, rules) of the enclosing `activation_sharding`, or None outside one. Layers that run a
    collective schedule of their own inside shard_map (ring attention, expert all-to-all) read the
    mesh here."""
    return _ACTIVE.get()


def mesh_axis_size(axis: str) -> int:
    """Size of `axis` in the active mesh; 1 outside `activation_sharding` or where the mesh lacks it."""
    active = _ACTIVE.get()
    return 1 if active is None else active[0].shape.get(axis, 1)
