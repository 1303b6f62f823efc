"""Small models for module tests."""

import fiddle as fdl
import jax
import jax.numpy as jnp
from flax import nnx

from nnxlm.modules.attention import attention_mask
from nnxlm.recipes import models


def dense_attention(q, k, v, segment_ids, positions, scale, window=None, softcap=None):
    """The reference of the blockwise and fused paths: the dense path's arithmetic (float32 scores
    of every query and key, soft-cap, mask at float32's lowest, softmax), with KV heads repeated."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(attention_mask(segment_ids, positions, window), scores, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bnts,bsnv->btnv", jax.nn.softmax(scores, axis=-1), v)


def tiny_model(scan_layers=True, seed=0, **changes):
    cfg = models.llama_tiny(vocab_size=97)
    cfg.scan_layers = scan_layers
    for name, value in changes.items():
        setattr(cfg, name, value)
    return fdl.build(cfg)(rngs=nnx.Rngs(seed))


def copy_weights(source, target):
    """Puts source's parameters into target, converting between stacked and listed layers."""
    from nnxlm.checkpointing import from_stored_layout, stored_layout

    target_state = nnx.state(target)
    canonical = stored_layout(nnx.to_pure_dict(nnx.state(source)))
    like = nnx.to_pure_dict(target_state)
    nnx.replace_by_pure_dict(target_state, from_stored_layout(canonical, _abstract(like)))
    nnx.update(target, target_state)


def _abstract(tree):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def tiny_deepseek(scan_layers=True, seed=0, **changes):
    """DeepSeek-V3's shape, small: MLA (query LoRA, YaRN), 1 dense layer then 2 MoE layers with
    4 groups of 2 experts, 2 multi-token prediction depths."""
    cfg = models.deepseek(
        vocab_size=97,
        d_model=32,
        num_layers=3,
        num_dense_layers=1,
        num_heads=4,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=12,
        mlp_dim=40,
        num_experts=8,
        num_experts_per_token=2,
        expert_hidden_dim=16,
        num_groups=4,
        num_groups_per_token=2,
        routed_scaling_factor=2.5,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "mscale": 0.707},
        mtp_depth=2,
    )
    cfg.scan_layers = scan_layers
    for name, value in changes.items():
        setattr(cfg, name, value)
    return random_model(lambda: fdl.build(cfg)(rngs=nnx.Rngs(seed)), seed)


def random_model(make, seed=0):
    """The model make() builds, with random values drawn by numpy instead of its initialisers
    (compiling those, eagerly or as one program, takes seconds for a model of many small
    parameters): vectors (norm scales, biases) 1 + 0.1 N(0, 1), the rest 0.15 N(0, 1)."""
    import jax
    import numpy as np

    generator = np.random.default_rng(seed)

    def draw(leaf):
        values = generator.standard_normal(leaf.shape).astype(leaf.dtype)
        return 1.0 + 0.1 * values if leaf.ndim == 1 else 0.15 * values

    graphdef, state = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, jax.tree.map(draw, state))
