"""Qwen 2 / 2.5 (Qwen2ForCausalLM): a Llama with biases on the query, key and value projections.

Qwen 2 / 3 configs may also put a sliding window on some layers: with use_sliding_window, the
layers from max_window_layers on (transformers' layer_types, when config.json lists them) attend
only to the last sliding_window positions. They become the Transformer's layer_pattern (its
shortest period), in training and cached decoding alike, and export back the same way."""

from flax import nnx

from nnxlm.convert.families import Family, Tensor, period
from nnxlm.convert.llama import LAYER, attention_is, is_dense_swiglu, llama_hf_config, llama_recipe, llama_tensors
from nnxlm.errors import UserError

LAYER_TYPES = ("sliding_attention", "full_attention")


def window_pattern(config: dict) -> tuple[dict, ...] | None:
    """The layer_pattern of a Qwen config's sliding windows, or None (no layer has one)."""
    layers = config["num_hidden_layers"]
    window = config.get("sliding_window") if config.get("use_sliding_window") else None
    if window is not None and (not isinstance(window, int) or window < 1):
        raise UserError(f"config.json sliding_window={window!r} is not supported: use a positive integer")
    types = config.get("layer_types")
    if types is None:  # as transformers derives them
        first = config.get("max_window_layers")
        first = layers if first is None else first
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    if len(types) != layers or set(types) - set(LAYER_TYPES):
        raise UserError(f"config.json layer_types={types!r} is not supported: list one of {LAYER_TYPES} a layer")
    windows = [window if kind == "sliding_attention" else None for kind in types]
    if window is None or all(w is None for w in windows):
        return None
    return tuple({"sliding_window": w} for w in windows[: period(windows)])


def windowed_recipe(config: dict, **options):
    cfg = llama_recipe(config, **options)
    pattern = window_pattern(config)
    if pattern is not None:
        cfg.layer_pattern = pattern
    return cfg


def window_hf_config(model: nnx.Module) -> dict:
    """use_sliding_window, sliding_window, max_window_layers and layer_types of a model whose last
    layers (or none) have one sliding window."""
    settings = model.layer_settings()
    windows = [s["sliding_window"] for s in settings]
    windowed = [i for i, window in enumerate(windows) if window is not None]
    first = windowed[0] if windowed else model.num_layers
    if len(set(windows[first:])) > 1 or windowed != list(range(first, model.num_layers)):
        raise UserError(f"layer sliding windows {windows} do not export to Qwen: one window on the last layers only")
    if any(
        s["rope_theta"] != settings[0]["rope_theta"] or s["rope_scaling"] != settings[0]["rope_scaling"]
        for s in settings
    ):
        raise UserError(
            "layers with different RoPE settings do not export to Qwen: use one rope_theta and rope_scaling"
        )
    return {
        "use_sliding_window": bool(windowed),
        "sliding_window": windows[first] if windowed else None,
        "max_window_layers": first,
        "layer_types": ["sliding_attention" if w is not None else "full_attention" for w in windows],
    }


def qwen2_recipe(config: dict):
    return windowed_recipe(config, qkv_bias=True)


def qwen2_hf_config(model: nnx.Module) -> dict:
    config = llama_hf_config(model)
    config.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", **window_hf_config(model))
    for field in ("attention_bias", "mlp_bias"):
        config.pop(field)
    return config


def qkv_bias_tensors() -> list[Tensor]:
    return [Tensor(LAYER + f"self_attn.{x}_proj.bias", ("attention", f"{x}_bias"), 0) for x in "qkv"]


def qwen2_tensors(config: dict) -> tuple[list[Tensor], list[Tensor]]:
    model, layer = llama_tensors(config)
    return model, layer + qkv_bias_tensors()


def is_qwen2(model: nnx.Module) -> bool:
    return is_dense_swiglu(model) and attention_is(model, qkv_bias=True, layer_pattern=True)


QWEN2 = Family("Qwen2ForCausalLM", "qwen2", qwen2_recipe, qwen2_hf_config, qwen2_tensors, is_qwen2)
