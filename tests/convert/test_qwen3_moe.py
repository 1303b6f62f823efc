import json

import pytest
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from nnxlm.errors import UserError
from tests.convert.harness import check_round_trip, perturbed


def tiny_qwen3_moe(**changes):
    config = dict(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=96,
        moe_intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        rms_norm_eps=1e-6,
        rope_theta=1000.0,
    )
    return perturbed(Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**config, **changes})))


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_qwen3_moe_round_trip(tmp_path, norm_topk_prob):
    check_round_trip(tiny_qwen3_moe(norm_topk_prob=norm_topk_prob), tmp_path, new_tokens=20 if norm_topk_prob else 6)
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["norm_topk_prob"] is norm_topk_prob


@pytest.mark.parametrize(
    "changes, field",
    [({"decoder_sparse_step": 2}, "decoder_sparse_step=2"), ({"mlp_only_layers": [1]}, "mlp_only_layers")],
)
def test_dense_layers_are_rejected(tmp_path, changes, field):
    from nnxlm.convert import from_hf

    tiny_qwen3_moe(**changes).save_pretrained(tmp_path / "hf")
    with pytest.raises(UserError, match=field):
        from_hf(str(tmp_path / "hf"), str(tmp_path / "run"))


def test_a_sliding_window_applies_to_every_layer_and_exports():
    import fiddle as fdl
    from flax import nnx

    from nnxlm.convert.qwen3_moe import qwen3_moe_hf_config, qwen3_moe_recipe

    config = tiny_qwen3_moe().config.to_dict()  # transformers' Qwen3MoeAttention: no max_window_layers
    assert qwen3_moe_recipe(config).block.attention.sliding_window is None
    cfg = qwen3_moe_recipe({**config, "use_sliding_window": True, "sliding_window": 8})
    assert cfg.block.attention.sliding_window == 8
    exported = qwen3_moe_hf_config(nnx.eval_shape(lambda: fdl.build(cfg)(rngs=nnx.Rngs(0))))
    assert (exported["use_sliding_window"], exported["sliding_window"]) == (True, 8)
