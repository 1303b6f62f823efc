"""Mistral (MistralForCausalLM): a Llama whose attention may look back over a sliding window only
(Mistral 7B v0.1: 4096 tokens; v0.2+: none, and such a model exports as Llama)."""

from flax import nnx

from nnxlm.convert.families import Family, first
from nnxlm.convert.llama import attention_is, is_dense_swiglu, llama_hf_config, llama_recipe, llama_tensors
from nnxlm.errors import UserError
from nnxlm.modules import Attention


def sliding_window(config: dict) -> int | None:
    window = config.get("sliding_window")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise UserError(f"config.json sliding_window={window!r} is not supported: use a positive integer or null")
    return window


def mistral_recipe(config: dict):
    window = sliding_window(config)
    return llama_recipe(config, **({"sliding_window": window} if window else {}))


def mistral_hf_config(model: nnx.Module) -> dict:
    config = llama_hf_config(model)
    config.update(
        architectures=["MistralForCausalLM"],
        model_type="mistral",
        sliding_window=first(model, Attention).sliding_window,
    )
    for field in ("attention_bias", "mlp_bias"):
        config.pop(field)
    return config


def is_mistral(model: nnx.Module) -> bool:
    return is_dense_swiglu(model) and attention_is(model, sliding_window=True)


MISTRAL = Family("MistralForCausalLM", "mistral", mistral_recipe, mistral_hf_config, llama_tensors, is_mistral)
