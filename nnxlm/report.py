"""What `nnxlm inspect` prints: the resolved recipe, parameter count, FLOPs and a memory estimate,
all from the abstract model (nnx.eval_shape): nothing is allocated."""

import copy

import fiddle as fdl
import jax
import jax.numpy as jnp
from fiddle import printing
from flax import nnx

from nnxlm import metrics
from nnxlm.modules.attention import Attention
from nnxlm.modules.mla import MLA
from nnxlm.modules.mlp import GatedMLP
from nnxlm.modules.moe import MoE
from nnxlm.modules.pipeline import bubble_fraction
from nnxlm.modules.quantization import Quantization
from nnxlm.sharding.memory import per_device_lines, size
from nnxlm.train_state import trainable_count, trainable_filter


def recipe_lines(cfg: fdl.Config) -> list[str]:
    """One `path = value @ file:line:function` line a field (greppable); `path = value` for a
    field with no history, as in a recipe read from JSON (a run's recipe.json)."""
    lines = [line for line in printing.history_per_leaf_parameter(cfg).splitlines() if "<[unset]>" not in line]
    noted = {line.split(" = ", 1)[0] for line in lines}
    for line in printing.as_str_flattened(cfg).splitlines():  # "path: type = value"
        typed_path, _, value = line.partition(" = ")
        path = typed_path.split(":", 1)[0]
        if path not in noted and not value.startswith("<[unset"):
            lines.append(f"{path} = {value}")
    return lines


def activation_bytes_per_token(model: nnx.Module, seq_len: int, remat_policy: str) -> float:
    """Bytes the backward pass keeps for one token, summed over layers (an estimate).

    Without remat each layer keeps its norm inputs (2d), q/k/v and the attention output
    ((2h + 2k) x head_dim; multi-head latent attention: its latents and h x (2 qk_head_dim +
    2 v_head_dim)), attention probabilities (h x seq_len) and the MLP's gate, up and product (3f)
    plus its input (d). "dots" keeps only the projections' outputs; "full" keeps the block input (d)
    and recomputes one layer at a time. Multi-token prediction depths count as more layers.
    """
    d = model.d_model
    attention = next(m for _, m in nnx.iter_graph(model) if isinstance(m, (Attention, MLA)))
    moe = next((m for _, m in nnx.iter_graph(model) if isinstance(m, MoE)), None)
    if moe is not None:  # most layers' MLP: each token's k experts (and the shared ones) keep theirs
        shared = moe.shared.gate.shape[-1] if moe.shared is not None else 0
        f = moe.gate.shape[-1] * moe.num_experts_per_token + shared
    else:
        f = next(m for _, m in nnx.iter_graph(model) if isinstance(m, GatedMLP)).gate.shape[-1]
    h = attention.num_heads
    if isinstance(attention, MLA):
        latents = (attention.q_lora_rank or 0) + attention.kv_lora_rank + attention.qk_rope_head_dim
        projections = latents + 2 * h * (attention.qk_head_dim + attention.v_head_dim)
    else:
        projections = (2 * h + 2 * attention.num_kv_heads) * attention.head_dim
    full_layer = 3 * d + projections + h * seq_len + 3 * f
    per_layer = {"none": full_layer, "dots": projections + 2 * f, "full": d}[remat_policy]
    recompute = full_layer if remat_policy != "none" else 0  # one layer's worth during backward
    layers = model.num_layers + getattr(model, "mtp_depth", 0)
    return (layers * per_layer + recompute) * model.dtype.itemsize


def describe(cfg: fdl.Config, compile_step: bool = False) -> str:
    """The report; per-device figures for the recipe's mesh, with XLA's analysis of the compiled
    train step when compile_step (slower: it compiles)."""
    trainer = fdl.build(cfg)
    model = nnx.eval_shape(lambda: trainer.model_factory(rngs=nnx.Rngs(0)))
    params = [p for _, p in nnx.iter_graph(model) if isinstance(p, nnx.Param)]
    count = sum(p.size for p in params)
    trained_count = trainable_count(model, trainer.trainable, trainer.freeze)
    trained = jax.tree.leaves(nnx.state(model, trainable_filter(trainer.trainable, trainer.freeze)))
    trained_bytes = sum(p.size * jnp.dtype(p.dtype).itemsize for p in trained)
    # multi-token prediction runs in training only: published counts leave it out
    mtp = metrics.parameter_count(model.mtp) if getattr(model, "mtp", None) is not None else 0
    param_bytes = sum(p.size * jnp.dtype(p.dtype).itemsize for p in params)
    tokens = trainer.batch_size * trainer.seq_len
    flops = metrics.training_flops_per_token(
        model, trainer.seq_len, trainable_filter(trainer.trainable, trainer.freeze)
    )
    # activations live for one micro-batch at a time: gradient accumulation divides them
    micro_tokens = tokens // trainer.grad_accum_steps
    activations = micro_tokens * activation_bytes_per_token(model, trainer.seq_len, model.remat_policy)
    # float32 logits and their gradient, of the model and of each multi-token prediction depth
    logits = micro_tokens * model.vocab_size * 4 * 2 * (1 + getattr(model, "mtp_depth", 0))
    optimizer = 2 * trained_bytes  # AdamW's two moments of the trained parameters, in their dtype
    total = param_bytes + trained_bytes + optimizer + activations + logits  # params + gradients + ...
    gib = 2**30
    lines = recipe_lines(cfg)
    lines += [
        "",
        f"parameters: {count - mtp:,} ({_billions(count - mtp)})"
        + (f" + {mtp:,} ({_billions(mtp)}) in multi-token prediction, for training" if mtp else ""),
        _trainable_line(trainer, trained_count, count, param_bytes - trained_bytes),
        f"training FLOPs per token: {flops / 1e9:.3f} GFLOP (seq_len {trainer.seq_len}); "
        f"per step: {flops * tokens / 1e12:.1f} TFLOP ({trainer.batch_size} x {trainer.seq_len} tokens)",
        "memory estimate for one step, all devices together:",
        f"  parameters {param_bytes / gib:.2f} GiB + gradients {trained_bytes / gib:.2f} GiB "
        f"+ optimizer state {optimizer / gib:.2f} GiB",
        f"  activations {activations / gib:.2f} GiB (remat {model.remat_policy!r}) + logits {logits / gib:.2f} GiB"
        + (f" (one micro-batch of {trainer.grad_accum_steps})" if trainer.grad_accum_steps > 1 else ""),
        f"  total {total / gib:.2f} GiB",
    ]
    lines += pipeline_lines(trainer, model, activations)
    lines += inference_lines(cfg, trainer.seq_len)
    lines += per_device_lines(trainer, compile_step)
    return "\n".join(lines)


def pipeline_lines(trainer, model: nnx.Module, activations: float) -> list[str]:
    """With a `pipeline` mesh axis: the stages, the schedule's bubble fraction and what one stage
    holds (nnxlm.modules.pipeline); nothing otherwise."""
    stages = trainer.mesh_axes.get("pipeline", 1)
    if stages <= 1:
        return []
    microbatches, repeats = trainer.pipeline.resolved(stages)
    pipelined = model.num_layers - model.num_first_layers
    rows = trainer.batch_size // trainer.grad_accum_steps // microbatches
    stack = sum(p.size * jnp.dtype(p.dtype).itemsize for p in jax.tree.leaves(nnx.state(model.layers, nnx.Param)))
    rest = sum(p.size * jnp.dtype(p.dtype).itemsize for p in jax.tree.leaves(nnx.state(model, nnx.Param))) - stack
    # the queue of micro-batches and the state buffer: one activation of every row and of one micro-batch
    buffers = (microbatches + 1) * rows * trainer.seq_len * model.d_model * model.dtype.itemsize
    idle, iterations = stages - 1, repeats * microbatches + stages - 1
    kind = trainer.pipeline_schedule + (f", {repeats} rounds" if repeats > 1 else "")
    return [
        f"pipeline: {stages} stages of {pipelined // stages} layers in chunks of {pipelined // (stages * repeats)} "
        f"({kind}), {microbatches} micro-batches of {rows} rows: bubble fraction (S - 1) / (R M + S - 1) = "
        f"{idle}/{iterations} = {bubble_fraction(stages, microbatches, repeats):.1%}",
        f"  per stage (its devices together): parameters {size(stack / stages + rest)} (its layers "
        f"{size(stack / stages)}; embedding, head and norms {size(rest)} on every stage), activations about "
        f"{size(activations / stages)} "
        f"+ micro-batch queue {size(buffers)}",
    ]


def inference_lines(cfg: fdl.Config, seq_len: int) -> list[str]:
    """Bytes of the weights and of one row's KV cache at seq_len: in float, with int8 weights and
    cache (what `nnxlm quantize RUN OUT --kv int8` makes) and, if it is neither, in the recipe's own
    form; all from abstract models."""
    from nnxlm.quantize import cache_bytes_per_token, weight_bytes

    own = cfg.model.__arguments__.get("quantization")
    own = None if own is None else fdl.build(own)
    forms = {
        "float weights and cache": None,
        "int8 weights (float embedding and head) and cache": Quantization(kv="int8"),
    }
    if own is not None and own not in forms.values():
        forms[f"this recipe's {own}"] = own
    lines = [f"inference: weights + the KV cache of one row of {seq_len} tokens"]
    for label, quantization in forms.items():
        model_cfg = copy.deepcopy(cfg.model)
        model_cfg.quantization = None if quantization is None else fdl.Config(Quantization, **vars(quantization))
        model = nnx.eval_shape(lambda model_cfg=model_cfg: fdl.build(model_cfg)(rngs=nnx.Rngs(0)))
        mine = " (this recipe)" if quantization == own else ""
        cache = seq_len * cache_bytes_per_token(model)
        lines.append(f"  {label}: {size(weight_bytes(model))} + {size(cache)}{mine}")
    return lines


def _trainable_line(trainer, trained: int, count: int, frozen_bytes: int) -> str:
    line = f"trainable: {trained:,} parameters ({trained / count:.2%}; trainable={trainer.trainable!r}"
    line += f", freeze={trainer.freeze!r})" if trainer.freeze else ")"
    if frozen_bytes:
        line += f"; freezing the rest saves {3 * frozen_bytes / 2**30:.2f} GiB of gradients and optimizer state"
    return line


def _billions(count: int) -> str:
    return f"{count / 1e9:.2f} B" if count >= 1e9 else f"{count / 1e6:.2f} M"
