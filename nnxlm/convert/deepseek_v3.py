"""DeepSeek-V3 (DeepseekV3ForCausalLM): multi-head latent attention in every layer, a SwiGLU MLP in
the first first_k_dense_replace layers and, in the others, a mixture of experts routed by a sigmoid
with a bias-corrected (e_score_correction_bias), group-limited top-k and a routed scaling factor,
plus shared experts; YaRN rope scaling.

DeepSeek's checkpoints also hold the multi-token prediction layers, as HF layers num_hidden_layers
+ k (transformers' DeepseekV3ForCausalLM does not load them): they come in as the model's MTP
module when the weights hold them (whatever num_nextn_predict_layers says) and go back out so.
Each repeats the embedding table and the output head, which nnxlm shares with the main model.
"""

import fiddle as fdl
from flax import nnx

from nnxlm.convert.families import Family, Tensor, first, require
from nnxlm.convert.llama import model_tensors
from nnxlm.errors import UserError
from nnxlm.modules import RMSNorm, Transformer
from nnxlm.modules.mla import MLA, YARN_KEYS
from nnxlm.modules.moe import MoE
from nnxlm.recipes import models

LAYER = "model.layers.{i}."
MTP_MARKER = "eh_proj.weight"  # a tensor every multi-token prediction layer has


def mtp_layers(config: dict, names: set[str]) -> int:
    """How many multi-token prediction layers the checkpoint's tensors hold."""
    count, base = 0, config["num_hidden_layers"]
    while LAYER.format(i=base + count) + MTP_MARKER in names:
        count += 1
    return count


def complete_config(config: dict, names: set[str]) -> dict:
    return {**config, "num_nextn_predict_layers": mtp_layers(config, names)}


def rope(config: dict) -> tuple[float, dict | None]:
    """(RoPE base, MLA rope_scaling) from rope_parameters (transformers 5) or the older top-level
    rope_theta and rope_scaling."""
    merged = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    theta = float(merged.pop("rope_theta", config.get("rope_theta", 10_000.0)))
    kind = merged.pop("rope_type", merged.pop("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise UserError(f"config.json rope_type={kind!r} is not supported for DeepSeek-V3: nnxlm supports yarn")
    unknown = sorted(set(merged) - YARN_KEYS)
    if unknown:
        known = ", ".join(sorted(YARN_KEYS - {"type", "rope_type"}))
        raise UserError(f"config.json yarn rope parameter {unknown[0]!r} is not supported: nnxlm reads {known}")
    if merged.get("original_max_position_embeddings") is None:
        raise UserError("config.json yarn rope scaling lacks original_max_position_embeddings: complete the config")
    if merged.get("factor") is None:  # as transformers: the context extension the config implies
        merged["factor"] = config["max_position_embeddings"] / merged["original_max_position_embeddings"]
    return theta, {"type": "yarn", **{key: value for key, value in merged.items() if value is not None}}


def deepseek_v3_recipe(config: dict) -> fdl.Partial:
    require(config, "hidden_act", ("silu",))
    require(config, "attention_bias", (False, None))
    require(config, "tie_word_embeddings", (False, None))
    require(config, "scoring_func", ("sigmoid", None))  # DeepSeek's own config.json spells out
    require(config, "topk_method", ("noaux_tc", None))  # the routing that transformers implements
    require(config, "moe_layer_freq", (1, None))
    heads, layers = config["num_attention_heads"], config["num_hidden_layers"]
    require(config, "num_key_value_heads", (heads, None))  # MLA: every head its own key and value
    dense = config.get("first_k_dense_replace") or 0
    if not 0 <= dense < layers:
        raise UserError(
            f"config.json first_k_dense_replace={dense} is not supported: nnxlm needs 0 to "
            f"num_hidden_layers - 1 ({layers - 1}) dense layers before the mixture-of-experts ones"
        )
    if not config.get("n_shared_experts"):
        raise UserError("config.json n_shared_experts=0 is not supported for DeepSeek-V3: nnxlm needs 1 or more")
    theta, scaling = rope(config)
    return models.deepseek(
        vocab_size=config["vocab_size"],
        d_model=config["hidden_size"],
        num_layers=layers,
        num_dense_layers=dense,
        num_heads=heads,
        q_lora_rank=config.get("q_lora_rank"),
        kv_lora_rank=config["kv_lora_rank"],
        qk_nope_head_dim=config["qk_nope_head_dim"],
        qk_rope_head_dim=config["qk_rope_head_dim"],
        v_head_dim=config["v_head_dim"],
        mlp_dim=config["intermediate_size"],
        num_experts=config["n_routed_experts"],
        num_experts_per_token=config["num_experts_per_tok"],
        expert_hidden_dim=config["moe_intermediate_size"],
        num_shared_experts=config["n_shared_experts"],
        num_groups=config.get("n_group") or 1,
        num_groups_per_token=config.get("topk_group") or 1,
        routed_scaling_factor=config.get("routed_scaling_factor", 1.0),
        normalize_top_k=bool(config.get("norm_topk_prob", True)),
        rope_theta=theta,
        rope_scaling=scaling,
        rope_interleave=config.get("rope_interleave", True) is not False,
        norm_eps=config.get("rms_norm_eps", 1e-6),
        mtp_depth=config.get("num_nextn_predict_layers") or 0,
    )


def _dense_mlp(model: Transformer):
    if not model.num_first_layers:
        return None
    return model.first_layers.mlp if model.scan_layers else model.first_layers[0].mlp


def rope_hf_config(attention: MLA) -> dict:
    theta, scaling = attention.rope_theta, attention.rope_scaling
    if not scaling:
        return {"rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    fields = {key: value for key, value in scaling.items() if key not in ("type", "rope_type")}
    return {
        "rope_theta": theta,
        "rope_scaling": {"rope_type": "yarn", **fields},
        "rope_parameters": {"rope_type": "yarn", "rope_theta": theta, **fields},
        "max_position_embeddings": round(fields["factor"] * fields["original_max_position_embeddings"]),
    }


def deepseek_v3_hf_config(model: Transformer) -> dict:
    attention, moe, dense = first(model, MLA), first(model, MoE), _dense_mlp(model)
    expert_width, shared_width = moe.gate.shape[-1], moe.shared.gate.shape[-1]
    if shared_width % expert_width:
        raise UserError(
            f"shared experts {shared_width} wide do not export to DeepSeek-V3: use a multiple of the "
            f"routed experts' width {expert_width}"
        )
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": model.vocab_size,
        "hidden_size": model.d_model,
        "intermediate_size": dense.gate.shape[-1] if dense is not None else expert_width,
        "moe_intermediate_size": expert_width,
        "num_hidden_layers": model.num_layers,
        "first_k_dense_replace": model.num_first_layers,
        "num_attention_heads": attention.num_heads,
        "num_key_value_heads": attention.num_heads,
        "q_lora_rank": attention.q_lora_rank,
        "kv_lora_rank": attention.kv_lora_rank,
        "qk_nope_head_dim": attention.qk_nope_head_dim,
        "qk_rope_head_dim": attention.qk_rope_head_dim,
        "v_head_dim": attention.v_head_dim,
        "rope_interleave": attention.rope_interleave,
        "n_routed_experts": moe.num_experts,
        "num_experts_per_tok": moe.num_experts_per_token,
        "n_shared_experts": shared_width // expert_width,
        "n_group": moe.num_groups,
        "topk_group": moe.num_groups_per_token,
        "routed_scaling_factor": moe.routed_scaling_factor,
        "norm_topk_prob": moe.normalize_top_k,
        "num_nextn_predict_layers": model.mtp_depth,
        "hidden_act": "silu",
        "rms_norm_eps": model.final_norm.eps,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "max_position_embeddings": 4096,
        **rope_hf_config(attention),
        "torch_dtype": "float32",
    }


def block_tensors(config: dict, experts: bool, stack=("layers",), first_index=0, within=()) -> list[Tensor]:
    """One stack's decoder-block tensors: attention, norms and a dense MLP or the experts; `within`
    is the block's path inside an entry of the stack."""
    rules = [
        ("input_layernorm.weight", ("attention_norm", "scale"), None),
        ("post_attention_layernorm.weight", ("mlp_norm", "scale"), None),
        ("self_attn.kv_a_proj_with_mqa.weight", ("attention", "kv_a_proj"), 1),
        ("self_attn.kv_a_layernorm.weight", ("attention", "kv_a_norm", "scale"), None),
        ("self_attn.kv_b_proj.weight", ("attention", "kv_b_proj"), 1),
        ("self_attn.o_proj.weight", ("attention", "o_proj"), 2),
    ]
    if config.get("q_lora_rank") is None:
        rules.append(("self_attn.q_proj.weight", ("attention", "q_proj"), 1))
    else:
        rules += [
            ("self_attn.q_a_proj.weight", ("attention", "q_a_proj"), 1),
            ("self_attn.q_a_layernorm.weight", ("attention", "q_a_norm", "scale"), None),
            ("self_attn.q_b_proj.weight", ("attention", "q_b_proj"), 1),
        ]
    if experts:
        rules += [
            ("mlp.gate.weight", ("mlp", "router"), 1),
            ("mlp.gate.e_score_correction_bias", ("mlp", "score_correction_bias"), None),
            *((f"mlp.experts.{{e}}.{x}_proj.weight", ("mlp", x), 1) for x in ("gate", "up", "down")),
            *((f"mlp.shared_experts.{x}_proj.weight", ("mlp", "shared", x), 1) for x in ("gate", "up", "down")),
        ]
    else:
        rules += [(f"mlp.{x}_proj.weight", ("mlp", x), 1) for x in ("gate", "up", "down")]
    return [Tensor(LAYER + name, (*within, *path), contract, stack, first_index) for name, path, contract in rules]


def deepseek_v3_tensors(config: dict) -> tuple[list[Tensor], list[Tensor]]:
    layers, dense = config["num_hidden_layers"], config.get("first_k_dense_replace") or 0
    tensors = block_tensors(config, experts=True, first_index=dense)
    if dense:
        tensors += block_tensors(config, experts=False, stack=("first_layers",))
    if config.get("num_nextn_predict_layers"):
        mtp = ("mtp", "depths")
        tensors += block_tensors(config, experts=True, stack=mtp, first_index=layers, within=("block",))
        rules = [
            ("enorm.weight", ("embedding_norm", "scale"), None, False),
            ("hnorm.weight", ("hidden_norm", "scale"), None, False),
            ("eh_proj.weight", ("projection",), 1, False),
            ("shared_head.norm.weight", ("output_norm", "scale"), None, False),
            ("embed_tokens.weight", ("embedder", "embedding"), None, True),
            ("shared_head.head.weight", ("head",), 1, True),
        ]
        tensors += [Tensor(LAYER + name, path, contract, mtp, layers, shared) for name, path, contract, shared in rules]
    return model_tensors(tied=False), tensors


def is_deepseek_v3(model: nnx.Module) -> bool:
    if not isinstance(model, Transformer):
        return False
    moe, dense = first(model, MoE), _dense_mlp(model)
    if first(model, MLA) is None or moe is None or moe.router_type != "sigmoid" or moe.shared is None:
        return False
    if moe.activation != "silu" or moe.router_bias is not None or model.tie_embeddings or model.embed_scale:
        return False
    if dense is not None and dense.activation != "silu":
        return False
    norm = model.final_norm
    plain = model.final_logit_softcap is None and model.layer_pattern is None
    return plain and isinstance(norm, RMSNorm) and norm.offset == 0.0


DEEPSEEK_V3 = Family(
    "DeepseekV3ForCausalLM",
    "deepseek_v3",
    deepseek_v3_recipe,
    deepseek_v3_hf_config,
    deepseek_v3_tensors,
    is_deepseek_v3,
    complete_config,
)
