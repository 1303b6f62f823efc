"""Gemma 1 / 2 / 3 round trips: tiny configs with fewer KV heads than query heads, head_dim apart
from hidden / heads, and (Gemma 2 / 3) a 16-token prompt plus 20 generated tokens far longer than
the sliding window, so local and global layers differ in the logits and in cached decoding."""

import json

import pytest
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
)

from nnxlm.convert.gemma import gemma2_recipe, gemma_recipe
from nnxlm.errors import UserError
from tests.convert.harness import check_round_trip, perturbed

SHAPE = dict(vocab_size=101, hidden_size=48, intermediate_size=80, head_dim=16, rms_norm_eps=1e-6)


def exported(tmp_path) -> dict:
    return json.loads((tmp_path / "exported" / "config.json").read_text())


def test_gemma_round_trip(tmp_path):
    config = GemmaConfig(**SHAPE, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, rope_theta=1000.0)
    check_round_trip(perturbed(GemmaForCausalLM(config)), tmp_path)
    assert exported(tmp_path)["architectures"] == ["GemmaForCausalLM"]


def test_gemma2_round_trip(tmp_path):
    config = Gemma2Config(
        **SHAPE,
        num_hidden_layers=3,  # local, global, local
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=5.0,  # small caps: they change the numbers
        final_logit_softcapping=3.0,
        rope_theta=1000.0,
    )
    check_round_trip(perturbed(Gemma2ForCausalLM(config)), tmp_path)
    config = exported(tmp_path)
    assert config["architectures"] == ["Gemma2ForCausalLM"]
    assert config["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert (config["sliding_window"], config["attn_logit_softcapping"]) == (8, 5.0)


def test_gemma3_round_trip(tmp_path):
    config = Gemma3TextConfig(
        **SHAPE,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10_000.0},
        },
    )
    check_round_trip(perturbed(Gemma3ForCausalLM(config)), tmp_path)  # perturbed: q_norm / k_norm too
    config = exported(tmp_path)
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert config["attn_logit_softcapping"] is None and config["final_logit_softcapping"] is None  # the defaults
    assert config["layer_types"][2] == "full_attention" and config["rope_parameters"]["full_attention"]["factor"] == 4.0


def test_gemma2_without_soft_caps(tmp_path):
    config = Gemma2Config(
        **SHAPE,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
    )
    check_round_trip(perturbed(Gemma2ForCausalLM(config)), tmp_path, new_tokens=0)  # decoding: test above
    config = exported(tmp_path)
    assert config["attn_logit_softcapping"] is None and config["final_logit_softcapping"] is None


@pytest.mark.parametrize(
    "recipe, change, field",
    [
        (gemma_recipe, {"hidden_act": "relu"}, "hidden_act"),
        (gemma2_recipe, {"hidden_activation": "gelu"}, "hidden_activation"),
        (gemma2_recipe, {"sliding_window": None}, "sliding_window"),
        (gemma2_recipe, {"layer_types": ["chunked_attention"] * 2}, "layer_types"),
    ],
)
def test_unsupported_gemma_configs_name_the_field(recipe, change, field):
    config = {**SHAPE, "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_activation": "gelu_pytorch_tanh"}
    config.update({"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"], **change})
    with pytest.raises(UserError, match=field):
        recipe(config)
