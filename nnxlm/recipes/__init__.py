"""Recipes: functions returning fdl.Config. Experiment recipes (Trainer configs) are exported
here by name, so `nnxlm.recipes.tiny()` and `nnxlm train --recipe tiny` find the same function.
Model-only recipes live in nnxlm.recipes.models, edits in nnxlm.recipes.fiddlers."""

from nnxlm.recipes import fiddlers, models
from nnxlm.recipes.experiments import llama2_7b, llama3_8b, tiny, trainer

RECIPES = {"tiny": tiny, "llama2_7b": llama2_7b, "llama3_8b": llama3_8b}

__all__ = ["RECIPES", "fiddlers", "llama2_7b", "llama3_8b", "models", "tiny", "trainer"]
