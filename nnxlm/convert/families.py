"""What every model family provides for conversion: config.json <-> nnxlm model recipe, and the
table from each HF tensor name to the nnxlm parameter it holds. One module a family (llama.py,
...) defines its Family; `families()` lists them."""

import dataclasses
import math
from collections.abc import Callable

import fiddle as fdl
import numpy as np
from flax import nnx

from nnxlm.errors import UserError


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One HF tensor and the nnxlm parameter it becomes.

    hf: the HF name, with {i} standing for the layer index and {e} for the expert index (the
      parameter then has an experts axis after the layers axis).
    path: the parameter's path in the model's pure dict; for an {i} tensor, within one entry of
      the layer stack at `stack` (stacked along a leading axis).
    contract: None copies the array (reshaped); n means the HF tensor is a linear weight
      [out, in] and the nnxlm kernel is [*in (n axes), *out], i.e. the transpose, reshaped;
      0 means the HF tensor is a flat vector (a bias) that nnxlm holds reshaped ([heads, head_dim]).
    stack: the path of the layer stack an {i} tensor belongs to.
    first: the HF layer index of the stack's entry 0 (DeepSeek-V3's MoE layers follow its dense
      ones; its multi-token prediction layers follow all of them).
    shared: HF repeats, in every layer of the stack, a copy of the model-level parameter at `path`
      (DeepSeek-V3's prediction layers hold the embedding and head): nothing is read from those
      copies, and exporting writes the parameter once for each layer.
    """

    hf: str
    path: tuple[str, ...]
    contract: int | None = 1
    stack: tuple[str, ...] = ("layers",)
    first: int = 0
    shared: bool = False

    def to_nnx(self, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        array = array if self.contract in (None, 0) else array.T
        if math.prod(array.shape) != math.prod(shape):
            raise UserError(
                f"HF tensor {self.hf} has shape {array.shape}, which does not fit {shape}: "
                "config.json disagrees with the weights"
            )
        return array.reshape(shape)

    def to_hf(self, kernel: np.ndarray) -> np.ndarray:
        if self.contract == 0:
            return kernel.reshape(-1)
        if self.contract is None:
            return kernel
        rows = math.prod(kernel.shape[: self.contract])
        return kernel.reshape(rows, -1).T


@dataclasses.dataclass(frozen=True)
class Family:
    architecture: str  # config.json "architectures"[0]
    model_type: str
    recipe: Callable[[dict], fdl.Partial]  # HF config -> model recipe
    hf_config: Callable[[nnx.Module], dict]  # model -> HF config
    tensors: Callable[[dict], tuple[list[Tensor], list[Tensor]]]  # HF config -> (global, per layer)
    matches: Callable[[nnx.Module], bool]  # whether an nnxlm model exports as this family
    # config.json completed from the names of the tensors the checkpoint holds (DeepSeek-V3: how
    # many multi-token prediction layers are really there); None: config.json alone
    complete_config: Callable[[dict, set[str]], dict] | None = None


def require(config: dict, field: str, allowed) -> None:
    """Raises a one-line UserError when config.json's field holds a value nnxlm cannot convert."""
    value = config.get(field)
    if value not in allowed:
        architecture = (config.get("architectures") or ["?"])[0]
        raise UserError(f"config.json {field}={value!r} is not supported for {architecture}: nnxlm supports {allowed}")


def period(items: list) -> int:
    """The shortest p with items[i] == items[i % p] for every i (a per-layer list as a layer_pattern)."""
    return next(p for p in range(1, len(items) + 1) if all(x == items[i % p] for i, x in enumerate(items)))


def first(model: nnx.Module, kind: type):
    """The first submodule of `kind` (every layer has the same hyperparameters), or None."""
    return next((module for _, module in nnx.iter_graph(model) if isinstance(module, kind)), None)


def families() -> dict[str, Family]:
    """Every supported HF architecture name -> its Family."""
    from nnxlm.convert.deepseek_v3 import DEEPSEEK_V3
    from nnxlm.convert.gemma import GEMMA, GEMMA2, GEMMA3
    from nnxlm.convert.llama import LLAMA
    from nnxlm.convert.mistral import MISTRAL
    from nnxlm.convert.mixtral import MIXTRAL
    from nnxlm.convert.qwen2 import QWEN2
    from nnxlm.convert.qwen3 import QWEN3
    from nnxlm.convert.qwen3_moe import QWEN3_MOE

    # in the order models match: the more specific families first
    ordered = [DEEPSEEK_V3, GEMMA3, GEMMA2, GEMMA, QWEN3_MOE, MIXTRAL, QWEN3, QWEN2, MISTRAL, LLAMA]
    return {family.architecture: family for family in ordered}


def family_of_config(config: dict) -> Family:
    known = families()
    architecture = (config.get("architectures") or [None])[0]
    if architecture not in known:
        raise UserError(f"architecture {architecture!r} is not supported: nnxlm converts {', '.join(sorted(known))}")
    return known[architecture]


def family_of_model(model: nnx.Module) -> Family:
    """The HF family an nnxlm model exports as: the first whose `matches(model)` holds."""
    for family in families().values():
        if family.matches(model):
            return family
    raise UserError("this model matches no Hugging Face architecture nnxlm exports (see nnxlm.convert.families)")
