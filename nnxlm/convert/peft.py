"""LoRA adapters in Hugging Face peft's format: adapter_config.json + adapter_model.safetensors.

peft names each adapted module by its HF path and holds, for a linear weight W [out, in],
`base_model.model.<module>.lora_A.weight` [rank, in] and `...lora_B.weight` [out, rank], applied
as W + (lora_alpha / r) B A (lora_alpha / sqrt(r) with use_rslora). nnxlm's adapter of a kernel
[*in, *out] holds a [*in, rank] and b [rank, *out]: lora_A is a transposed, lora_B is b
transposed, each reshaped as the family's conversion table reshapes the kernel. The modules are the
conversion table's: every projection the table maps whose nnxlm module has an adapter.

Mixture-of-experts expert stacks have no peft form that transformers loads (its experts are fused
parameters, not linear modules): a model with adapters there exports with --merged.
"""

import dataclasses
import json
import re

import numpy as np
from etils import epath

from nnxlm.convert.hf_files import TensorReader, write_tensors
from nnxlm.errors import UserError
from nnxlm.files import write_atomically
from nnxlm.modules.lora import LoRA

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# The way around an adapter nnxlm's LoRA cannot hold.
MERGE_IN_PEFT = "merge the adapter in peft (model.merge_and_unload()), save it, and convert the merged model"


def module_name(tensor) -> str:
    """The HF module of a weight tensor rule: "model.layers.{i}.self_attn.q_proj"."""
    if not tensor.hf.endswith(".weight") or tensor.contract in (None, 0):
        raise ValueError(f"{tensor.hf} is not a linear weight")
    return tensor.hf[: -len(".weight")]


def adapted_tensors(tensors, has_adapter) -> list:
    """The rules (of a family's (global, layer) tables) whose projection carries an adapter, as
    has_adapter(rule) says; expert rules are refused (see the module docstring)."""
    global_tensors, layer_tensors = tensors
    rules = [t for t in [*global_tensors, *layer_tensors] if t.contract not in (None, 0) and not t.shared]
    rules = [t for t in rules if has_adapter(t)]
    experts = [t.hf for t in rules if "{e}" in t.hf]
    if experts:
        raise UserError(
            f"the adapters on mixture-of-experts experts ({experts[0]}) have no peft form that transformers "
            "loads: export the merged model instead (--merged)"
        )
    return rules


def adapter_config(lora: LoRA, rules, base: str | None) -> dict:
    """peft's adapter_config.json for these adapter rules."""
    targets = sorted({module_name(rule).rsplit(".", 1)[-1] for rule in rules})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "use_rslora": lora.rslora,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def peft_arrays(rule, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lora_A.weight [rank, in], lora_B.weight [out, rank]) of one layer's a [*in, rank], b [rank, *out]."""
    return rule.to_hf(a), dataclasses.replace(rule, contract=1).to_hf(b)


def nnx_arrays(rule, lora_a: np.ndarray, lora_b: np.ndarray, a_shape, b_shape) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of peft_arrays, onto nnxlm's a_shape and b_shape."""
    return rule.to_nnx(lora_a, a_shape), dataclasses.replace(rule, contract=1).to_nnx(lora_b, b_shape)


def write_adapter(destination: str, config: dict, tensors) -> None:
    """adapter_config.json and adapter_model.safetensors (tensors: (peft name, array) pairs)."""
    epath.Path(destination).mkdir(parents=True, exist_ok=True)
    write_tensors(destination, tensors, shard_bytes=2**62, prefix=WEIGHTS_FILE.removesuffix(".safetensors"))
    write_atomically(epath.Path(destination) / CONFIG_FILE, json.dumps(config, indent=1))


def read_adapter_config(directory: str) -> dict:
    path = epath.Path(directory) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable peft adapter config ({e})") from None
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path}: peft_type {config.get('peft_type')!r} is not supported: nnxlm reads LORA adapters")
    for field, allowed in (
        ("use_dora", (False, None)),
        ("bias", ("none", None)),
        ("fan_in_fan_out", (False, None)),
        ("modules_to_save", (None, [])),
        ("layers_to_transform", (None, [])),
        ("rank_pattern", ({}, None)),
        ("alpha_pattern", ({}, None)),
    ):
        if config.get(field) not in allowed:
            raise UserError(
                f"{path}: {field}={config.get(field)!r} is not supported: nnxlm reads plain LoRA adapters; "
                f"{MERGE_IN_PEFT}"
            )
    return config


def lora_of(config: dict, targets: list[str]) -> LoRA:
    """nnxlm's LoRA recipe for a peft adapter config adapting the given nnxlm projection names."""
    return LoRA(
        rank=int(config["r"]),
        alpha=float(config.get("lora_alpha", config["r"])),
        targets=tuple(targets),
        dropout=float(config.get("lora_dropout") or 0.0),
        rslora=bool(config.get("use_rslora", False)),
    )


def targeted(config: dict, rules, layers: int) -> list:
    """The rules whose HF module peft's target_modules selects, as peft selects them: a list of
    module names, each matching a module's whole name or its last dotted parts ("q_proj",
    "self_attn.q_proj", "model.layers.0.self_attn.q_proj", as target_modules="all-linear" is
    saved), or a regular expression matched against whole module names, in any of the `layers`
    layers."""
    targets = config.get("target_modules")
    if not targets:
        raise UserError(f"{CONFIG_FILE} names no target_modules")

    def selected(name: str) -> bool:
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        return any(name == key or name.endswith("." + key) for key in targets)

    chosen = []
    for rule in rules:
        template = module_name(rule).replace("{e}", "0")
        if "{i}" not in template:
            if selected(template):
                chosen.append(rule)
            continue
        # any layer: a stack may hold only some of the layers (DeepSeek-V3's dense ones come first),
        # and an adapter that leaves out some of a stack's layers is refused where its tensors are read
        if any(selected(template.replace("{i}", str(i))) for i in range(max(layers, 1))):
            chosen.append(rule)
    return chosen


def adapter_reader(directory: str) -> TensorReader:
    if not (epath.Path(directory) / WEIGHTS_FILE).exists():
        raise UserError(f"{directory} has {CONFIG_FILE} but no {WEIGHTS_FILE}: nnxlm reads safetensors adapters")
    return TensorReader(directory, file=WEIGHTS_FILE)
