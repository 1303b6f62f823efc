"""Llama 2 / 3 / 3.1-3.3 (LlamaForCausalLM): RMSNorm pre-norm, rotary GQA, SwiGLU; Llama 3.1+ with
"llama3" rope scaling. Also the shared pieces of the Llama-like families (Mistral, Qwen, Mixtral)."""

import fiddle as fdl
from flax import nnx

from nnxlm.convert.families import Family, Tensor, first, require
from nnxlm.errors import UserError
from nnxlm.modules import Attention, GatedMLP, RMSNorm
from nnxlm.modules.moe import MoE
from nnxlm.recipes import models

# HF rope_type -> the fields nnxlm.modules.rope reads (besides rope_theta)
ROPE_FIELDS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def rope_settings(config: dict) -> tuple[float, dict | None]:
    """(RoPE base, nnxlm rope scaling or None) from transformers-5 `rope_parameters` or the older
    top-level `rope_theta` and `rope_scaling` fields."""
    merged = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    theta = float(merged.get("rope_theta", config.get("rope_theta", 10_000.0)))
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ROPE_FIELDS:
        supported = ", ".join(map(repr, ("default", *ROPE_FIELDS)))
        raise UserError(f"config.json rope_type={kind!r} is not supported: nnxlm supports {supported}")
    missing = [field for field in ROPE_FIELDS[kind] if merged.get(field) is None]
    if missing:
        raise UserError(f"config.json rope scaling {kind!r} lacks {missing[0]}: the config is incomplete")
    scaling = {"type": kind, **{field: merged[field] for field in ROPE_FIELDS[kind]}}
    return theta, scaling


def rope_theta(config: dict) -> float:
    """The RoPE base (see rope_settings)."""
    return rope_settings(config)[0]


def rope_hf_config(attention: Attention) -> dict:
    """The config.json rope fields of an Attention: rope_parameters (transformers 5) and the older
    top-level rope_theta / rope_scaling."""
    scaling = attention.rope_scaling
    theta = attention.rope_theta
    if not scaling:
        return {"rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    fields = {field: scaling[field] for field in ROPE_FIELDS[scaling["type"]]}
    return {
        "rope_theta": theta,
        "rope_scaling": {"rope_type": scaling["type"], **fields},
        "rope_parameters": {"rope_type": scaling["type"], "rope_theta": theta, **fields},
    }


def llama_recipe(config: dict, **options) -> fdl.Partial:
    """The model recipe of a Llama-like config.json; options (qkv_bias, qk_norm, sliding_window)
    are the attention variants of the families built on it."""
    require(config, "hidden_act", ("silu",))
    if not options.get("qkv_bias"):
        require(config, "attention_bias", (False, None))
    require(config, "mlp_bias", (False, None))
    heads = config["num_attention_heads"]
    theta, scaling = rope_settings(config)
    return models.llama(
        vocab_size=config["vocab_size"],
        d_model=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        mlp_dim=config["intermediate_size"],
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        **options,
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
        **rope_hf_config(attention),
        "tie_word_embeddings": model.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "max_position_embeddings": 8192,
        "torch_dtype": "float32",
    }


def llama_tensors(config: dict) -> tuple[list[Tensor], list[Tensor]]:
    tied = bool(config.get("tie_word_embeddings", False))
    return model_tensors(tied), attention_and_norm_tensors() + mlp_tensors()


LAYER = "model.layers.{i}."


def model_tensors(tied: bool) -> list[Tensor]:
    """The embedding table, the final norm and, unless tied to the embedding, the output head."""
    tensors = [
        Tensor("model.embed_tokens.weight", ("embedder", "embedding"), None),
        Tensor("model.norm.weight", ("final_norm", "scale"), None),
    ]
    return tensors if tied else [*tensors, Tensor("lm_head.weight", ("head",), 1)]


def mlp_tensors() -> list[Tensor]:
    return [
        Tensor(LAYER + "mlp.gate_proj.weight", ("mlp", "gate")),
        Tensor(LAYER + "mlp.up_proj.weight", ("mlp", "up")),
        Tensor(LAYER + "mlp.down_proj.weight", ("mlp", "down")),
    ]


def projection_tensors() -> list[Tensor]:
    return [
        Tensor(LAYER + "self_attn.q_proj.weight", ("attention", "q_proj")),
        Tensor(LAYER + "self_attn.k_proj.weight", ("attention", "k_proj")),
        Tensor(LAYER + "self_attn.v_proj.weight", ("attention", "v_proj")),
        Tensor(LAYER + "self_attn.o_proj.weight", ("attention", "o_proj"), 2),
    ]


def attention_and_norm_tensors() -> list[Tensor]:
    """A Llama layer's attention projections and its two norms (shared by the Llama-like families)."""
    return projection_tensors() + [
        Tensor(LAYER + "input_layernorm.weight", ("attention_norm", "scale"), None),
        Tensor(LAYER + "post_attention_layernorm.weight", ("mlp_norm", "scale"), None),
    ]


def attention_is(
    model: nnx.Module, *, qkv_bias=False, qk_norm=False, sliding_window=False, layer_pattern=False
) -> bool:
    """Whether the model's attention has exactly these options: qkv_bias and qk_norm (an RMSNorm
    with the layers' eps) on or off, sliding_window True (set), False (unset) or None (either), and
    per-layer settings (a Transformer layer_pattern) only where the family has them."""
    attention = first(model, Attention)
    if attention is None or attention.qkv_bias != qkv_bias or (attention.q_norm is not None) != qk_norm:
        return False
    if not layer_pattern and getattr(model, "layer_pattern", None) is not None:
        return False
    if qk_norm and not (isinstance(attention.q_norm, RMSNorm) and attention.q_norm.eps == model.final_norm.eps):
        return False
    return sliding_window is None or (attention.sliding_window is not None) == sliding_window


def is_dense_swiglu(model: nnx.Module) -> bool:
    mlp = first(model, GatedMLP)
    return first(model, MoE) is None and mlp is not None and mlp.activation == "silu"


def is_llama(model: nnx.Module) -> bool:
    return is_dense_swiglu(model) and attention_is(model)


LLAMA = Family("LlamaForCausalLM", "llama", llama_recipe, llama_hf_config, llama_tensors, is_llama)
