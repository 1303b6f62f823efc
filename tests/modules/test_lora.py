"""LoRA adapters: equal to the base at start, merge / unmerge, disabled view, stacking, every family."""

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nnxlm import UserError
from nnxlm.modules.lora import LoRA, adapted, lora_disabled, merge_lora, unmerge_lora
from nnxlm.recipes import models
from nnxlm.sharding import logical_to_spec

IDS = jnp.array([[3, 14, 15, 92, 65, 35, 89, 79], [2, 71, 82, 81, 82, 8, 45, 90]], jnp.int32)


def build(recipe, lora=None, seed=0):
    recipe = fdl.copy_with(recipe, lora=lora) if lora is not None else recipe
    return fdl.build(recipe)(rngs=nnx.Rngs(seed))


def randomize_b(model, seed=1):
    """Moves every adapter's zero factor, so the adapters change what the model computes."""
    for i, module in enumerate(adapted(model)):
        b = module.adapter.b
        b[...] = jax.random.normal(jax.random.key(seed + i), b.shape) * 0.1


def tiny(scan_layers=True):
    recipe = models.llama_tiny(vocab_size=97)
    recipe.scan_layers = scan_layers
    return recipe


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "looped"])
def test_a_new_adapter_leaves_the_model_exactly_equal_to_its_base(scan_layers):
    base = build(tiny(scan_layers))
    adapted_model = build(tiny(scan_layers), LoRA(rank=4, alpha=8))
    assert len(adapted(adapted_model)) == 7 * (1 if scan_layers else 4)  # q k v o gate up down
    np.testing.assert_array_equal(adapted_model(IDS), base(IDS))


def test_merge_equals_unmerged_and_unmerge_restores_the_base():
    model = build(tiny(), LoRA(rank=4, alpha=8))
    randomize_b(model)
    kernels = [np.asarray(m.kernel[...]) for m in adapted(model)]
    unmerged = model(IDS)
    base_logits = build(tiny())(IDS)
    assert np.max(np.abs(unmerged - base_logits)) > 1e-2  # the adapters do something
    merge_lora(model)
    assert all(m.adapter.merged for m in adapted(model))
    np.testing.assert_allclose(model(IDS), unmerged, atol=1e-5, rtol=1e-5)
    unmerge_lora(model)
    for module, kernel in zip(adapted(model), kernels, strict=True):
        np.testing.assert_allclose(module.kernel[...], kernel, atol=1e-6)
    np.testing.assert_allclose(model(IDS), unmerged, atol=1e-5, rtol=1e-5)


def test_disabled_adapters_give_the_base_without_copying_it():
    model = build(tiny(), LoRA(rank=4))
    randomize_b(model)
    kernels = [m.kernel[...] for m in adapted(model)]
    with lora_disabled(model):
        np.testing.assert_array_equal(model(IDS), build(tiny())(IDS))
        assert all(m.kernel[...] is k for m, k in zip(adapted(model), kernels, strict=True))  # the same arrays
    assert np.max(np.abs(model(IDS) - build(tiny())(IDS))) > 1e-2


def test_scanned_adapters_are_stacked_along_layers_and_never_split_on_rank():
    model = build(tiny(), LoRA(rank=4, targets=("q", "o", "down")))
    attention = model.layers.attention
    assert attention.q_proj.adapter.a.shape == (4, 64, 4)  # [layers, embed, rank]
    assert attention.q_proj.adapter.b.shape == (4, 4, 4, 16)  # [layers, rank, heads, head_dim]
    assert attention.o_proj.adapter.a.shape == (4, 4, 16, 4)  # [layers, heads, head_dim, rank]
    a_axes = attention.q_proj.adapter.a.get_metadata()["logical_axes"]
    b_axes = attention.o_proj.adapter.b.get_metadata()["logical_axes"]
    assert a_axes == ("layers", "embed", "lora_rank") and b_axes == ("layers", "lora_rank", "embed")
    rules = {"lora_rank": None, "embed": "fsdp"}
    assert logical_to_spec(a_axes)[2] is None and logical_to_spec(b_axes, rules)[1] is None
    assert attention.k_proj.adapter is None and model.layers.mlp.gate.adapter is None
    assert isinstance(attention.q_proj.adapter.a, nnx.LoRAParam)


def test_alpha_over_rank_scales_the_update():
    plain = build(tiny(), LoRA(rank=4, alpha=4))
    doubled = build(tiny(), LoRA(rank=4, alpha=8))
    rslora = build(tiny(), LoRA(rank=4, alpha=4, rslora=True))
    for model in (plain, doubled, rslora):
        randomize_b(model)
    base = build(tiny())(IDS)
    delta, delta2 = plain(IDS) - base, doubled(IDS) - base
    assert doubled.layers.attention.q_proj.adapter.scale == 2.0 and rslora.layers.attention.q_proj.adapter.scale == 2.0
    # doubling the scale doubles the first-order change of the logits
    np.testing.assert_allclose(np.linalg.norm(delta2) / np.linalg.norm(delta), 2.0, rtol=0.1)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_experts_and_latent_attention_take_adapters_that_merge_exactly(family):
    if family == "mixtral":
        recipe = models.mixtral(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=16)
        targets = ("q", "v", "gate", "up", "down")
    else:
        recipe = models.deepseek(
            vocab_size=97, d_model=32, num_layers=2, num_dense_layers=1, num_heads=2, q_lora_rank=12,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, mlp_dim=40, num_experts=4,
            num_experts_per_token=2, expert_hidden_dim=16, num_shared_experts=1,
        )  # fmt: skip
        targets = ("q_a", "q_b", "kv_a", "kv_b", "o", "gate", "down")
    model = build(recipe, LoRA(rank=2, targets=targets))
    if family == "mixtral":
        assert model.layers.mlp.gate.adapter.a.shape == (2, 8, 32, 2)  # [layers, experts, embed, rank]
    else:
        assert model.layers.attention.kv_b_proj.adapter.b.shape == (1, 2, 2, 16)  # [layers, rank, heads, nope + v]
    randomize_b(model)
    unmerged = model(IDS)
    merge_lora(model)
    # (W + BA) x and W x + B (A x) round differently: 2e-5 apart on one CPU for deepseek_v3's logits
    np.testing.assert_allclose(model(IDS), unmerged, atol=5e-5, rtol=1e-5)
    unmerge_lora(model)
    if family == "deepseek_v3":  # cached decoding absorbs kv_b_proj with its update into the queries
        from nnxlm.generation import generate

        graphdef, state = nnx.split(model)
        tokens = generate(model, IDS[:1, :4], max_new_tokens=4)
        merged = nnx.merge(graphdef, state)
        merge_lora(merged)
        np.testing.assert_array_equal(generate(merged, IDS[:1, :4], max_new_tokens=4), tokens)


def test_targets_that_match_nothing_and_a_zero_rank_are_one_clear_error():
    with pytest.raises(UserError, match="match no projection"):
        build(tiny(), LoRA(targets=("kv_b",)))
    with pytest.raises(UserError, match="LoRA rank is 0"):
        LoRA(rank=0)
    with pytest.raises(UserError, match="LoRA dropout"):
        LoRA(dropout=1.0)


def test_dropout_applies_to_the_adapter_input_only_when_training():
    model = build(tiny(), LoRA(rank=4, dropout=0.5))
    randomize_b(model)
    positions = jnp.broadcast_to(jnp.arange(8), IDS.shape)
    segments = jnp.ones_like(IDS)
    evaluation = model(IDS, positions, segments)
    np.testing.assert_array_equal(model(IDS, positions, segments), evaluation)  # no key: no dropout
    trained = model(IDS, positions, segments, dropout_key=jax.random.key(0))
    assert np.max(np.abs(trained - evaluation)) > 1e-3
    with lora_disabled(model):  # the base path never drops
        np.testing.assert_array_equal(
            model(IDS, positions, segments, dropout_key=jax.random.key(0)), build(tiny())(IDS)
        )
