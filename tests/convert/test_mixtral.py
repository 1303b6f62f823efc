import pytest
from transformers import MixtralConfig, MixtralForCausalLM

from tests.convert.harness import check_round_trip, perturbed


@pytest.mark.parametrize("sliding_window", [None, 8])  # 8: shorter than the 16-token prompt
def test_mixtral_round_trip(tmp_path, sliding_window):
    config = MixtralConfig(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        rms_norm_eps=1e-5,
        sliding_window=sliding_window,
    )
    check_round_trip(perturbed(MixtralForCausalLM(config)), tmp_path, new_tokens=20 if sliding_window is None else 8)
