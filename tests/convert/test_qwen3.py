import json

from transformers import Qwen3Config, Qwen3ForCausalLM

from tests.convert.harness import TINY_SHAPE, check_round_trip, perturbed


def test_qwen3_round_trip(tmp_path):
    config = Qwen3Config(
        **TINY_SHAPE,
        rms_norm_eps=1e-6,
        rope_theta=1000.0,
        tie_word_embeddings=True,
    )
    check_round_trip(perturbed(Qwen3ForCausalLM(config)), tmp_path)  # perturbed: q_norm / k_norm too
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
