"""NNX building blocks of decoder-only language models. No import from trainer, data or recipes."""

import inspect

from flax import nnx

from nnxlm.modules.attention import Attention
from nnxlm.modules.block import DecoderBlock
from nnxlm.modules.embed import Embedder
from nnxlm.modules.kv_cache import KVCache
from nnxlm.modules.mla import MLA
from nnxlm.modules.mlp import GatedMLP
from nnxlm.modules.moe import MoE
from nnxlm.modules.norms import RMSNorm
from nnxlm.modules.transformer import REMAT_POLICIES, Transformer

__all__ = [
    "Attention",
    "DecoderBlock",
    "Embedder",
    "GatedMLP",
    "KVCache",
    "MLA",
    "MoE",
    "RMSNorm",
    "REMAT_POLICIES",
    "Transformer",
]


def _expose_init_signature(cls: type) -> None:
    """NNX's metaclass makes every module's signature (*args, **kwargs); restoring __init__'s lets
    fiddle reject misspelt recipe fields (`set:model.nm_layers=2`) instead of passing them on."""
    signature = inspect.signature(cls.__init__)
    cls.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])


for _name in __all__:
    if isinstance(globals()[_name], type) and issubclass(globals()[_name], nnx.Module):
        _expose_init_signature(globals()[_name])
