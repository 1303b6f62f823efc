"""The optimizer recipe: AdamW with linear warmup, cosine decay and global-norm clipping."""

import dataclasses
from collections.abc import Sequence

import jax
import optax


@dataclasses.dataclass(frozen=True)
class AdamW:
    """Hyperparameters only; `build(num_steps)` makes the optax transformation and its schedule.

    The learning rate rises linearly from 0 over warmup_steps, then follows a cosine from
    learning_rate down to learning_rate * min_lr_ratio at decay_steps (default: the run's length).
    Weight decay applies to weights (projection kernels, embedding tables, LoRA factors) and not
    to norm scales or biases, decided by what a parameter is (`is_decayed`), not by its rank: a
    scanned model's [layers, d] norm scales are no matrices.
    """

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    decay_steps: int | None = None
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0

    def schedule(self, num_steps: int) -> optax.Schedule:
        decay_steps = self.decay_steps or num_steps
        warmup = min(self.warmup_steps, max(decay_steps - 1, 0))
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=self.learning_rate,
            warmup_steps=warmup,
            decay_steps=max(decay_steps, warmup + 1),
            end_value=self.learning_rate * self.min_lr_ratio,
        )

    def build(self, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
        schedule = self.schedule(num_steps)
        adamw = optax.adamw(
            schedule,
            b1=self.b1,
            b2=self.b2,
            eps=self.eps,
            weight_decay=self.weight_decay,
            mask=lambda params: jax.tree_util.tree_map_with_path(lambda path, _: is_decayed(path), params),
        )
        clip = optax.clip_by_global_norm(self.clip_norm) if self.clip_norm else optax.identity()
        return optax.chain(clip, adamw), schedule


def is_decayed(path: Sequence) -> bool:
    """Whether weight decay applies to the parameter at `path` (a pytree key path or names): every
    parameter but norm scales ("scale") and biases ("bias", "router_bias", ...), whatever its rank."""
    names = [str(getattr(key, "key", key)) for key in path if not hasattr(key, "name")]  # drops .value
    name = names[-1] if names else ""
    return name != "scale" and not name.endswith("bias")
