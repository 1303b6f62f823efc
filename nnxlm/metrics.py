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

import io
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx

from nnxlm.files import is_local, write_atomically
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
    """Peak FLOP/s of one device: the data-sheet figure for known accelerators, else the highest
    rate measured on this machine (measured_peak_flops)."""
    device = device or jax.devices()[0]
    for kind, flops in PEAK_FLOPS.items():
        if device.device_kind.startswith(kind):
            return flops
    if device.platform != "cpu":
        print(f"nnxlm: unknown device kind {device.device_kind!r}; MFU uses a measured matmul peak")
    return measured_peak_flops(device)


def _peak_cache() -> tuple[str, str]:
    """(cache file, this machine's key in it): the same processor, cores, device and JAX."""
    cache_home = epath.Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    directory = epath.Path(os.environ.get("NNXLM_CACHE_DIR") or cache_home / "nnxlm")
    processor = platform.processor() or platform.machine()
    try:
        lines = epath.Path("/proc/cpuinfo").read_text().splitlines()
        processor = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), processor)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = jax.devices()[0].device_kind
    return directory / "peak_flops.json", f"{processor} | {cores} cores | {device} | jax {jax.__version__}"


def measured_peak_flops(device=None) -> float:
    """The highest FLOP/s seen on this machine: a matmul measured once (the best of several sizes and
    repeats after warm-up) and kept in a cache file, raised by remember_peak_flops whenever a run
    does better. A single measurement at start-up can read low (another process busy, a clock not yet
    up), and MFU divided by it exceeded 100 %; the best rate ever seen cannot."""
    path, key = _peak_cache()
    try:
        known = float(json.loads(path.read_text())[key])
        if known > 0:
            return known
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return remember_peak_flops(_measure_peak())


def _measure_peak() -> float:
    """The best float32 matmul rate of several sizes on this machine's default device."""
    return max(measure_matmul_peak(size, repeats=5) for size in (1024, 1536, 2048))


def remember_peak_flops(flops: float) -> float:
    """Raises this machine's cached peak to `flops` if higher; returns the cached peak."""
    path, key = _peak_cache()
    try:
        table = json.loads(path.read_text())
        table = table if isinstance(table, dict) else {}
    except (OSError, ValueError):
        table = {}
    try:
        best = max(float(table.get(key, 0.0)), flops)
    except (TypeError, ValueError):
        best = flops
    table[key] = best
    try:
        write_atomically(path, json.dumps(table, indent=1))
    except OSError:  # a read-only home: the peak holds for this process
        pass
    return best


class PeakFlops:
    """The peak FLOP/s of a run's devices, for MFU. A measured peak (CPU) is only a lower bound of
    the true one: a step that runs faster raises this run's peak instead of reporting an impossible
    MFU above 1. The machine's cache is raised only by measuring again (once a run), never by a
    step's time, which a busy host or another process in the run directory can make absurd (one
    such reading lowered every later run's MFU 5.8x). A peak the recipe gives
    (peak_flops_per_device) is the user's and stays as it is."""

    def __init__(self, per_device: float | None, devices: int):
        self.measured = per_device is None
        self.per_device = per_device or device_peak_flops()
        self.devices = devices
        self.remeasured = False

    def utilization(self, achieved: float) -> float:
        """MFU of a step that achieved `achieved` model FLOP/s over all devices."""
        if self.measured and achieved > self.per_device * self.devices:
            if not self.remeasured:
                self.remeasured = True
                self.per_device = max(self.per_device, remember_peak_flops(_measure_peak()))
            if achieved > self.per_device * self.devices:
                print(
                    f"nnxlm: a step ran at {achieved / 1e9:.1f} GFLOP/s, above the measured peak of "
                    f"{self.per_device * self.devices / 1e9:.1f}: MFU divides by that for the rest of this run",
                    file=sys.stderr,
                )
                self.per_device = achieved / self.devices
        return achieved / (self.per_device * self.devices)


class MetricsWriter:
    """Appends one JSON object a step to metrics.jsonl and mirrors scalars to TensorBoard.

    Each record is one write of a whole line, flushed; a line cut short by a crash is removed when
    the file is next opened, so a resumed run never appends to half a record.

    An object store (gs://, s3://) cannot append to a file: in a run directory there, metrics.jsonl
    is rewritten whole (atomically) at most every `remote_flush_s` seconds and when the writer
    closes, and so are the TensorBoard event files (every 2 minutes, tensorboardX's default). A
    crash loses the records of those last seconds; a resumed run writes the steps after its
    checkpoint again anyway."""

    def __init__(self, workdir, remote_flush_s: float = 30.0):
        summary_writer = _tensorboardx_writer()
        workdir = epath.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._path = workdir / "metrics.jsonl"
        self._text = _without_partial_last_line(self._path)  # what a remote file holds, rewritten whole
        self._local = is_local(workdir)
        self._jsonl = self._path.open("a") if self._local else None
        self._flush_s, self._flushed = remote_flush_s, time.monotonic()
        if not self._local:
            _events_through_epath(os.fspath(workdir).split("://", 1)[0])
        self._tensorboard = summary_writer(os.fspath(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        line = json.dumps({"step": step, **metrics}) + "\n"
        if self._local:
            self._jsonl.write(line)
            self._jsonl.flush()
        else:
            self._text += line
            if time.monotonic() - self._flushed >= self._flush_s:
                self._rewrite()
        for name, value in metrics.items():
            self._tensorboard.add_scalar(name, value, step)

    def _rewrite(self) -> None:
        write_atomically(self._path, self._text)
        self._flushed = time.monotonic()

    def close(self) -> None:
        if self._local:
            self._jsonl.close()
        else:
            self._rewrite()
        self._tensorboard.close()


def _without_partial_last_line(path: epath.Path) -> str:
    """The complete records of metrics.jsonl (a line cut short by a crash is dropped from the file)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ""
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        write_atomically(path, data)
    return data.decode("utf-8")


class _EventFile:
    """A TensorBoard event file at a remote path, written through epath. An object cannot be
    appended to: the events stay in memory and each flush writes the whole file again (tensorboardX's
    own gs:// and s3:// writers do the same; event files of scalars stay small)."""

    def __init__(self, path: str):
        self.path, self.buffer = epath.Path(path), io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        self.path.write_bytes(self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _EventFiles:
    """tensorboardX's writer factory interface (record_writer.register_writer_factory)."""

    def open(self, path: str) -> _EventFile:
        return _EventFile(path)

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def _events_through_epath(scheme: str) -> None:
    """Has tensorboardX write event files under `scheme`:// through epath, as nnxlm writes every
    other file (tensorboardX's own gs:// and s3:// writers need google-cloud-storage or boto3 and
    know no other scheme)."""
    from tensorboardX import record_writer

    record_writer.register_writer_factory(scheme, _EventFiles())


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


def read_metrics(workdir) -> list[dict]:
    """metrics.jsonl as a list, keeping the last record of each step (a resumed run rewrites some)."""
    by_step = {}
    with (epath.Path(workdir) / "metrics.jsonl").open() as f:
        for line in f:
            if not line.endswith("\n"):
                break  # a record cut short by a crash (see MetricsWriter)
            record = json.loads(line)
            by_step.setdefault(record["step"], {}).update(record)
    return [by_step[step] for step in sorted(by_step)]


class StepClock:
    """Step times from when each step is first seen done: a step's time is the time from the
    previous step's end (or the last restart, after a checkpoint or an evaluation) to its own.

    Steps run asynchronously, so a step's end is seen where the loop looks (`look`) or when its
    metrics are fetched. Looking right after each dispatch matters on XLA:CPU, which may run a
    small step inside its dispatch: its end is then seen there, not a step later, and a step whose
    metrics are fetched at once (before a checkpoint) is timed as the others are."""

    def __init__(self):
        self._ends: dict[int, float] = {}
        self._last = self._looked = self._latest = time.perf_counter()

    def look(self, *steps: tuple[int, object]) -> None:
        """Notes now as the end of each (step, its outputs) that is done, oldest first."""
        now, done = time.perf_counter(), []
        for step, outputs in steps:
            if step in self._ends:
                continue
            if not all(x.is_ready() for x in jax.tree.leaves(outputs)):
                break  # a later step cannot be done before this one
            done.append(step)
        # Steps first seen done together ended between the last look and this one: the older ones
        # are given the last look's time, so that none is timed at 0 s.
        for step in done[:-1]:
            self._ends[step] = self._latest = max(self._looked, self._latest)
        if done:
            self._ends[done[-1]] = self._latest = now
        self._looked = now

    def restart(self) -> None:
        """What ran since the last step (saving, evaluating) is no step's time."""
        self._last = self._latest = time.perf_counter()

    def step_time(self, step: int) -> float:
        """The time of `step`, whose outputs have just been fetched; steps are asked for in order."""
        end = self._ends.pop(step) if step in self._ends else time.perf_counter()
        elapsed, self._last = end - self._last, end
        self._latest = max(self._latest, end)
        return elapsed
