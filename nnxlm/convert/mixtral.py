"""Mixtral (MixtralForCausalLM): a Llama whose MLP is a top-k sparse mixture of SwiGLU experts,
routed by a softmax whose top-k weights are renormalised to sum to 1; attention as Mistral's
(an optional sliding window)."""

import fiddle as fdl
from flax import nnx

from nnxlm.convert.families import Family, Tensor, first
from nnxlm.convert.llama import (
    LAYER,
    attention_and_norm_tensors,
    attention_is,
    llama_hf_config,
    llama_recipe,
    model_tensors,
)
from nnxlm.convert.mistral import sliding_window
from nnxlm.convert.qwen3_moe import is_softmax_moe
from nnxlm.modules import Attention
from nnxlm.modules.moe import MoE


def mixtral_recipe(config: dict) -> fdl.Partial:
    window = sliding_window(config)
    cfg = llama_recipe(config, **({"sliding_window": window} if window else {}))
    cfg.block.mlp = fdl.Partial(
        MoE,
        num_experts=config["num_local_experts"],
        num_experts_per_token=config["num_experts_per_tok"],
        expert_hidden_dim=config["intermediate_size"],
        router="softmax",
        normalize_top_k=True,
    )
    return cfg


def mixtral_hf_config(model: nnx.Module) -> dict:
    moe = first(model, MoE)
    config = llama_hf_config(model)
    config.update(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        intermediate_size=moe.gate.shape[-1],
        num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.num_experts_per_token,
        sliding_window=first(model, Attention).sliding_window,
        router_aux_loss_coef=0.001,
    )
    for field in ("attention_bias", "mlp_bias"):
        config.pop(field)
    return config


def mixtral_tensors(config: dict) -> tuple[list[Tensor], list[Tensor]]:
    model = model_tensors(tied=bool(config.get("tie_word_embeddings", False)))
    moe = LAYER + "block_sparse_moe."
    experts = [
        Tensor(moe + "gate.weight", ("mlp", "router")),
        Tensor(moe + "experts.{e}.w1.weight", ("mlp", "gate")),
        Tensor(moe + "experts.{e}.w3.weight", ("mlp", "up")),
        Tensor(moe + "experts.{e}.w2.weight", ("mlp", "down")),
    ]
    return model, attention_and_norm_tensors() + experts


def is_mixtral(model: nnx.Module) -> bool:
    return is_softmax_moe(model) and first(model, MoE).normalize_top_k and attention_is(model, sliding_window=None)


MIXTRAL = Family("MixtralForCausalLM", "mixtral", mixtral_recipe, mixtral_hf_config, mixtral_tensors, is_mixtral)
