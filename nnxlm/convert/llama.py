"""Llama 2 / Llama 3 (LlamaForCausalLM): RMSNorm pre-norm, rotary GQA, SwiGLU."""

import fiddle as fdl
from flax import nnx

from nnxlm.convert.families import Family, Tensor, first, require
from nnxlm.errors import UserError
from nnxlm.modules import Attention, GatedMLP
from nnxlm.modules.moe import MoE
from nnxlm.recipes import models


def rope_theta(config: dict) -> float:
    """The RoPE base, from transformers' `rope_parameters` or the older top-level fields."""
    parameters = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = parameters.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise UserError(f"rope scaling {kind!r} is not supported yet: convert a model without rope_scaling")
    return float(parameters.get("rope_theta", config.get("rope_theta", 10_000.0)))


def llama_recipe(config: dict) -> fdl.Partial:
    require(config, "hidden_act", ("silu",))
    require(config, "attention_bias", (False, None))
    require(config, "mlp_bias", (False, None))
    heads = config["num_attention_heads"]
    return models.llama(
        vocab_size=config["vocab_size"],
        d_model=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        mlp_dim=config["intermediate_size"],
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        rope_theta=rope_theta(config),
        norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def llama_hf_config(model: nnx.Module) -> dict:
    attention, mlp = first(model, Attention), first(model, GatedMLP)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model.vocab_size,
        "hidden_size": model.d_model,
        "intermediate_size": mlp.gate.shape[-1] if mlp is not None else None,  # None: experts instead
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": attention.num_heads,
        "num_key_value_heads": attention.num_kv_heads,
        "head_dim": attention.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": model.final_norm.eps,
        "rope_theta": attention.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": attention.rope_theta},
        "tie_word_embeddings": model.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "max_position_embeddings": 8192,
        "torch_dtype": "float32",
    }


def llama_tensors(config: dict) -> tuple[list[Tensor], list[Tensor]]:
    model = [
        Tensor("model.embed_tokens.weight", ("embedder", "embedding"), None),
        Tensor("model.norm.weight", ("final_norm", "scale"), None),
    ]
    if not config.get("tie_word_embeddings", False):
        model.append(Tensor("lm_head.weight", ("head",), 1))
    mlp = [
        Tensor(LAYER + "mlp.gate_proj.weight", ("mlp", "gate")),
        Tensor(LAYER + "mlp.up_proj.weight", ("mlp", "up")),
        Tensor(LAYER + "mlp.down_proj.weight", ("mlp", "down")),
    ]
    return model, attention_and_norm_tensors() + mlp


LAYER = "model.layers.{i}."


def attention_and_norm_tensors() -> list[Tensor]:
    """A Llama layer's attention projections and its two norms (shared by the Llama-like families)."""
    return [
        Tensor(LAYER + "self_attn.q_proj.weight", ("attention", "q_proj")),
        Tensor(LAYER + "self_attn.k_proj.weight", ("attention", "k_proj")),
        Tensor(LAYER + "self_attn.v_proj.weight", ("attention", "v_proj")),
        Tensor(LAYER + "self_attn.o_proj.weight", ("attention", "o_proj"), 2),
        Tensor(LAYER + "input_layernorm.weight", ("attention_norm", "scale"), None),
        Tensor(LAYER + "post_attention_layernorm.weight", ("mlp_norm", "scale"), None),
    ]


def is_llama(model: nnx.Module) -> bool:
    mlp = first(model, GatedMLP)
    return first(model, MoE) is None and mlp is not None and mlp.activation == "silu"


LLAMA = Family("LlamaForCausalLM", "llama", llama_recipe, llama_hf_config, llama_tensors, is_llama)
