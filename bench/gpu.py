"""One GPU: training tokens/s and MFU of a 1.07 B-parameter Llama in bfloat16, and decode tokens/s.

    bench/gpu.sh                  # checks the machine first, then runs this; see bench/README.md
    python -m bench.gpu [--steps 10] [--rounds 5] [--runs 3] [--output bench/results.md] [--json]
    python -m bench.gpu --smoke   # a tiny model for a few steps: every piece, on a CPU, in seconds

Training: the recipe bench_llama_1b (hidden 2048, 20 layers, 16 query / 8 key-value heads of 128,
MLP 5632, vocabulary 32000, 8 rows of 2048 synthetic tokens, bfloat16 compute, float32 parameters
and AdamW) through the trainer's own compiled step on batches from its data pipeline, as
bench.train times it. On a GPU the attention is cuDNN's fused kernel. Two warm-up steps (the
first compiles), then --rounds blocks of --steps steps dispatched back to back, as `nnxlm train`
runs them, each block waited for at its end: a step's time is its block's over --steps, the
figure the median over blocks. MFU divides the model FLOPs per token the trainer logs its own MFU
with (nnxlm.metrics.training_flops_per_token) by the device's data-sheet peak
(nnxlm.metrics.PEAK_FLOPS: dense bfloat16, 989 TFLOP/s for an H100 SXM and an H200).

A setting the machine cannot run is not the end of the check: a step that runs out of memory
is tried again with full remat, and a cuDNN attention that fails with the blockwise attention of
nnxlm.modules.flash; each such change is named in the results.

Decoding: the trained model with its parameters cast to bfloat16 (its KV cache is bfloat16 too)
continues a 64-token random prompt by 128 greedy tokens at batch 1 and 32, timed as bench.decode
times nnxlm.generate (new tokens / whole call, prefill included; time to first token apart),
median of --runs after a warm-up call.

The figures go into a section of their own of --output (bench/results.md; replaced when there,
else appended), with the device, nvidia-smi's name, driver and CUDA version, and the versions of
jax, jaxlib and the CUDA plugin and libraries.
"""

import argparse
import copy
import datetime
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import REPO, versions

RECIPE = "bench_llama_1b"
HEADING = "## One GPU: training and decoding"  # the section this benchmark owns in results.md
MFU_GOAL = 0.40  # MaxText's Llama recipes report 40-50 % MFU on H100s
DECODE_BATCHES = (1, 32)


# --------------------------------------------------------------------------------------------------
# The machine.


def nvidia_smi() -> dict | None:
    """The first GPU's name, driver and memory, and the highest CUDA version the driver runs, from
    nvidia-smi; None where it is missing or lists no GPU."""
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    try:
        listed = subprocess.run(query, capture_output=True, text=True, timeout=30)
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [line for line in listed.stdout.splitlines() if line.strip()]
    if listed.returncode != 0 or not rows:
        return None
    name, driver, memory = (field.strip() for field in (rows[0].split(",") + ["", ""])[:3])
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return dict(name=name, driver=driver, memory=memory, cuda=cuda.group(1) if cuda else None, count=len(rows))


def cuda_packages() -> dict[str, str]:
    """Versions of jax's CUDA plugin and of the CUDA libraries pip installed with it."""
    wanted = re.compile(r"^(jax-cuda\d+-(plugin|pjrt)|nvidia-(cudnn|cublas|cuda-runtime|cuda-nvcc|nccl)\b.*)$")
    found = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if wanted.match(name):
            found[name] = dist.version
    return dict(sorted(found.items()))


def environment() -> dict:
    import jax

    device = jax.devices()[0]
    return dict(
        platform=device.platform,
        device_kind=device.device_kind,
        device_count=jax.device_count(),
        versions=versions(),
        cuda_packages=cuda_packages(),
        nvidia_smi=nvidia_smi(),
        cores=os.cpu_count(),
    )


def peak_flops(device) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from): the data sheet nnxlm's trainer uses
    for MFU on accelerators, else (a CPU, in --smoke) the matmul peak it measures."""
    from nnxlm import metrics

    for kind, flops in metrics.PEAK_FLOPS.items():
        if device.device_kind.startswith(kind):
            return flops, f"data sheet, dense bfloat16 ({kind}: {flops / 1e12:,.0f} TFLOP/s)"
    return metrics.device_peak_flops(device), "measured matmul peak of this machine (no data-sheet figure)"


# --------------------------------------------------------------------------------------------------
# Training.


def recipe(smoke: bool, attention: str, remat: str | None = None):
    """bench_llama_1b with the attention implementation and remat policy (None: the recipe's) to
    try; with smoke, the same recipe shrunk to a model a CPU steps in milliseconds."""
    from nnxlm.recipes import RECIPES

    cfg = RECIPES[RECIPE]()
    if smoke:
        cfg.model.d_model, cfg.model.num_layers, cfg.model.block.mlp.hidden_dim = 64, 2, 128
        cfg.model.block.attention.num_heads, cfg.model.block.attention.num_kv_heads = 4, 2
        cfg.model.block.attention.head_dim = 16
        cfg.model.vocab_size = cfg.train_data.vocab_size = 512
        cfg.seq_len, cfg.batch_size = 64, 2
    cfg.model.block.attention.implementation = attention
    if remat is not None:
        cfg.model.remat_policy = remat
    return cfg


def train(cfg, steps: int, rounds: int) -> tuple[dict, object]:
    """(figures, trainer) of cfg's train step: compile and warm-up, then blocks of steps."""
    import fiddle as fdl
    import jax

    cfg = copy.deepcopy(cfg)
    cfg.workdir = tempfile.mkdtemp(prefix="nnxlm-gpu-")  # setup() makes a checkpointer there; nothing is saved
    try:
        started = time.perf_counter()
        trainer = fdl.build(cfg).setup()
        setup_s = time.perf_counter() - started

        def step():
            batch = trainer._to_device(next(trainer.train_iterator))
            trainer.state, metrics = trainer._train_step(trainer.state, batch)
            return metrics

        started = time.perf_counter()
        first = jax.device_get(step())  # traces, compiles and runs step 1
        compile_s = time.perf_counter() - started
        jax.block_until_ready(step())
        blocks = []
        for _ in range(rounds):
            started = time.perf_counter()
            for _ in range(steps):
                metrics = step()
            last = jax.device_get(metrics)  # waits for the block's last step
            blocks.append((time.perf_counter() - started) / steps)
    finally:
        shutil.rmtree(cfg.workdir, ignore_errors=True)
    device = jax.devices()[0]
    peak, peak_source = peak_flops(device)
    step_s = statistics.median(blocks)
    tokens = trainer.batch_size * trainer.seq_len
    tokens_per_s = tokens / step_s
    achieved = trainer.flops_per_token * tokens_per_s  # model FLOP/s over all devices
    memory = device.memory_stats() or {}  # None on a CPU
    figures = dict(
        batch_size=trainer.batch_size,
        seq_len=trainer.seq_len,
        tokens_per_step=tokens,
        flops_per_token=trainer.flops_per_token,
        setup_s=setup_s,
        compile_s=compile_s,
        blocks_s=blocks,
        step_s=step_s,
        tokens_per_s=tokens_per_s,
        tflops_per_s=achieved / 1e12,
        peak_flops=peak,
        peak_source=peak_source,
        mfu=achieved / (peak * trainer.mesh.size),
        first_loss=float(first["loss"]),
        last_loss=float(last["loss"]),
        peak_memory_bytes=memory.get("peak_bytes_in_use"),
        memory_limit_bytes=memory.get("bytes_limit"),
    )
    return figures, trainer


def next_setting(error: BaseException, attention: str, remat: str) -> tuple[str, str] | None:
    """The (attention, remat) to try after `error`, or None when there is nothing left to change:
    out of memory -> full remat; any other failure of the cuDNN kernel -> blockwise attention."""
    message = str(error)
    if ("RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower()) and remat != "full":
        return attention, "full"
    if attention == "cudnn":
        return "auto", remat
    return None


def train_until_it_runs(smoke: bool, attention: str, remat: str | None, steps: int, rounds: int, log=print):
    """train() with the first setting this machine runs (see next_setting); the figures name the
    setting that ran and the ones that failed, with the first line of each error."""
    failures = []
    while True:
        cfg = recipe(smoke, attention, remat)
        remat = cfg.model.remat_policy
        log(f"training {RECIPE}{' (smoke)' if smoke else ''}: attention {attention!r}, remat {remat!r}")
        try:
            figures, trainer = train(cfg, steps, rounds)
        except Exception as error:  # named in the results, never hidden
            following = next_setting(error, attention, remat)
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            failures.append(dict(attention=attention, remat=remat, error=f"{type(error).__name__}: {first_line}"))
            log(f"  failed: {failures[-1]['error']}")
            if following is None:
                raise
        else:
            figures.update(attention=attention, remat=remat, failed_settings=failures)
            return figures, trainer
        attention, remat = following
        gc.collect()  # out of the except clause: the error's frames no longer hold the failed train state


# --------------------------------------------------------------------------------------------------
# Decoding.


def bfloat16_model(model):
    """The model with its float parameters cast to bfloat16 (new arrays: the train state can go)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)
    cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    return nnx.merge(graphdef, cast)


def decode(model, batches, prompt_len: int, new_tokens: int, runs: int) -> dict:
    """{batch: {tokens_per_s, ttft_s}} of nnxlm.generate, timed as bench.decode times it."""
    import numpy as np

    from bench.decode import time_nnxlm

    figures = {}
    for batch in batches:
        prompts = np.random.default_rng(batch).integers(3, model.vocab_size, (batch, prompt_len)).astype(np.int32)
        time_nnxlm(model, prompts, new_tokens)  # compiles
        timed = [time_nnxlm(model, prompts, new_tokens) for _ in range(runs)]
        figures[batch] = dict(
            tokens_per_s=statistics.median(batch * new_tokens / total for _, total, _ in timed),
            ttft_s=statistics.median(first for first, _, _ in timed),
        )
    return figures


# --------------------------------------------------------------------------------------------------
# The results section.


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def machine_lines(env: dict) -> list[str]:
    smi = env["nvidia_smi"]
    if smi:
        gpus = f"{smi['count']} × {smi['name']} ({smi['memory']}), driver {smi['driver']}, CUDA {smi['cuda']} (driver)"
    else:
        gpus = "no nvidia-smi"
    stack = {k: v for k, v in env["versions"].items() if k not in ("torch", "transformers")}  # not used here
    packages = ", ".join(f"{name} {version}" for name, version in {**stack, **env["cuda_packages"]}.items())
    return [
        f"device: {env['device_kind']} ({env['platform']}, {env['device_count']} device(s) seen by JAX); {gpus}",
        f"{env['cores']} CPU cores; {packages}",
    ]


def section(result: dict) -> str:
    """The markdown section of results.md (its own heading, the machine, a table, the notes)."""
    t, env = result["train"], result["environment"]
    smoke = " — SMOKE RUN (tiny model on this machine's CPU), not a result" if result["smoke"] else ""
    goal = "met" if t["mfu"] >= MFU_GOAL else "missed"
    lines = [
        f"{HEADING} (`bench/gpu.sh`, {result['date']}){smoke}",
        "",
        *machine_lines(env),
        "",
        f"Whole run {result['wall_s'] / 60:.1f} min. Training: {RECIPE} ({_count(result['parameters'])} "
        f"parameters, {t['batch_size']} × {t['seq_len']} synthetic tokens a step, bfloat16 compute, float32 "
        f"parameters and AdamW), attention {t['attention']!r}, remat {t['remat']!r}; the trainer's compiled step on "
        f"its own data pipeline, steps dispatched back to back; median over {len(t['blocks_s'])} blocks of "
        f"{result['steps']} steps after 2 warm-up steps. MFU: {t['flops_per_token'] / 1e9:.3f} GFLOP a token "
        f"(nnxlm.metrics, as the trainer logs it) over the peak: {t['peak_source']}.",
        "",
        "| benchmark | metric | value |",
        "|---|---|---:|",
        f"| train {RECIPE} | tokens/s | {t['tokens_per_s']:,.0f} |",
        f"| train {RECIPE} | step time s | {t['step_s']:.3f} |",
        f"| train {RECIPE} | model TFLOP/s | {t['tflops_per_s']:,.1f} |",
        f"| train {RECIPE} | MFU (goal ≥ {MFU_GOAL:.0%}: {goal}) | {t['mfu']:.1%} |",
        f"| train {RECIPE} | compile + first step s | {t['compile_s']:.1f} |",
    ]
    if t["peak_memory_bytes"]:
        lines.append(f"| train {RECIPE} | device memory peak GiB (JAX) | {t['peak_memory_bytes'] / 2**30:.1f} |")
    for batch, figures in result["decode"].items():
        lines.append(f"| decode, batch {batch} | new tokens/s | {figures['tokens_per_s']:,.0f} |")
        lines.append(f"| decode, batch {batch} | time to first token ms | {figures['ttft_s'] * 1e3:.1f} |")
    d = result["decode_shape"]
    lines += [
        "",
        f"Decoding: the trained model's parameters cast to bfloat16 (bfloat16 KV cache), a {d['prompt_len']}-token "
        f"random prompt continued by {d['new_tokens']} greedy tokens, new tokens / whole call (prefill included), "
        f"median of {d['runs']} after a warm-up call. Blocks (s a step): "
        + ", ".join(f"{s:.3f}" for s in t["blocks_s"])
        + f"; loss {t['first_loss']:.3f} at the first step, {t['last_loss']:.3f} at the last.",
    ]
    for failure in t["failed_settings"]:
        lines.append(
            f"Tried first: attention {failure['attention']!r}, remat {failure['remat']!r}, which failed: "
            f"{failure['error']}"
        )
    return "\n".join(lines) + "\n"


def write_section(path: str, text: str) -> None:
    """Puts `text` in place of the section under HEADING in `path` (up to the next "## "), or at its end."""
    try:
        with open(path, encoding="utf-8") as f:
            old = f.read()
    except FileNotFoundError:
        old = ""
    start = old.find(HEADING)
    if start < 0:
        new = old + ("\n" if old and not old.endswith("\n\n") else "") + text
    else:
        end = old.find("\n## ", start + len(HEADING))
        new = old[:start] + text + ("" if end < 0 else old[end:])
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)


# --------------------------------------------------------------------------------------------------


def run(args, log=print) -> dict:
    import jax

    from nnxlm import metrics

    started = time.perf_counter()
    env = environment()
    log(f"{env['device_kind']} x{env['device_count']} ({env['platform']}); jax {jax.__version__}")
    attention = args.attention or ("cudnn" if env["platform"] == "gpu" else "auto")
    trained, trainer = train_until_it_runs(args.smoke, attention, args.remat, args.steps, args.rounds, log)
    log(
        f"train: {trained['tokens_per_s']:,.0f} tokens/s, {trained['step_s']:.3f} s a step, "
        f"{trained['tflops_per_s']:,.1f} TFLOP/s, MFU {trained['mfu']:.1%} ({trained['peak_source']})"
    )
    parameters = metrics.parameter_count(trainer.model)
    model = bfloat16_model(trainer.model)
    del trainer  # the float32 train state (16 GB at 1 B parameters) leaves the device
    gc.collect()
    shape = dict(prompt_len=args.prompt_len, new_tokens=args.new_tokens, runs=args.runs)
    decoded = decode(model, DECODE_BATCHES, args.prompt_len, args.new_tokens, args.runs)
    for batch, figures in decoded.items():
        log(f"decode batch {batch}: {figures['tokens_per_s']:,.0f} new tokens/s, TTFT {figures['ttft_s'] * 1e3:.1f} ms")
    del model
    return dict(
        smoke=args.smoke,
        date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        environment=env,
        parameters=parameters,
        steps=args.steps,
        train=trained,
        decode=decoded,
        decode_shape=shape,
        wall_s=time.perf_counter() - started,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model for a few steps: runs on a CPU")
    parser.add_argument("--steps", type=int, default=None, help="steps a timed block (default 10; smoke 2)")
    parser.add_argument("--rounds", type=int, default=None, help="timed blocks (default 5; smoke 2)")
    parser.add_argument("--runs", type=int, default=None, help="timed generate calls a batch (default 3; smoke 1)")
    parser.add_argument("--prompt_len", type=int, default=None, help="default 64; smoke 16")
    parser.add_argument("--new_tokens", type=int, default=None, help="default 128; smoke 8")
    parser.add_argument("--attention", choices=("cudnn", "auto", "blockwise", "dense"), default=None,
                        help="attention implementation to try first (default: cudnn on a GPU, else auto)")  # fmt: skip
    parser.add_argument("--remat", choices=("none", "dots", "full"), default=None,
                        help="remat policy to try first (default: the recipe's)")  # fmt: skip
    parser.add_argument("--output", default=None,
                        help="file to write the section to (default bench/results.md; smoke: none)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="end with the figures as one JSON line")
    args = parser.parse_args(argv)
    defaults = dict(steps=(2, 10), rounds=(2, 5), runs=(1, 3), prompt_len=(16, 64), new_tokens=(8, 128))
    for name, (smoke, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    if args.output is None and not args.smoke:
        args.output = os.path.join(REPO, "bench", "results.md")

    import jax

    if not args.smoke and jax.default_backend() != "gpu":
        print(f"bench.gpu: JAX runs on {jax.default_backend()}, not a GPU: run bench/gpu.sh (or --smoke on a CPU)")
        return 2
    result = run(args)
    text = section(result)
    print(text)
    if args.output:
        write_section(args.output, text)
        print(f"written to {args.output}")
    if args.json:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
