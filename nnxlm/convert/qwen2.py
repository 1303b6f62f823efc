"""Qwen 2 / 2.5 (Qwen2ForCausalLM): a Llama with biases on the query, key and value projections."""

from flax import nnx

from nnxlm.convert.families import Family, Tensor, require
from nnxlm.convert.llama import LAYER, attention_is, is_dense_swiglu, llama_hf_config, llama_recipe, llama_tensors


def qwen2_recipe(config: dict):
    require(config, "use_sliding_window", (False, None))
    return llama_recipe(config, qkv_bias=True)


def qwen2_hf_config(model: nnx.Module) -> dict:
    config = llama_hf_config(model)
    config.update(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=model.num_layers,
    )
    for field in ("attention_bias", "mlp_bias"):
        config.pop(field)
    return config


def qkv_bias_tensors() -> list[Tensor]:
    return [Tensor(LAYER + f"self_attn.{x}_proj.bias", ("attention", f"{x}_bias"), 0) for x in "qkv"]


def qwen2_tensors(config: dict) -> tuple[list[Tensor], list[Tensor]]:
    model, layer = llama_tensors(config)
    return model, layer + qkv_bias_tensors()


def is_qwen2(model: nnx.Module) -> bool:
    return is_dense_swiglu(model) and attention_is(model, qkv_bias=True)


QWEN2 = Family("Qwen2ForCausalLM", "qwen2", qwen2_recipe, qwen2_hf_config, qwen2_tensors, is_qwen2)
