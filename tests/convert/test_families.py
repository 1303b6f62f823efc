"""Which HF architecture an nnxlm model exports as, from its attention options and MLP."""

import fiddle as fdl
import pytest
from flax import nnx

from nnxlm.convert.families import family_of_model
from nnxlm.errors import UserError
from nnxlm.modules.moe import MoE
from nnxlm.recipes import models

LLAMA3 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


def tiny(moe=None, **options):
    cfg = models.llama(
        vocab_size=11, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=8, head_dim=8, **options
    )
    if moe is not None:
        cfg.block.mlp = fdl.Partial(
            MoE, num_experts=4, num_experts_per_token=2, expert_hidden_dim=8, router="softmax", normalize_top_k=moe
        )
    return nnx.eval_shape(lambda: fdl.build(cfg)(rngs=nnx.Rngs(0)))


@pytest.mark.parametrize(
    "model, architecture",
    [
        (dict(), "LlamaForCausalLM"),
        (dict(rope_scaling={**LLAMA3, "original_max_position_embeddings": 8192}), "LlamaForCausalLM"),
        (dict(sliding_window=8), "MistralForCausalLM"),
        (dict(qkv_bias=True), "Qwen2ForCausalLM"),
        (dict(qk_norm=True), "Qwen3ForCausalLM"),
        (dict(moe=True), "MixtralForCausalLM"),
        (dict(moe=True, sliding_window=8), "MixtralForCausalLM"),
        (dict(moe=False, qk_norm=True), "Qwen3MoeForCausalLM"),
        (dict(moe=True, qk_norm=True), "Qwen3MoeForCausalLM"),
    ],
)
def test_models_export_as_the_family_with_their_options(model, architecture):
    assert family_of_model(tiny(**model)).architecture == architecture


@pytest.mark.parametrize(
    "model", [dict(qk_norm=True, sliding_window=8), dict(qkv_bias=True, qk_norm=True), dict(moe=False)]
)
def test_models_no_family_holds_are_refused(model):
    with pytest.raises(UserError, match="matches no Hugging Face architecture"):
        family_of_model(tiny(**model))
