"""LoRA (Hu et al., 2021): low-rank adapters beside a model's projection kernels.

A projection y = x W gains y = x W + (alpha / rank) * dropout(x) A B, with A [in, rank] drawn at
random and B [rank, out] zero, so the adapted model starts equal to the base. Only A and B train
(Trainer(trainable="lora")); W stays frozen. `LoRA(...)` in a model recipe (Transformer.lora, or
`--recipe "fiddler:lora(rank=16, alpha=32)"`) adds the adapters when the model is built:

    targets  which projections: short names q, k, v, o (attention), gate, up, down (MLPs and every
             mixture-of-experts expert stack), q_a, q_b, kv_a, kv_b (latent attention), head (the
             output head); or attribute names (q_proj, ...). Multi-token prediction modules and
             MoE routers get none.
    rank, alpha, dropout, rslora (scale alpha / sqrt(rank), peft's use_rslora).

Adapters live inside each projection module (`q_proj.adapter.a`, `.b`, nnx.LoRAParam), so the
base weights keep their paths, checkpoints and Hugging Face names. With scanned layers the factors
are stacked along `layers` like the kernel; the rank axis has the logical name `lora_rank`, which
the sharding table never splits. `merge_lora` / `unmerge_lora` fold the update into the kernels
and back, in place; inside `lora_disabled(model)` the model computes as the base alone.
"""

import contextlib
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from nnxlm.errors import UserError

# short target name -> the projection attribute it names
TARGETS = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate",
    "up": "up",
    "down": "down",
    "q_a": "q_a_proj",
    "q_b": "q_b_proj",
    "kv_a": "kv_a_proj",
    "kv_b": "kv_b_proj",
    "head": "head",
}
RANK_AXIS = "lora_rank"


class LoRAAdapter(nnx.Module):
    """The low-rank update of one projection: a [*lead, *in, rank], b [*lead, rank, *out], where
    lead are the kernel's leading axes beyond one matrix (scanned layers; experts of an expert
    stack, each with its own factors)."""

    def __init__(self, a: jax.Array, b: jax.Array, a_axes, b_axes, *, scale: float, dropout: float):
        self.a = nnx.LoRAParam(a, logical_axes=tuple(a_axes))
        self.b = nnx.LoRAParam(b, logical_axes=tuple(b_axes))
        self.scale, self.dropout = float(scale), float(dropout)
        self.enabled, self.merged = True, False

    @property
    def active(self) -> bool:
        """Whether the projection must add the update itself (enabled and not merged into W)."""
        return self.enabled and not self.merged

    def inputs(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        """x with LoRA's dropout applied (training with a key only)."""
        if self.dropout == 0.0 or key is None:
            return x
        keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
        return jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class LoRA:
    """Hyperparameters of the adapters a model gets (see the module docstring)."""

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    dropout: float = 0.0
    rslora: bool = False

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise UserError(f"LoRA rank is {self.rank!r}: use a positive integer (e.g. 16)")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"LoRA dropout is {self.dropout!r}: use a rate in [0, 1)")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)  # hashable: models keep it as a static attribute
        if not self.targets:
            raise UserError("LoRA targets are empty: name projections, e.g. ('q', 'v')")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def attributes(self) -> set[str]:
        return {TARGETS.get(target, target) for target in self.targets}

    def apply(self, model: nnx.Module, rngs: nnx.Rngs) -> None:
        """Adds an adapter to every targeted projection of `model`, in place."""
        from nnxlm.modules.dense import Dense, ExpertDense

        wanted = self.attributes()
        found = [
            module
            for path, module in nnx.iter_graph(model)
            if isinstance(module, (Dense, ExpertDense)) and path and path[-1] in wanted and "mtp" not in path
        ]
        if not found:
            names = sorted({p[-1] for p, m in nnx.iter_graph(model) if isinstance(m, (Dense, ExpertDense)) and p})
            raise UserError(
                f"LoRA targets {list(self.targets)} match no projection of the model: use names among "
                f"{', '.join(sorted(TARGETS))} (the model's projections: {', '.join(names)})"
            )
        for module in found:
            module.adapter = self._adapter(module, rngs)

    def _adapter(self, module, rngs: nnx.Rngs) -> LoRAAdapter:
        kernel = module.kernel
        axes = kernel.get_metadata().get("logical_axes") or (None,) * kernel.ndim
        split = kernel.ndim - module.in_ndim - module.out_ndim  # leading axes: layers, experts
        lead, in_shape, out_shape = (
            kernel.shape[:split],
            kernel.shape[split : -module.out_ndim],
            kernel.shape[-module.out_ndim :],
        )
        lead_axes, in_axes, out_axes = axes[:split], axes[split : split + module.in_ndim], axes[-module.out_ndim :]
        fan_in = math.prod(in_shape)
        a = jax.random.normal(rngs.params(), (*lead, *in_shape, self.rank), kernel.dtype) * fan_in**-0.5
        b = jnp.zeros((*lead, self.rank, *out_shape), kernel.dtype)
        a_axes, b_axes = (*lead_axes, *in_axes, RANK_AXIS), (*lead_axes, RANK_AXIS, *out_axes)
        return LoRAAdapter(a, b, a_axes, b_axes, scale=self.scale, dropout=self.dropout)


def lora_delta(module) -> jax.Array:
    """scale * A B of a projection's adapter, shaped like its kernel (float32)."""
    adapter = module.adapter
    split = module.kernel.ndim - module.in_ndim - module.out_ndim
    lead = module.kernel.shape[:split]
    a = adapter.a[...].astype(jnp.float32)
    b = adapter.b[...].astype(jnp.float32)
    a = a.reshape(*lead, -1, a.shape[-1])
    b = b.reshape(*lead, b.shape[split], -1)
    return (adapter.scale * (a @ b)).reshape(module.kernel.shape)


def adapted(model: nnx.Module) -> list:
    """The projections of `model` that carry an adapter."""
    from nnxlm.modules.dense import Dense, ExpertDense

    return [m for _, m in nnx.iter_graph(model) if isinstance(m, (Dense, ExpertDense)) and m.adapter is not None]


def merge_lora(model: nnx.Module) -> None:
    """Folds every adapter's update into its kernel (W += scale A B), in place; the model computes
    the same (within rounding) without running the adapters. unmerge_lora undoes it."""
    if any(module.scale is not None for module in adapted(model)):
        raise UserError("adapters cannot merge into int8 weights: merge them over the float base, or keep them apart")
    for module in adapted(model):
        if not module.adapter.merged:
            kernel = module.kernel[...]
            module.kernel[...] = (kernel.astype(jnp.float32) + lora_delta(module)).astype(kernel.dtype)
            module.adapter.merged = True


def unmerge_lora(model: nnx.Module) -> None:
    """Takes every merged adapter's update back out of its kernel, in place."""
    for module in adapted(model):
        if module.adapter.merged:
            kernel = module.kernel[...]
            module.kernel[...] = (kernel.astype(jnp.float32) - lora_delta(module)).astype(kernel.dtype)
            module.adapter.merged = False


@contextlib.contextmanager
def lora_disabled(model: nnx.Module):
    """Within the block, the model computes as its base alone (adapters off, no copy made)."""
    modules = [m for m in adapted(model) if m.adapter.enabled]
    if any(m.adapter.merged for m in modules):
        raise ValueError("adapters are merged into the kernels: unmerge_lora(model) before disabling them")
    for module in modules:
        module.adapter.enabled = False
    try:
        yield model
    finally:
        for module in modules:
            module.adapter.enabled = True
