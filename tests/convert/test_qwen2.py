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


def test_qwen2_sliding_window_is_rejected(tmp_path):
    from nnxlm.convert import from_hf

    tiny_qwen2(use_sliding_window=True, sliding_window=8).save_pretrained(tmp_path / "hf")
    with pytest.raises(UserError, match="use_sliding_window=True is not supported"):
        from_hf(str(tmp_path / "hf"), str(tmp_path / "run"))
