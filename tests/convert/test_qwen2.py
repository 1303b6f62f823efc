import json

import pytest
from transformers import Qwen2Config, Qwen2ForCausalLM

from nnxlm.errors import UserError
from tests.convert.harness import TINY_SHAPE, check_round_trip, perturbed


def tiny_qwen2(**changes):
    config = dict(
        **TINY_SHAPE,
        rms_norm_eps=1e-6,
        rope_theta=1000.0,
        tie_word_embeddings=True,  # as the 0.5 B - 3 B models
    )
    return perturbed(Qwen2ForCausalLM(Qwen2Config(**{**config, **changes})))


def test_qwen2_round_trip(tmp_path):
    model = tiny_qwen2()
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    check_round_trip(model, tmp_path)
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["tie_word_embeddings"] is True


def test_qwen2_untied_round_trip(tmp_path):
    check_round_trip(tiny_qwen2(tie_word_embeddings=False), tmp_path, new_tokens=4)


def test_qwen2_sliding_window_on_the_layers_from_max_window_layers(tmp_path):
    # layer 0 global, layers 1 and 2 a 6-token window: the prompt and generation run far past it
    model = tiny_qwen2(num_hidden_layers=3, use_sliding_window=True, sliding_window=6, max_window_layers=1)
    check_round_trip(model, tmp_path)
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert (config["use_sliding_window"], config["sliding_window"], config["max_window_layers"]) == (True, 6, 1)
    assert config["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention"]


@pytest.mark.parametrize(
    "changes, windows",
    [
        ({}, None),
        ({"use_sliding_window": True, "max_window_layers": 4}, None),  # no layer from 4 on
        ({"use_sliding_window": True, "max_window_layers": 0}, [8]),
        ({"use_sliding_window": True, "max_window_layers": 2}, [None, None, 8, 8]),
        ({"use_sliding_window": True, "layer_types": ["full_attention", "sliding_attention"] * 2}, [None, 8]),
    ],
)
def test_qwen_configs_give_per_layer_windows(changes, windows):
    from nnxlm.convert.qwen3 import qwen3_recipe

    config = {**TINY_SHAPE, "hidden_act": "silu", "num_hidden_layers": 4, "sliding_window": 8, "max_window_layers": 28}
    config.update(changes)
    pattern = qwen3_recipe(config).layer_pattern  # the shortest period of the per-layer windows
    assert (None if pattern is None else [entry["sliding_window"] for entry in pattern]) == windows


def test_windows_not_on_the_last_layers_do_not_export():
    import fiddle as fdl
    from flax import nnx

    from nnxlm.convert.qwen2 import qwen2_hf_config, qwen2_recipe

    cfg = qwen2_recipe({**TINY_SHAPE, "hidden_act": "silu", "num_hidden_layers": 2})
    cfg.layer_pattern = ({"sliding_window": 8}, {"sliding_window": None})
    with pytest.raises(UserError, match="one window on the last layers only"):
        qwen2_hf_config(nnx.eval_shape(lambda: fdl.build(cfg)(rngs=nnx.Rngs(0))))
