"""Qwen 3 (Qwen3ForCausalLM): a Llama whose queries and keys are RMS-normalised per head (over
head_dim, with the layers' eps) before RoPE. Sliding windows as Qwen 2's (see qwen2.py)."""

from flax import nnx

from nnxlm.convert.families import Family, Tensor
from nnxlm.convert.llama import LAYER, attention_is, is_dense_swiglu, llama_hf_config, llama_tensors
from nnxlm.convert.qwen2 import window_hf_config, windowed_recipe


def qwen3_recipe(config: dict):
    return windowed_recipe(config, qk_norm=True)


def qwen3_hf_config(model: nnx.Module) -> dict:
    config = llama_hf_config(model)
    config.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", **window_hf_config(model))
    config.pop("mlp_bias")
    return config


def qk_norm_tensors() -> list[Tensor]:
    return [
        Tensor(LAYER + "self_attn.q_norm.weight", ("attention", "q_norm", "scale"), None),
        Tensor(LAYER + "self_attn.k_norm.weight", ("attention", "k_norm", "scale"), None),
    ]


def qwen3_tensors(config: dict) -> tuple[list[Tensor], list[Tensor]]:
    model, layer = llama_tensors(config)
    return model, layer + qk_norm_tensors()


def is_qwen3(model: nnx.Module) -> bool:
    return is_dense_swiglu(model) and attention_is(model, qk_norm=True, layer_pattern=True)


QWEN3 = Family("Qwen3ForCausalLM", "qwen3", qwen3_recipe, qwen3_hf_config, qwen3_tensors, is_qwen3)
