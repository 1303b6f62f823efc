"""Numbers a user can trust: FLOPs per token, device peak, MFU, and the metric writers.

MFU = achieved model FLOPs per second / peak FLOPs per second of the devices used. Model FLOPs
per trained token follow the usual count: 6 x (parameters used in matmuls) for forward plus
backward, plus causal attention, 6 x length x num_heads x head_dim per layer (QK^T and AV are
2 x length x heads x head_dim multiply-adds each, halved by the causal mask, times 3 for
forward + backward; less with a sliding window). Embedding lookups are not matmuls and are not
counted; a tied head is. A mixture of experts counts the k of E routed experts a token runs.
Multi-head latent attention counts its query/key and value head dims (3 x length x heads x
(qk_head_dim + v_head_dim)); multi-token prediction its blocks and one more pass through the head
per depth.
"""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from nnxlm.modules.attention import Attention
from nnxlm.modules.mla import MLA
from nnxlm.modules.moe import MoE

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def training_flops_per_token(model: nnx.Module, seq_len: int, trainable=nnx.Param) -> float:
    """Model FLOPs to train on one token at sequence length seq_len (see module docstring). A
    frozen weight (outside the nnx filter `trainable`, e.g. under LoRA) needs no weight gradient:
    it costs 4 FLOPs per parameter and token (forward and input gradient), not 6."""
    is_trainable = nnx.filterlib.to_predicate(trainable)
    matmul_params = 0.0
    for path, param in nnx.iter_graph(model):
        if not isinstance(param, nnx.Param):
            continue
        # Stacked (scanned) layers add a leading `layers` axis that is no matrix dimension: their
        # [layers, d] norm scales are not matmul weights. Biases are added, not multiplied.
        layers_axis = param.get_metadata().get("logical_axes", ())[:1] == ("layers",)
        if param.ndim - layers_axis >= 2 and not str(path[-1]).endswith("bias"):
            is_lookup_table = "embedder" in path and not getattr(model, "tie_embeddings", False)
            weight = 1.0 if is_trainable(path, param) else 4 / 6
            matmul_params += 0 if is_lookup_table else param.size * weight
    attention = 0
    settings = model.layer_settings() if hasattr(model, "layer_settings") else None
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Attention):
            stacked = module.q_proj.kernel.ndim == 4  # [layers, embed, heads, head_dim] when scanned
            layers = module.q_proj.shape[0] if stacked else 1
            windows = [s["sliding_window"] for s in settings] if settings else [module.sliding_window]
            # a sliding window w leaves a query w - w^2 / (2 seq_len) keys on average instead of seq_len / 2
            fraction = sum(_window_fraction(w, seq_len) for w in windows) / len(windows)
            attention += layers * module.num_heads * module.head_dim * fraction
        if isinstance(module, MLA):  # scores over qk_head_dim, the weighted sum over v_head_dim
            layers = module.o_proj.shape[0] if module.o_proj.kernel.ndim == 4 else 1
            attention += layers * module.num_heads * (module.qk_head_dim + module.v_head_dim) / 2
        if isinstance(module, MoE):  # each token runs k of the E routed experts
            parts = (module.gate, module.up, module.down)
            experts = sum(p.size for part in parts for _, p in nnx.iter_graph(part) if isinstance(p, nnx.Param))
            matmul_params -= experts * (1 - module.num_experts_per_token / module.num_experts)
    if getattr(model, "mtp", None) is not None:  # each prediction depth runs the head once more
        head = model.embedder.embedding if model.tie_embeddings else model.head.kernel
        matmul_params += model.mtp_depth * head.size
    return 6.0 * matmul_params + 6.0 * seq_len * attention


def _window_fraction(window: int | None, seq_len: int) -> float:
    """Attended keys a query sees with this window, relative to full causal attention."""
    w = min(seq_len, window or seq_len)
    return (2 * w - w * w / seq_len) / seq_len


def parameter_count(model: nnx.Module) -> int:
    return sum(p.size for _, p in nnx.iter_graph(model) if isinstance(p, nnx.Param))


def measure_matmul_peak(size: int = 1536, repeats: int = 5) -> float:
    """Best-of-n float32 matmul FLOP/s on the default device: the CPU's practical peak."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def device_peak_flops(device=None) -> float:
    """Peak FLOP/s of one device: the data-sheet figure for known accelerators, else measured."""
    device = device or jax.devices()[0]
    for kind, flops in PEAK_FLOPS.items():
        if device.device_kind.startswith(kind):
            return flops
    if device.platform != "cpu":
        print(f"nnxlm: unknown device kind {device.device_kind!r}; MFU uses a measured matmul peak")
    return measure_matmul_peak()


class MetricsWriter:
    """Appends one JSON object a step to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str):
        summary_writer = _tensorboardx_writer()
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        self._tensorboard = summary_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        for name, value in metrics.items():
            self._tensorboard.add_scalar(name, value, step)

    def close(self) -> None:
        self._jsonl.close()
        self._tensorboard.close()


def _tensorboardx_writer():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch, when it is
    installed, only to recognise torch tensors (nnxlm writes floats), and that import cost `nnxlm
    train` 0.7-1.5 s before its first step. A torch already imported is left alone."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is here
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def read_metrics(workdir: str) -> list[dict]:
    """metrics.jsonl as a list, keeping the last record of each step (a resumed run rewrites some)."""
    by_step = {}
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            by_step.setdefault(record["step"], {}).update(record)
    return [by_step[step] for step in sorted(by_step)]
