"""Gemma 1 / 2 / 3 (GemmaForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, text only): embeddings
times sqrt(hidden_size), RMSNorm x * (1 + w), tanh-GELU GeGLU, a tied head. Gemma 2 adds a norm on
each branch's output, attention and final-logit soft-capping, query_pre_attn_scalar and alternating
local (sliding-window) and global layers; Gemma 3 adds per-head qk norms and a RoPE base of its own
for the local layers (rope scaling on global layers only). HF's per-layer `layer_types` become the
Transformer's layer_pattern, its shortest period."""

from flax import nnx

from nnxlm.convert.families import Family, Tensor, first, period, require
from nnxlm.convert.llama import LAYER, mlp_tensors, model_tensors, projection_tensors, rope_hf_config, rope_settings
from nnxlm.convert.qwen3 import qk_norm_tensors
from nnxlm.errors import UserError
from nnxlm.modules import Attention, DecoderBlock, GatedMLP, RMSNorm, Transformer
from nnxlm.recipes import models

# "gelu" is Gemma 1's legacy name of the tanh form (transformers reads it so); Gemma 2 / 3 take it literally
ACTIVATIONS = ("gelu_pytorch_tanh",)
LAYER_TYPES = ("sliding_attention", "full_attention")


def shape(config: dict, legacy_gelu: bool = False) -> dict:
    require(config, "attention_bias", (False, None))
    field = "hidden_act" if legacy_gelu else "hidden_activation"  # Gemma 1 reads hidden_act
    activation = config.get(field)
    if activation not in ACTIVATIONS + (("gelu",) if legacy_gelu else ()):
        raise UserError(f"config.json {field}={activation!r} is not supported for Gemma: use gelu_pytorch_tanh")
    heads = config["num_attention_heads"]
    return dict(
        vocab_size=config["vocab_size"],
        d_model=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        mlp_dim=config["intermediate_size"],
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(config.get("tie_word_embeddings", True)),
    )


def gemma_recipe(config: dict):
    theta, scaling = rope_settings(config)
    if scaling:
        raise UserError("config.json rope scaling is not supported for Gemma 1: remove rope_scaling")
    return models.gemma(**shape(config, legacy_gelu=True), rope_theta=theta)


def layer_types(config: dict) -> list[str]:
    types = config.get("layer_types")
    if not types or len(types) != config["num_hidden_layers"] or set(types) - set(LAYER_TYPES):
        raise UserError(f"config.json layer_types={types!r} is not supported: list one of {LAYER_TYPES} a layer")
    return types


def sliding_window(config: dict) -> int:
    window = config.get("sliding_window")
    if not isinstance(window, int) or window < 1:
        raise UserError(f"config.json sliding_window={window!r} is not supported: use a positive integer")
    return window


def softcaps(config: dict) -> dict:
    caps = dict(
        attn_softcap=config.get("attn_logit_softcapping"), final_logit_softcap=config.get("final_logit_softcapping")
    )
    for field, cap in zip(("attn_logit_softcapping", "final_logit_softcapping"), caps.values(), strict=True):
        if cap is not None and not (isinstance(cap, (int, float)) and cap > 0):
            raise UserError(f"config.json {field}={cap!r} is not supported: use a positive number or null")
    return {name: float(cap) for name, cap in caps.items() if cap is not None}


def gemma2_recipe(config: dict):
    theta, scaling = rope_settings(config)
    if scaling:
        raise UserError("config.json rope scaling is not supported for Gemma 2: remove rope_scaling")
    if config.get("use_bidirectional_attention"):
        raise UserError("config.json use_bidirectional_attention=true is not supported: nnxlm decodes causally")
    types, window = layer_types(config), sliding_window(config)
    entry = {"sliding_attention": {"sliding_window": window}, "full_attention": {"sliding_window": None}}
    pattern = tuple(entry[kind] for kind in types[: period(types)])
    return models.gemma(
        **shape(config),
        rope_theta=theta,
        post_norms=True,
        query_pre_attn_scalar=config.get("query_pre_attn_scalar", 256),
        layer_pattern=pattern,
        **softcaps(config),
    )


def gemma3_rope(config: dict) -> dict:
    """layer type -> (rope_theta, nnxlm rope scaling) from rope_parameters keyed by layer type, or
    the older rope_theta / rope_local_base_freq / rope_scaling fields."""
    parameters = config.get("rope_parameters") or {}
    if set(parameters) <= set(LAYER_TYPES) and parameters:
        return {kind: rope_settings({"rope_parameters": parameters.get(kind) or {}}) for kind in LAYER_TYPES}
    full = rope_settings({**config, "rope_theta": config.get("rope_theta", 1_000_000.0)})
    return {"sliding_attention": (float(config.get("rope_local_base_freq", 10_000.0)), None), "full_attention": full}


def gemma3_recipe(config: dict):
    if config.get("use_bidirectional_attention"):
        raise UserError("config.json use_bidirectional_attention=true is not supported: nnxlm decodes causally")
    types, window, rope = layer_types(config), sliding_window(config), gemma3_rope(config)
    entry = {
        kind: {
            "sliding_window": window if kind == "sliding_attention" else None,
            "rope_theta": theta,
            "rope_scaling": scaling,
        }
        for kind, (theta, scaling) in rope.items()
    }
    pattern = tuple(entry[kind] for kind in types[: period(types)])
    return models.gemma(
        **shape(config),
        rope_theta=rope["full_attention"][0],
        post_norms=True,
        qk_norm=True,
        query_pre_attn_scalar=config.get("query_pre_attn_scalar", 256),
        layer_pattern=pattern,
        **softcaps(config),
    )


def common_hf_config(model: Transformer, architecture: str, model_type: str) -> dict:
    attention, mlp = first(model, Attention), first(model, GatedMLP)
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": model.vocab_size,
        "hidden_size": model.d_model,
        "intermediate_size": mlp.gate.shape[-1],
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": attention.num_heads,
        "num_key_value_heads": attention.num_kv_heads,
        "head_dim": attention.head_dim,
        "rms_norm_eps": model.final_norm.eps,
        "tie_word_embeddings": model.tie_embeddings,
        "attention_bias": False,
        "max_position_embeddings": 8192,
        "torch_dtype": "float32",
    }


def gemma_hf_config(model: Transformer) -> dict:
    config = common_hf_config(model, "GemmaForCausalLM", "gemma")
    return {**config, "hidden_act": "gelu_pytorch_tanh", **rope_hf_config(first(model, Attention))}


def hf_layer_types(model: Transformer) -> tuple[list[str], int | None]:
    settings = model.layer_settings()
    windows = {s["sliding_window"] for s in settings} - {None}
    if len(windows) > 1:
        raise UserError(f"layers with sliding windows {sorted(windows)} do not export to Gemma: use one window")
    types = ["full_attention" if s["sliding_window"] is None else "sliding_attention" for s in settings]
    return types, (windows.pop() if windows else None)


def query_pre_attn_scalar(attention: Attention) -> int | float:
    scalar = attention.query_pre_attn_scalar or attention.head_dim
    return int(scalar) if float(scalar).is_integer() else scalar  # transformers wants an int


def gemma2_hf_config(model: Transformer) -> dict:
    attention = first(model, Attention)
    types, window = hf_layer_types(model)
    return {
        **common_hf_config(model, "Gemma2ForCausalLM", "gemma2"),
        "hidden_activation": "gelu_pytorch_tanh",
        **rope_hf_config(attention),
        "query_pre_attn_scalar": query_pre_attn_scalar(attention),
        "attn_logit_softcapping": attention.softcap,
        "final_logit_softcapping": model.final_logit_softcap,
        "sliding_window": window or 4096,
        "layer_types": types,
    }


def gemma3_hf_config(model: Transformer) -> dict:
    attention = first(model, Attention)
    types, window = hf_layer_types(model)
    rope = {}
    for kind, settings in zip(types, model.layer_settings(), strict=True):
        scaling = settings["rope_scaling"] or {"type": "default"}
        parameters = {"rope_type": scaling["type"], "rope_theta": settings["rope_theta"]}
        parameters.update({k: v for k, v in scaling.items() if k != "type"})
        if rope.setdefault(kind, parameters) != parameters:
            raise UserError(f"{kind} layers with different RoPE settings do not export to Gemma 3")
    for kind in LAYER_TYPES:
        rope.setdefault(kind, {"rope_type": "default", "rope_theta": attention.rope_theta})
    return {
        **common_hf_config(model, "Gemma3ForCausalLM", "gemma3_text"),
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_parameters": rope,
        "query_pre_attn_scalar": query_pre_attn_scalar(attention),
        "attn_logit_softcapping": attention.softcap,
        "final_logit_softcapping": model.final_logit_softcap,
        "sliding_window": window or 4096,
        "layer_types": types,
    }


def gemma_tensors(config: dict, post_norms: bool = False, qk_norm: bool = False):
    model = model_tensors(tied=bool(config.get("tie_word_embeddings", True)))
    layer = [
        *projection_tensors(),
        *mlp_tensors(),
        Tensor(LAYER + "input_layernorm.weight", ("attention_norm", "scale"), None),
    ]
    if post_norms:  # Gemma 2 / 3: post_attention_layernorm normalises the attention's output
        layer += [
            Tensor(LAYER + "post_attention_layernorm.weight", ("post_attention_norm", "scale"), None),
            Tensor(LAYER + "pre_feedforward_layernorm.weight", ("mlp_norm", "scale"), None),
            Tensor(LAYER + "post_feedforward_layernorm.weight", ("post_mlp_norm", "scale"), None),
        ]
    else:
        layer.append(Tensor(LAYER + "post_attention_layernorm.weight", ("mlp_norm", "scale"), None))
    return model, layer + (qk_norm_tensors() if qk_norm else [])


def is_gemma_like(model: nnx.Module, *, post_norms: bool, qk_norm: bool) -> bool:
    """Gemma's embedding scale, (1 + w) norms and tanh-GELU GeGLU, with these block options."""
    if not isinstance(model, Transformer) or not model.embed_scale:
        return False
    attention, mlp, block = first(model, Attention), first(model, GatedMLP), first(model, DecoderBlock)
    if attention is None or mlp is None or block is None or mlp.activation != "gelu_tanh" or attention.qkv_bias:
        return False
    norm = model.final_norm
    if not (isinstance(norm, RMSNorm) and norm.offset == 1.0) or block.post_norms != post_norms:
        return False
    if (attention.q_norm is not None) != qk_norm:
        return False
    return not qk_norm or (isinstance(attention.q_norm, RMSNorm) and attention.q_norm.offset == 1.0)


def is_gemma(model: nnx.Module) -> bool:
    if not is_gemma_like(model, post_norms=False, qk_norm=False):
        return False
    attention = first(model, Attention)
    plain = attention.softcap is None and attention.query_pre_attn_scalar in (None, attention.head_dim)
    return plain and model.final_logit_softcap is None and model.layer_pattern is None and not attention.rope_scaling


def is_gemma2(model: nnx.Module) -> bool:
    if not is_gemma_like(model, post_norms=True, qk_norm=False):
        return False
    settings = model.layer_settings()
    return all(s["rope_theta"] == settings[0]["rope_theta"] and not s["rope_scaling"] for s in settings)


def is_gemma3(model: nnx.Module) -> bool:
    return is_gemma_like(model, post_norms=True, qk_norm=True)


GEMMA = Family("GemmaForCausalLM", "gemma", gemma_recipe, gemma_hf_config, gemma_tensors, is_gemma)
GEMMA2 = Family(
    "Gemma2ForCausalLM",
    "gemma2",
    gemma2_recipe,
    gemma2_hf_config,
    lambda config: gemma_tensors(config, post_norms=True),
    is_gemma2,
)
GEMMA3 = Family(
    "Gemma3ForCausalLM",
    "gemma3_text",
    gemma3_recipe,
    gemma3_hf_config,
    lambda config: gemma_tensors(config, post_norms=True, qk_norm=True),
    is_gemma3,
)
