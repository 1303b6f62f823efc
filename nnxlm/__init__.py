"""nnxlm: train, fine-tune and run decoder-only language models with Flax NNX on JAX."""

# ruff: noqa: E402
from nnxlm.launch import restart_train_command_with_huge_pages

restart_train_command_with_huge_pages()  # before JAX is imported; only in `nnxlm train` (see launch.py)

from nnxlm import recipes
from nnxlm.checkpointing import load_model
from nnxlm.errors import UserError
from nnxlm.generation import generate, generate_text
from nnxlm.trainer import Trainer

__version__ = "0.1.0"
__all__ = ["Trainer", "UserError", "generate", "generate_text", "load_model", "recipes"]
