"""Small models for module tests."""

import fiddle as fdl
from flax import nnx

from nnxlm.recipes import models


def tiny_model(scan_layers=True, seed=0, **changes):
    cfg = models.llama_tiny(vocab_size=97)
    cfg.scan_layers = scan_layers
    for name, value in changes.items():
        setattr(cfg, name, value)
    return fdl.build(cfg)(rngs=nnx.Rngs(seed))


def copy_weights(source, target):
    """Puts source's parameters into target, converting between stacked and listed layers."""
    from nnxlm.checkpointing import stack_layers, unstack_layers

    target_state = nnx.state(target)
    canonical = stack_layers(nnx.to_pure_dict(nnx.state(source)))
    like = nnx.to_pure_dict(target_state)
    nnx.replace_by_pure_dict(target_state, unstack_layers(canonical, _abstract(like)))
    nnx.update(target, target_state)


def _abstract(tree):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
