"""nnxlm: train, fine-tune and run decoder-only language models with Flax NNX on JAX.

The names below load on first use (PEP 562), so `import nnxlm.launch` or `nnxlm.errors` stays free
of JAX: the command line restarts `nnxlm train` with huge pages before JAX is imported (launch.py),
and importing nnxlm as a library never restarts the process or changes anything outside nnxlm.
"""

import importlib
from typing import TYPE_CHECKING

from nnxlm.errors import UserError

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ imports them
    from nnxlm import recipes
    from nnxlm.checkpointing import load_model
    from nnxlm.generation import generate, generate_text
    from nnxlm.trainer import Trainer

__version__ = "0.1.0"
__all__ = ["Trainer", "UserError", "generate", "generate_text", "load_model", "recipes"]

_LAZY = {
    "Trainer": "nnxlm.trainer",
    "load_model": "nnxlm.checkpointing",
    "generate": "nnxlm.generation",
    "generate_text": "nnxlm.generation",
    "recipes": "nnxlm.recipes",  # the subpackage itself
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'nnxlm' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__ == f"nnxlm.{name}" else getattr(module, name)
    globals()[name] = value  # later uses skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
