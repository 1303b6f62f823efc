"""Qwen 3 MoE (Qwen3MoeForCausalLM): Qwen 3 attention (per-head qk RMSNorm) with a top-k mixture of
SwiGLU experts in every layer, routed by a softmax whose top-k weights are renormalised when
norm_topk_prob. With use_sliding_window, every layer has the sliding window (transformers'
Qwen3MoeAttention has no max_window_layers)."""

import fiddle as fdl
from flax import nnx

from nnxlm.convert.families import Family, Tensor, first, require
from nnxlm.convert.llama import (
    LAYER,
    attention_and_norm_tensors,
    attention_is,
    llama_hf_config,
    llama_recipe,
    model_tensors,
)
from nnxlm.convert.mistral import sliding_window
from nnxlm.convert.qwen3 import qk_norm_tensors
from nnxlm.errors import UserError
from nnxlm.modules import Attention
from nnxlm.modules.moe import MoE


def qwen3_moe_recipe(config: dict) -> fdl.Partial:
    require(config, "decoder_sparse_step", (1, None))
    if config.get("mlp_only_layers"):
        raise UserError(
            f"config.json mlp_only_layers={config['mlp_only_layers']!r} is not supported for "
            "Qwen3MoeForCausalLM: nnxlm supports a mixture of experts in every layer ([])"
        )
    window = sliding_window(config) if config.get("use_sliding_window") else None
    options = {"sliding_window": window} if window else {}
    cfg = llama_recipe({**config, "intermediate_size": config["moe_intermediate_size"]}, qk_norm=True, **options)
    cfg.block.mlp = fdl.Partial(
        MoE,
        num_experts=config.get("num_experts") or config["num_local_experts"],  # transformers 5 writes the latter
        num_experts_per_token=config["num_experts_per_tok"],
        expert_hidden_dim=config["moe_intermediate_size"],
        router="softmax",
        normalize_top_k=bool(config.get("norm_topk_prob", False)),
    )
    return cfg


def qwen3_moe_hf_config(model: nnx.Module) -> dict:
    moe = first(model, MoE)
    config = llama_hf_config(model)
    config.update(
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        intermediate_size=moe.gate.shape[-1],  # of dense layers, of which there are none
        moe_intermediate_size=moe.gate.shape[-1],
        num_experts=moe.num_experts,
        num_experts_per_tok=moe.num_experts_per_token,
        norm_topk_prob=moe.normalize_top_k,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        use_sliding_window=first(model, Attention).sliding_window is not None,
        sliding_window=first(model, Attention).sliding_window,
        max_window_layers=model.num_layers,
        router_aux_loss_coef=0.001,
    )
    config.pop("mlp_bias")
    return config


def qwen3_moe_tensors(config: dict) -> tuple[list[Tensor], list[Tensor]]:
    model = model_tensors(tied=bool(config.get("tie_word_embeddings", False)))
    mlp = LAYER + "mlp."
    experts = [
        Tensor(mlp + "gate.weight", ("mlp", "router")),
        Tensor(mlp + "experts.{e}.gate_proj.weight", ("mlp", "gate")),
        Tensor(mlp + "experts.{e}.up_proj.weight", ("mlp", "up")),
        Tensor(mlp + "experts.{e}.down_proj.weight", ("mlp", "down")),
    ]
    return model, attention_and_norm_tensors() + qk_norm_tensors() + experts


def is_softmax_moe(model: nnx.Module) -> bool:
    """A Mixtral / Qwen 3 MoE layer: softmax router over routed SwiGLU experts only."""
    moe = first(model, MoE)
    return (
        moe is not None
        and moe.router_type == "softmax"
        and moe.shared is None
        and moe.router_bias is None
        and moe.activation == "silu"
        and moe.routed_scaling_factor == 1.0
    )


def is_qwen3_moe(model: nnx.Module) -> bool:
    return is_softmax_moe(model) and attention_is(model, qk_norm=True, sliding_window=None)


QWEN3_MOE = Family(
    "Qwen3MoeForCausalLM", "qwen3_moe", qwen3_moe_recipe, qwen3_moe_hf_config, qwen3_moe_tensors, is_qwen3_moe
)
