"""Recipes: functions returning fdl.Config. Experiment recipes (Trainer configs) are exported
here by name, so `nnxlm.recipes.tiny()` and `nnxlm train --recipe tiny` find the same function.
Model-only recipes live in nnxlm.recipes.models, edits in nnxlm.recipes.fiddlers."""

from nnxlm.recipes import fiddlers, models
from nnxlm.recipes.experiments import (
    llama2_7b,
    llama3_1_8b,
    llama3_2_1b,
    llama3_2_3b,
    llama3_3_70b,
    llama3_8b,
    mistral_7b,
    mixtral_8x7b,
    mixtral_8x22b,
    qwen2_5_0_5b,
    qwen2_5_1_5b,
    qwen2_5_7b,
    qwen3_0_6b,
    qwen3_8b,
    qwen3_30b_a3b,
    tiny,
    trainer,
)

RECIPES = {
    "tiny": tiny,
    "llama2_7b": llama2_7b,
    "llama3_8b": llama3_8b,
    "llama3_1_8b": llama3_1_8b,
    "llama3_2_1b": llama3_2_1b,
    "llama3_2_3b": llama3_2_3b,
    "llama3_3_70b": llama3_3_70b,
    "mistral_7b": mistral_7b,
    "mixtral_8x7b": mixtral_8x7b,
    "mixtral_8x22b": mixtral_8x22b,
    "qwen2_5_0_5b": qwen2_5_0_5b,
    "qwen2_5_1_5b": qwen2_5_1_5b,
    "qwen2_5_7b": qwen2_5_7b,
    "qwen3_0_6b": qwen3_0_6b,
    "qwen3_8b": qwen3_8b,
    "qwen3_30b_a3b": qwen3_30b_a3b,
}

__all__ = [
    "RECIPES",
    "fiddlers",
    "models",
    "llama2_7b",
    "llama3_1_8b",
    "llama3_2_1b",
    "llama3_2_3b",
    "llama3_3_70b",
    "llama3_8b",
    "mistral_7b",
    "mixtral_8x22b",
    "mixtral_8x7b",
    "qwen2_5_0_5b",
    "qwen2_5_1_5b",
    "qwen2_5_7b",
    "qwen3_0_6b",
    "qwen3_30b_a3b",
    "qwen3_8b",
    "tiny",
    "trainer",
]
