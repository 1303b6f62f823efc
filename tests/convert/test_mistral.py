import json

from transformers import MistralConfig, MistralForCausalLM

from tests.convert.harness import TINY_SHAPE, check_round_trip, perturbed


def tiny_mistral(**changes):
    config = dict(
        **TINY_SHAPE,
        rms_norm_eps=1e-5,
        rope_theta=500.0,
        sliding_window=8,  # shorter than the 16-token prompt
    )
    return perturbed(MistralForCausalLM(MistralConfig(**{**config, **changes})))


def test_mistral_with_a_sliding_window_round_trip(tmp_path):
    check_round_trip(tiny_mistral(), tmp_path)
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"] and config["sliding_window"] == 8


def test_mistral_without_a_sliding_window_exports_as_llama(tmp_path):
    check_round_trip(tiny_mistral(sliding_window=None), tmp_path, new_tokens=4)
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
