"""A jax Mesh from axis sizes, with one size allowed to be -1 ("all remaining devices")."""

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from nnxlm.errors import UserError

# Mesh axes in order from the slowest-varying (across hosts) to the fastest (within a host):
#   pipeline  the layer stack split into stages that pass micro-batches on (nnxlm.modules.pipeline):
#             little traffic (one activation a stage a step), so it may cross the slowest links
#   data      pure data parallelism (parameters replicated, gradients all-reduced)
#   fsdp      data parallelism with parameters and optimizer state split (ZeRO-3)
#   expert    mixture-of-experts weights split by expert; tokens split over it outside the experts
#   sequence  activations split along the sequence (context parallelism); parameters split as fsdp
#   tensor    Megatron-style: heads, MLP hidden units and the vocabulary split
MESH_AXES = ("pipeline", "data", "fsdp", "expert", "sequence", "tensor")


def resolve_axis_sizes(sizes: dict[str, int], device_count: int) -> dict[str, int]:
    """Fills in the one -1 size and checks the product equals the device count."""
    unknown = [name for name in sizes if name not in MESH_AXES]
    if unknown:
        raise UserError(f"unknown mesh axis {unknown[0]!r}: mesh axes are {', '.join(MESH_AXES)}")
    sizes = {name: int(sizes.get(name, 1)) for name in MESH_AXES}
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise UserError(f"mesh axes {free} are all -1: at most one axis may take the remaining devices")
    known = math.prod(size for size in sizes.values() if size != -1)
    if any(size == 0 or size < -1 for size in sizes.values()):
        raise UserError(f"mesh axis sizes must be positive (or one -1), got {sizes}")
    if free:
        if device_count % known:
            raise UserError(f"mesh {sizes}: {device_count} devices do not divide by {known}; change the sizes")
        sizes[free[0]] = device_count // known
    if math.prod(sizes.values()) != device_count:
        raise UserError(
            f"mesh {sizes} needs {math.prod(sizes.values())} devices but {device_count} are present; "
            "make the sizes multiply to the device count or set one to -1"
        )
    return sizes


def make_mesh(sizes: dict[str, int], devices=None) -> Mesh:
    """A mesh over `devices` (default: all, over every process) with axes MESH_AXES in that order.

    Devices are ordered process by process, so the slow axes (data, fsdp) cross hosts and the fast
    ones (sequence, tensor) stay within a host where the sizes allow.
    """
    devices = jax.devices() if devices is None else devices
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    resolved = resolve_axis_sizes(sizes, len(devices))
    shape = tuple(resolved[name] for name in MESH_AXES)
    device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
