from transformers import MixtralConfig, MixtralForCausalLM

from tests.convert.harness import check_round_trip, perturbed


def test_mixtral_round_trip(tmp_path):
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
    )
    check_round_trip(perturbed(MixtralForCausalLM(config)), tmp_path)
