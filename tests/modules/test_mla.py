import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

from nnxlm.modules.mla import MLA, rope_frequencies, softmax_scale
from nnxlm.sharding.rules import DEFAULT_RULES, logical_to_spec

D, HEADS, Q_LORA, KV_LORA, NOPE, ROPE, V = 64, 4, 24, 16, 8, 4, 12

# DeepSeek-V3's rope_scaling shape; a short original context so that positions run past it, and
# mscale != mscale_all_dim so that both the cos/sin factor and the softmax-scale factor are not 1
YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 1.0,
}


def mla(q_lora_rank=Q_LORA, seed=0, **options):
    return MLA(
        D,
        num_heads=HEADS,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=KV_LORA,
        qk_nope_head_dim=NOPE,
        qk_rope_head_dim=ROPE,
        v_head_dim=V,
        **options,
        rngs=nnx.Rngs(seed),
    )


def tokens(seed=0, shape=(2, 11, D)):
    return jax.random.normal(jax.random.key(seed), shape)


# ---------------------------------------------------------------------------------------------
# Against transformers' DeepseekV3Attention, on random weights.


def hf_config(q_lora_rank=Q_LORA, rope_scaling=None, rope_interleave=True):
    rope_parameters = {"rope_type": "default", "rope_theta": 10_000.0}
    if rope_scaling:
        rope_parameters = {"rope_theta": 10_000.0, "rope_type": "yarn", **rope_scaling}
        del rope_parameters["type"]
    config = DeepseekV3Config(
        hidden_size=D,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=KV_LORA,
        qk_nope_head_dim=NOPE,
        qk_rope_head_dim=ROPE,
        v_head_dim=V,
        max_position_embeddings=64,
        rope_parameters=rope_parameters,
        rope_interleave=rope_interleave,
    )
    config._attn_implementation = "eager"
    return config


def hf_attention(config):
    torch.manual_seed(0)
    attention = DeepseekV3Attention(config, layer_idx=0).eval()
    with torch.no_grad():
        for name, parameter in attention.named_parameters():
            if name.endswith("layernorm.weight"):
                parameter.copy_(1.0 + 0.3 * torch.randn_like(parameter))
            else:
                parameter.normal_(0.0, parameter.shape[-1] ** -0.5)
    return attention


def load_hf_weights(layer, attention):
    """transformers -> MLA, for model.layers.{i}.self_attn.<name> (nn.Linear weights are [out, in]):
    q_a_proj.weight [q_lora, D]                  -> q_a_proj [D, q_lora]            (.T)
    q_a_layernorm.weight [q_lora]                -> q_a_norm.scale
    q_b_proj.weight [heads * (nope+rope), q_lora] -> q_b_proj [q_lora, heads, nope+rope]
    q_proj.weight [heads * (nope+rope), D]       -> q_proj [D, heads, nope+rope]    (q_lora_rank None)
    kv_a_proj_with_mqa.weight [kv_lora+rope, D]  -> kv_a_proj [D, kv_lora+rope]     (.T)
    kv_a_layernorm.weight [kv_lora]              -> kv_a_norm.scale
    kv_b_proj.weight [heads * (nope+v), kv_lora] -> kv_b_proj [kv_lora, heads, nope+v]
    o_proj.weight [D, heads * v]                 -> o_proj [heads, v, D]
    (.T then reshape for the 3-D ones; heads are the major factor of HF's out / in dims.)"""
    state = {name: value.detach().numpy() for name, value in attention.state_dict().items()}
    if "q_proj.weight" in state:
        layer.q_proj.kernel[...] = state["q_proj.weight"].T.reshape(layer.q_proj.shape)
    else:
        layer.q_a_proj.kernel[...] = state["q_a_proj.weight"].T
        layer.q_a_norm.scale[...] = state["q_a_layernorm.weight"]
        layer.q_b_proj.kernel[...] = state["q_b_proj.weight"].T.reshape(layer.q_b_proj.shape)
    layer.kv_a_proj.kernel[...] = state["kv_a_proj_with_mqa.weight"].T
    layer.kv_a_norm.scale[...] = state["kv_a_layernorm.weight"]
    layer.kv_b_proj.kernel[...] = state["kv_b_proj.weight"].T.reshape(layer.kv_b_proj.shape)
    layer.o_proj.kernel[...] = state["o_proj.weight"].T.reshape(layer.o_proj.shape)


def hf_output(config, attention, x, positions):
    x_t, positions_t = torch.tensor(np.asarray(x)), torch.tensor(np.asarray(positions))
    length = x.shape[1]
    causal = torch.full((length, length), float("-inf")).triu(1)[None, None].expand(x.shape[0], 1, -1, -1)
    with torch.no_grad():
        cos_sin = DeepseekV3RotaryEmbedding(config)(x_t, positions_t)
        return attention(x_t, cos_sin, causal)[0].numpy()


@pytest.mark.parametrize(
    "q_lora_rank, rope_scaling, rope_interleave, offset",
    [
        (Q_LORA, None, True, 0),
        (Q_LORA, YARN, True, 30),
        (None, None, True, 0),
        (None, YARN, True, 3),
        (Q_LORA, None, False, 5),
    ],
    ids=["q-lora", "q-lora-yarn-mscale", "no-q-lora", "no-q-lora-yarn", "half-split-rope"],
)
def test_matches_transformers_deepseek_v3_attention(q_lora_rank, rope_scaling, rope_interleave, offset):
    config = hf_config(q_lora_rank, rope_scaling, rope_interleave)
    attention = hf_attention(config)
    layer = mla(q_lora_rank, rope_scaling=rope_scaling, rope_interleave=rope_interleave)
    load_hf_weights(layer, attention)
    x = tokens(1)
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]) + offset, x.shape[:2])
    expected = hf_output(config, attention, x, positions)
    actual = np.asarray(layer(x, positions, jnp.ones(x.shape[:2], jnp.int32)))
    rel_error = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
    assert rel_error < 1e-4, rel_error


def test_yarn_frequencies_and_scales_match_transformers():
    config = hf_config(rope_scaling=YARN)
    rotary = DeepseekV3RotaryEmbedding(config)
    inv_freq, attention_factor = rope_frequencies(ROPE, 10_000.0, YARN)
    np.testing.assert_allclose(inv_freq, rotary.inv_freq.numpy(), rtol=1e-6)
    assert attention_factor == pytest.approx(rotary.attention_scaling)
    assert attention_factor != pytest.approx(1.0)
    hf_scale = DeepseekV3Attention(config, layer_idx=0).scaling
    assert softmax_scale(NOPE + ROPE, YARN) == pytest.approx(hf_scale)
    assert hf_scale != pytest.approx((NOPE + ROPE) ** -0.5)


# ---------------------------------------------------------------------------------------------
# Packing, parameters, options.


@pytest.mark.parametrize("rope_scaling", [None, YARN], ids=["plain", "yarn"])
def test_two_packed_documents_equal_each_alone(rope_scaling):
    layer = mla(rope_scaling=rope_scaling)
    apply = nnx.jit(lambda m, x, p, s: m(x, p, s))
    a, b = tokens(2, (1, 5, D)), tokens(3, (1, 7, D))

    def alone(x):
        length = x.shape[1]
        return apply(layer, x, jnp.arange(length)[None], jnp.ones((1, length), jnp.int32))

    packed = apply(
        layer,
        jnp.concatenate([a, b], axis=1),
        jnp.concatenate([jnp.arange(5), jnp.arange(7)])[None],
        jnp.array([[1] * 5 + [2] * 7]),
    )
    np.testing.assert_allclose(packed[:, :5], alone(a), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[:, 5:], alone(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_lora_rank", [Q_LORA, None], ids=["q-lora", "no-q-lora"])
def test_parameter_shapes_and_logical_axes(q_lora_rank):
    layer = mla(q_lora_rank)
    expected = {
        "kv_a_proj.kernel": ((D, KV_LORA + ROPE), ("embed", "kv_lora")),
        "kv_a_norm.scale": ((KV_LORA,), ("norm",)),
        "kv_b_proj.kernel": ((KV_LORA, HEADS, NOPE + V), ("kv_lora", "heads", "head_dim")),
        "o_proj.kernel": ((HEADS, V, D), ("heads", "head_dim", "embed")),
    }
    if q_lora_rank is None:
        expected["q_proj.kernel"] = ((D, HEADS, NOPE + ROPE), ("embed", "heads", "head_dim"))
    else:
        expected["q_a_proj.kernel"] = ((D, Q_LORA), ("embed", "q_lora"))
        expected["q_a_norm.scale"] = ((Q_LORA,), ("norm",))
        expected["q_b_proj.kernel"] = ((Q_LORA, HEADS, NOPE + ROPE), ("q_lora", "heads", "head_dim"))
    actual = {}
    for path, variable in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
        axes = variable.get_metadata()["logical_axes"]
        assert len(axes) == variable[...].ndim
        assert all(name in DEFAULT_RULES for name in axes)
        logical_to_spec(axes)
        actual[".".join(map(str, path))] = (variable[...].shape, axes)
    assert actual == expected


def test_keys_and_values_come_from_the_latents_alone():
    layer = mla()
    x = tokens(4, (2, 6, D))
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    kv, k_rope = layer._latents(x, positions)
    assert kv.shape == (2, 6, KV_LORA) and k_rope.shape == (2, 6, ROPE)
    k, v = layer._keys_values(x, positions)
    assert k.shape == (2, 6, HEADS, NOPE + ROPE) and v.shape == (2, 6, HEADS, V)
    # every head shares the rotated rope part of the key
    np.testing.assert_array_equal(k[..., NOPE:], jnp.broadcast_to(k_rope[:, :, None], (2, 6, HEADS, ROPE)))


def test_rejects_unsupported_rope_scaling():
    with pytest.raises(ValueError, match="yarn"):
        mla(rope_scaling={"type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="unknown"):
        mla(rope_scaling={**YARN, "low_freq_factor": 1.0})
