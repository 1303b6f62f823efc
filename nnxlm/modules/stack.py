"""Stacks of layers built by one factory: one module whose parameters have a leading `layers` axis.

A stack is created with nnx.vmap over split RNGs (each layer its own initial values), applied with
nnx.scan (compile time independent of depth), and can be cut back into per-layer modules that
hold slices of the stacked parameters (a Python loop over them is what cached decoding runs).
"""

import jax
from flax import nnx


def stacked(make_layer, count: int, rngs: nnx.Rngs) -> nnx.Module:
    """count layers made by make_layer(rngs=) as one module whose parameters have a leading
    `layers` axis (prepended to each parameter's logical axes)."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return make_layer(rngs=rngs)

    layers = create(rngs)
    for _, variable in nnx.iter_graph(layers):
        if isinstance(variable, nnx.Variable) and "logical_axes" in variable.get_metadata():
            variable.set_metadata("logical_axes", ("layers", *variable.get_metadata()["logical_axes"]))
    return layers


def unstacked(layers: nnx.Module, count: int) -> list[nnx.Module]:
    """The count layers of a stack as separate modules holding slices of its parameters."""
    graphdef, state = nnx.split(layers)
    return [nnx.merge(graphdef, jax.tree.map(lambda p, i=i: p[i], state)) for i in range(count)]
