"""Per-device memory of a training run on its mesh (what `nnxlm inspect` prints).

State bytes come from the shardings (exact: each device holds one shard of every array); the
train step's own needs come from XLA's memory analysis of the step compiled for the mesh, which
on CPU can use as many fake devices as the mesh has (`inspect_devices`), so no accelerator is needed.
"""

import math

import jax
import numpy as np
from flax import nnx


def size(nbytes: float) -> str:
    """'1.23 GiB' or '45.6 MiB'."""
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def use_fake_cpu_devices(count: int) -> None:
    """Gives the CPU backend `count` devices (before JAX starts; accelerators are unaffected)."""
    from jax._src import xla_bridge

    if count > 1 and not xla_bridge.backends_are_initialized():
        jax.config.update("jax_num_cpu_devices", count)


def state_bytes_per_device(abstract_state: nnx.State, shardings) -> dict[str, int]:
    """{"model": bytes, "optimizer": bytes} one device holds of the train state."""

    def shard_bytes(variable, sharding):
        return math.prod(sharding.shard_shape(variable.shape)) * np.dtype(variable.dtype).itemsize

    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    sizes = jax.tree.map(shard_bytes, abstract_state, shardings, is_leaf=is_variable)
    return {part: int(sum(jax.tree.leaves(sizes[part]))) for part in ("model", "optimizer")}


def compiled_step_memory(trainer) -> dict[str, int]:
    """XLA's per-device memory analysis of the trainer's train step compiled for its mesh."""
    trainer.plan()
    lowered = trainer._train_step.lower(trainer._abstract_state, trainer.abstract_batch())
    stats = lowered.compile().memory_analysis()
    return {
        "arguments": stats.argument_size_in_bytes,
        "outputs": stats.output_size_in_bytes,
        "aliased": stats.alias_size_in_bytes,
        "temporaries": stats.temp_size_in_bytes,
    }


def per_device_lines(trainer, compile_step: bool) -> list[str]:
    """The per-device part of the inspect report."""
    trainer.plan()
    mesh = ", ".join(f"{name}={size}" for name, size in trainer.mesh.shape.items() if size > 1) or "one device"
    state = state_bytes_per_device(trainer._abstract_state, trainer.state_shardings)
    lines = [
        f"per device, on the mesh ({mesh}; {trainer.mesh.size} devices of {jax.devices()[0].platform}):",
        f"  parameters {size(state['model'])} + optimizer state {size(state['optimizer'])} (from the shardings)",
    ]
    if not compile_step:
        return lines + ["  (--compile adds XLA's analysis of the compiled train step: activations and peak)"]
    stats = compiled_step_memory(trainer)
    peak = stats["arguments"] + stats["outputs"] - stats["aliased"] + stats["temporaries"]
    return lines + [
        f"  compiled train step: arguments {size(stats['arguments'])} (state and batch), "
        f"temporaries {size(stats['temporaries'])} (activations, gradients, workspace), "
        f"outputs {size(stats['outputs'])} of which {size(stats['aliased'])} reuse donated inputs",
        f"  peak per device {size(peak)}",
    ]
