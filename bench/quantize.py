"""Int8 quantization: how far each int8 form moves a model's predictions from float32's, and what it
does to decode speed and memory on this CPU.

    python -m bench.quantize [--parts quality speed] [--checkpoint RUN_DIR] [--train_steps 400]
                             [--vocab_size 2048] [--rows 32] [--row_len 256] [--block_size 128]
                             [--shapes 57m 300m] [--batch 1 8] [--prompt_len 32] [--new_tokens 64]
                             [--runs 3] [--quality_forms w8a8 ...] [--forms float32 w8a8 ...]
                             [--json] [--output PATH]

Quality (`--parts quality`): a model trained on real text — by default the demo's shape (hidden
256, 6 layers, 4 query / 2 key-value heads, MLP 1024) with a --vocab_size tokenizer, trained for
--train_steps steps of 4 × 256 tokens on the Python standard library's train split in a temporary
run directory; or the run directory given with --checkpoint (`runs/demo` after `make train`). Each
form is loaded with `load_model(run, quantize=Quantization(...))` and compared with the float32
model by `nnxlm.quantize.agreement` on --rows rows of --row_len + 1 tokens of held-out text (the
standard library's eval split, in a fixed shuffled order, tokenized as the trainer does: bos, the
file, eos): mean KL(float32 || int8) of the next-token distributions, the perplexity ratio and how
often both rank the same token first (llama.cpp's figures for Q8_0). Logits come from a prefill
through each model's own KV cache, so the int8 cache's rounding is in them. The gates:
perplexity ratio < 1.01, mean KL < 0.01, top-1 agreement > 95 %.

Speed and memory (`--parts speed`): random-weight Llamas of the bench_llama_57m shape and a
306.8 M-parameter one (hidden 1024, 20 layers, 16 query / 4 key-value heads of 64, MLP 3072,
vocabulary 32000, untied), float32 and each int8 form. Every (shape, form) lives in a process of
its own (`python -m bench.quantize worker ...`), which builds the model (its recipe's
`quantization` quantizes it as it is built), compiles and warms up generation at every batch size,
and then, asked in turn with the other forms' processes (float32, int8, ... for each batch, --runs
rounds: a busy moment spoils one run of each form, not one form), greedily continues --prompt_len
random tokens by --new_tokens. Decode tokens/s = batch × (new tokens − 1) / the time after the
first new token (the prefill's, reported as prefill ms); medians over the rounds. Memory: the
weights' bytes as stored (int8 values and their float32 scales; the embedding and the head stay
float32 in these forms), the KV cache's bytes per token of one row, and each process's resident
memory once it has decoded, after giving freed heap back to the system (malloc_trim: glibc keeps
the float kernels the quantization replaced otherwise), beside its peak (which includes building
the float32 weights before they are quantized).
"""

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import json
import os
import shutil
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import Worker, emit, machine_line, median
from nnxlm.modules.quantization import Quantization

# The forms compared with float32, by name: (what the tables call them, the settings).
QUALITY_FORMS = {
    "w8a8": ("int8 weights (int8 × int8 matmuls)", Quantization()),
    "w8": ("int8 weights, weight-only (float matmuls)", Quantization(activations=None)),
    "w8a8-block": ("int8 weights, one scale per {block} inputs", None),  # --block_size fills it in
    "w8a8-all": ("int8 weights, embedding and head too", Quantization(embed=True, head=True)),
    "kv8": ("int8 KV cache (float weights)", Quantization(weights=None, kv="int8")),
    "w8a8+kv8": ("int8 weights + int8 KV cache", Quantization(kv="int8")),
}
SPEED_FORMS = ("float32", "w8a8", "w8", "kv8", "w8a8+kv8")
# The quality gates: (field of nnxlm.quantize.agreement, what the table calls it, bound, above it).
GATES = (
    ("perplexity_ratio", "perplexity ratio < 1.01", 1.01, False),
    ("kl", "mean KL < 0.01", 0.01, False),
    ("top1", "top-1 > 95 %", 0.95, True),
)
# llama.cpp's published Q8_0 figures for LLaMA-3-8B (its perplexity tool's KL-divergence mode).
LLAMA_CPP_Q8_0 = {"kl": 0.0014, "perplexity_ratio": 1.0004, "top1": 0.977}
SHAPES = {
    "57m": None,  # bench_llama_57m's model (nnxlm.recipes)
    "300m": dict(vocab_size=32_000, d_model=1024, num_layers=20, num_heads=16, num_kv_heads=4, mlp_dim=3072),
}


def form_settings(name: str, block_size: int) -> Quantization | None:
    """The Quantization of a form's name (None: float32)."""
    if name == "float32":
        return None
    if name == "w8a8-block":
        return Quantization(block_size=block_size)
    return QUALITY_FORMS[name][1]


def form_label(name: str, block_size: int) -> str:
    return "float32" if name == "float32" else QUALITY_FORMS[name][0].format(block=block_size)


def shape_config(shape: str, settings: Quantization | None):
    """The fiddle config of a speed shape's model, quantized as it is built when settings say so."""
    import fiddle as fdl

    import nnxlm
    from nnxlm.recipes import models

    if SHAPES[shape] is None:
        cfg = nnxlm.recipes.bench_llama_57m().model
    else:
        cfg = models.llama(**SHAPES[shape])
        cfg.scan_layers = False  # as the bench recipes: decoding unrolls the layers anyway
    if settings is not None:
        cfg.quantization = fdl.Config(Quantization, **dataclasses.asdict(settings))
    return cfg


# --------------------------------------------------------------------------------------------------
# Quality: a model trained on real text, each int8 form against it.


def train_model(workdir: str, steps: int, vocab_size: int, log) -> str:
    """Trains the demo's shape with a vocab_size tokenizer on the standard library; returns workdir."""
    import fiddle as fdl

    from nnxlm.recipes import models, trainer

    model = models.llama(vocab_size=vocab_size, d_model=256, num_layers=6, num_heads=4, num_kv_heads=2, mlp_dim=1024)
    model.scan_layers = False
    cfg = trainer(model, name="quantize", seq_len=256, batch_size=4, num_steps=steps)
    cfg.workdir = workdir
    cfg.eval_data = None  # the held-out text is this benchmark's own
    cfg.checkpoint_every = 0  # one checkpoint, at the end
    cfg.log_every = max(1, steps // 8)
    cfg.peak_flops_per_device = 5e11  # about this CPU's (bench/results.md): no peak measured first
    cfg.optimizer.learning_rate = 3e-3  # the demo's schedule, its warm-up scaled to the steps
    cfg.optimizer.warmup_steps = max(1, steps // 15)
    cfg.optimizer.weight_decay = 0.05
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's progress is not this report
        records = fdl.build(cfg).fit()
    loss = next((r["loss"] for r in reversed(records) if "loss" in r), float("nan"))
    log(f"trained {steps} steps in {time.perf_counter() - start:.0f} s, last loss {loss:.2f}")
    return workdir


def run_tokenizer(run: str):
    from nnxlm.checkpointing import find_checkpoint, load_recipe
    from nnxlm.data import find_tokenizer, load_tokenizer

    directory, _ = find_checkpoint(run)
    return load_tokenizer(find_tokenizer(os.path.dirname(directory), load_recipe(run).tokenizer_path))


def held_out_rows(tokenizer, rows: int, row_len: int, seed: int = 0) -> list:
    """`rows` rows of row_len + 1 token ids of the standard library's eval split: files in a fixed
    shuffled order (so the rows do not all come from the first files by name), each as the trainer
    sees a document (bos, its tokens, eos), cut one after another into rows."""
    import numpy as np

    from nnxlm.data import PythonStdlib

    source = PythonStdlib(split="eval")
    documents = source.documents()
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    stream, need = [], rows * (row_len + 1)
    for i in np.random.default_rng(seed).permutation(len(documents)):
        stream += bos + tokenizer.encode(source.load(documents[i])) + eos
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise SystemExit(f"the eval split holds {len(stream)} tokens, fewer than {rows} rows of {row_len + 1}")
    ids = np.asarray(stream[:need], np.int32).reshape(rows, row_len + 1)
    return list(ids)


def quality(run: str, forms: list[str], rows: int, row_len: int, block_size: int, log) -> dict:
    """agreement() of each form with the float32 model of run, and its gates."""
    import nnxlm
    from nnxlm.metrics import parameter_count
    from nnxlm.quantize import agreement, cache_bytes_per_token, weight_bytes

    token_rows = held_out_rows(run_tokenizer(run), rows, row_len)
    reference = nnxlm.load_model(run)
    out = {
        "parameters": parameter_count(reference),
        "vocab_size": reference.vocab_size,
        "rows": rows,
        "row_len": row_len,
        "float32": {"weight_bytes": weight_bytes(reference), "cache_bytes_per_token": cache_bytes_per_token(reference)},
        "forms": {},
    }
    for name in forms:
        model = nnxlm.load_model(run, quantize=form_settings(name, block_size))
        start = time.perf_counter()
        figures = agreement(reference, model, token_rows)
        figures.update(
            label=form_label(name, block_size),
            weight_bytes=weight_bytes(model),
            cache_bytes_per_token=cache_bytes_per_token(model),
            gates={field: (figures[field] > bound) == above for field, _, bound, above in GATES},
        )
        out["forms"][name] = figures
        out["reference_perplexity"] = figures["reference_perplexity"]
        log(
            f"{name}: KL {figures['kl']:.5f}, perplexity ×{figures['perplexity_ratio']:.5f}, "
            f"top-1 {figures['top1']:.2%} ({time.perf_counter() - start:.1f} s)"
        )
        del model
    return out


def misses(result: dict) -> list[str]:
    """One line for every gate a form misses, saying by how much."""
    lines = []
    for name, f in result["forms"].items():
        for field, gate, bound, above in GATES:
            if not f["gates"][field]:
                value, by = f[field], (bound - f[field]) if above else (f[field] - bound)
                if field == "top1":
                    lines.append(f"{name}: top-1 {value:.2%} misses {gate} by {by * 100:.2f} points")
                elif field == "kl":
                    lines.append(f"{name}: KL {value:.4f} misses {gate} by {by:.4f} ({value / bound:.1f}× the bound)")
                else:
                    lines.append(f"{name}: perplexity +{(value - 1):.2%} misses {gate} by {by * 100:.2f} points")
    return lines


def quality_table(result: dict) -> str:
    def row(label, f, gates: str, weights="—", kv="—") -> str:
        ppl = f"{f['perplexity']:.3f}" if "perplexity" in f else "—"
        return (
            f"| {label} | {f['kl']:.5f} | {ppl} | {(f['perplexity_ratio'] - 1) * 100:+.3f} % | "
            f"{f['top1'] * 100:.1f} % | {weights} | {kv} | {gates} |"
        )

    float_figures = result["float32"]
    lines = [
        "| form | mean KL | perplexity | perplexity vs float32 | same top-1 token | weights MB | KV bytes/token "
        "| gates: " + ", ".join(gate for _, gate, _, _ in GATES) + " |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        f"| float32 | — | {result['reference_perplexity']:.3f} | — | — | "
        f"{float_figures['weight_bytes'] / 1e6:.1f} | {float_figures['cache_bytes_per_token']:,} | — |",
    ]
    for f in result["forms"].values():
        gates = " ".join("PASS" if f["gates"][field] else "FAIL" for field, _, _, _ in GATES)
        lines.append(row(f["label"], f, gates, f"{f['weight_bytes'] / 1e6:.1f}", f"{f['cache_bytes_per_token']:,}"))
    lines.append(row("llama.cpp Q8_0, LLaMA-3-8B (published)", LLAMA_CPP_Q8_0, "—"))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Speed and memory: one worker process per (shape, form).


def memory_mb() -> dict:
    """This process's resident memory now and at its peak (MB), from /proc/self/status."""
    import resource

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out["rss_mb" if key == "VmRSS" else "peak_rss_mb"] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


def give_back_freed_memory() -> None:
    """Collects garbage and asks glibc to return freed heap to the system: the float kernels that
    quantization replaced stay in malloc's arenas otherwise, and resident memory would count them."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def worker(shape: str, form: str, batches: list[int], prompt_len: int, new_tokens: int) -> None:
    """Builds the model, warms generation up at every batch size and says so (one JSON line);
    then times one generation for each `run BATCH` line of stdin and reports memory at `quit`."""
    import fiddle as fdl
    import jax
    import numpy as np
    from flax import nnx

    from nnxlm.generation import stream
    from nnxlm.metrics import parameter_count
    from nnxlm.quantize import cache_bytes_per_token, weight_bytes

    start = time.perf_counter()
    model = fdl.build(shape_config(shape, form_settings(form, 128)))(rngs=nnx.Rngs(0))
    jax.block_until_ready(nnx.state(model))
    built = time.perf_counter()
    abstract = nnx.eval_shape(lambda: fdl.build(shape_config(shape, None))(rngs=nnx.Rngs(0)))
    # The programs that initialised and quantized the weights go: a server loading an int8
    # checkpoint never compiles them (they held ~90 MB more in an int8 process than a float one).
    jax.clear_caches()
    give_back_freed_memory()
    # the same prompts in every form's process
    prompts = {
        b: np.random.default_rng(b).integers(4, model.vocab_size, (b, prompt_len)).astype(np.int32) for b in batches
    }

    def generate_once(batch: int) -> dict:
        begin = time.perf_counter()
        parts = stream(model, prompts[batch], new_tokens)
        next(parts)  # the prefill's token, on the host
        first = time.perf_counter() - begin
        *_, out = parts
        total = time.perf_counter() - begin
        return {"prefill_s": first, "decode_s": total - first, "tokens": out.shape[1]}

    for b in batches:  # compiles prefill and decode
        generate_once(b)
    ready = {
        "parameters": parameter_count(abstract),
        "weight_bytes": weight_bytes(model),
        "cache_bytes_per_token": cache_bytes_per_token(model),
        "build_s": built - start,
        "warm_up_s": time.perf_counter() - built,
    }
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[:1] == ["run"]:
            print(json.dumps(generate_once(int(command[1]))), flush=True)
        elif command[:1] == ["quit"]:
            break
    give_back_freed_memory()
    emit(memory_mb())


def speed(shapes: list[str], forms: list[str], batches: list[int], prompt_len: int, new_tokens: int, runs: int, log):
    """Decode speed and memory of every (shape, form), the forms of a shape asked in turn."""
    scratch = tempfile.mkdtemp(prefix="nnxlm-bench-quantize-")
    results = {}
    try:
        for shape in shapes:
            workers, memory = {}, {}
            try:
                for form in forms:  # one at a time: a worker builds and compiles on both cores
                    args = ["worker", "--shape", shape, "--form", form, "--prompt_len", str(prompt_len)]
                    args += ["--new_tokens", str(new_tokens), "--batch", *map(str, batches)]
                    workers[form] = Worker("bench.quantize", args, os.path.join(scratch, f"{shape}-{form}.log"))
                    ready = workers[form].ready
                    log(f"{shape} {form}: built in {ready['build_s']:.1f} s, warmed up in {ready['warm_up_s']:.1f} s")
                timings = {form: {b: [] for b in batches} for form in forms}
                for r in range(runs):
                    for b in batches:
                        for form in forms:
                            timings[form][b].append(workers[form].ask(f"run {b}"))
                    log(f"{shape} round {r + 1}, decode tok/s: " + "; ".join(_round_line(timings[f], f) for f in forms))
                for form in forms:
                    memory[form] = workers[form].close()
            finally:
                for w in workers.values():
                    w.kill()
            results[shape] = {
                "parameters": workers[forms[0]].ready["parameters"],
                "forms": {form: _form_result(workers[form].ready, memory[form], timings[form]) for form in forms},
            }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def _rate(batch: int, timing: dict) -> float:
    """Decode tokens/s of one generation: the tokens after the first over the time after it."""
    return batch * (timing["tokens"] - 1) / timing["decode_s"]


def _round_line(timings: dict, form: str) -> str:
    return f"{form} " + " / ".join(f"{_rate(b, runs[-1]):,.0f}" for b, runs in timings.items())


def _form_result(ready: dict, memory: dict, timings: dict) -> dict:
    batches = {
        b: {
            "decode_tokens_per_s": median(_rate(b, t) for t in runs),
            "prefill_ms": median(t["prefill_s"] * 1e3 for t in runs),
            "runs_decode_tokens_per_s": [_rate(b, t) for t in runs],
        }
        for b, runs in timings.items()
    }
    keep = ("weight_bytes", "cache_bytes_per_token", "build_s", "warm_up_s")
    return {
        "batches": batches,
        **{k: ready[k] for k in keep},
        "rss_mb": memory.get("rss_mb", float("nan")),  # /proc (Linux) only
        "peak_rss_mb": memory["peak_rss_mb"],
    }


def speed_table(result: dict) -> str:
    batches = result["batch"]
    lines = [
        "| model | form | weights MB | KV bytes/token | "
        + " | ".join(f"decode tok/s, batch {b} (× float32)" for b in batches)
        + " | prefill ms, batch "
        + " / ".join(map(str, batches))
        + " | resident MB | peak RSS MB |",
        "|---|---|---:|---:|" + "---:|" * len(batches) + "---:|---:|---:|",
    ]
    for shape in result["shapes"].values():
        forms = shape["forms"]
        reference = forms.get("float32")
        for name, f in forms.items():
            cells = []
            for b in batches:
                rate = f["batches"][_key(f["batches"], b)]["decode_tokens_per_s"]
                base = reference and reference["batches"][_key(reference["batches"], b)]["decode_tokens_per_s"]
                cells.append(f"{rate:,.1f} ({rate / base:.2f}×)" if base else f"{rate:,.1f}")
            prefill = " / ".join(f"{f['batches'][_key(f['batches'], b)]['prefill_ms']:,.0f}" for b in batches)
            lines.append(
                f"| {shape['parameters'] / 1e6:.1f} M | {form_label(name, 128)} | {f['weight_bytes'] / 1e6:,.1f} | "
                f"{f['cache_bytes_per_token']:,} | " + " | ".join(cells) + f" | {prefill} | "
                f"{f['rss_mb']:,.0f} | {f['peak_rss_mb']:,.0f} |"
            )
    return "\n".join(lines)


def _key(mapping: dict, batch: int):
    """A batch's key: an int, or its string once the result went through JSON."""
    return batch if batch in mapping else str(batch)


# --------------------------------------------------------------------------------------------------


def section(result: dict) -> str:
    """The markdown of results.md's Quantization section."""
    lines = [
        f"## Quantization (`python -m bench.quantize`, {result['date']})",
        "",
        f"{result['machine']}; whole run {result['wall_s'] / 60:.1f} min.",
    ]
    q = result.get("quality")
    if q:
        source = q["source"]
        lines += [
            "",
            f"Quality: {source}, {q['parameters'] / 1e6:.1f} M parameters (vocabulary {q['vocab_size']:,}); "
            f"{q['rows']} rows of {q['row_len']} next-token predictions ({q['rows'] * q['row_len']:,} in all) "
            "of held-out text (the standard library's eval split), each form against float32, logits from a "
            "prefill through each model's own KV cache. The embedding and the head stay float32 except in the "
            "row that says otherwise.",
            "",
            quality_table(q),
        ]
        missed = misses(q)
        lines += ["", "Gates missed: " + ("; ".join(missed) + "." if missed else "none.")]
    s = result.get("speed")
    if s:
        new, prompt, runs = s["new_tokens"], s["prompt_len"], s["runs"]
        lines += [
            "",
            f"Speed and memory: random weights, a {prompt}-token random prompt continued by {new} greedy tokens; "
            f"decode tok/s = batch × {new - 1} / the time after the first new token, medians of {runs} rounds "
            "in which every form's own process generates in turn; × float32 from the same rounds. Resident: "
            "each process after decoding, freed heap returned (malloc_trim); peak includes building the "
            "float32 weights before they are quantized.",
            "",
            speed_table(s),
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["worker"]:
        parser = argparse.ArgumentParser()
        parser.add_argument("--shape", choices=list(SHAPES), required=True)
        parser.add_argument("--form", choices=SPEED_FORMS, required=True)
        parser.add_argument("--batch", type=int, nargs="+", required=True)
        parser.add_argument("--prompt_len", type=int, required=True)
        parser.add_argument("--new_tokens", type=int, required=True)
        a = parser.parse_args(argv[1:])
        worker(a.shape, a.form, a.batch, a.prompt_len, a.new_tokens)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("quality", "speed"), default=["quality", "speed"])
    parser.add_argument("--checkpoint", help="a trained run directory (default: train one for --train_steps)")
    parser.add_argument("--train_steps", type=int, default=400)
    parser.add_argument("--vocab_size", type=int, default=2048, help="of the model trained without --checkpoint")
    parser.add_argument("--rows", type=int, default=32, help="rows of held-out text")
    parser.add_argument("--row_len", type=int, default=256, help="next-token predictions a row")
    parser.add_argument("--block_size", type=int, default=128, help="inputs a scale in the w8a8-block form")
    parser.add_argument("--quality_forms", nargs="+", choices=list(QUALITY_FORMS), default=list(QUALITY_FORMS))
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--forms", nargs="+", choices=SPEED_FORMS, default=list(SPEED_FORMS), help="speed part")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3, help="timed rounds of every form (after a warm-up)")
    parser.add_argument("--json", action="store_true", help="end with the result as one JSON line (python -m bench)")
    parser.add_argument("--output", help="also write the markdown section for bench/results.md here")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    result = {
        "date": f"{datetime.datetime.now():%Y-%m-%d}",
        "machine": machine_line(skip=("torch", "transformers")),
    }
    if "quality" in args.parts:
        with tempfile.TemporaryDirectory(prefix="nnxlm-bench-quantize-run-") as scratch:
            if args.checkpoint:
                run, source = args.checkpoint, f"the trained run `{args.checkpoint}`"
            else:
                log(f"training the demo's shape, vocabulary {args.vocab_size}, for {args.train_steps} steps")
                run = train_model(scratch, args.train_steps, args.vocab_size, log)
                source = (
                    f"the demo's shape with a {args.vocab_size}-token tokenizer, trained here for "
                    f"{args.train_steps} steps of 4 × 256 tokens of the standard library"
                )
            result["quality"] = quality(run, args.quality_forms, args.rows, args.row_len, args.block_size, log)
            result["quality"]["source"] = source
        print(quality_table(result["quality"]), flush=True)
        for line in misses(result["quality"]):
            print(f"gate missed: {line}", flush=True)
    if "speed" in args.parts:
        shapes = speed(args.shapes, args.forms, args.batch, args.prompt_len, args.new_tokens, args.runs, log)
        result["speed"] = {
            "shapes": shapes,
            "batch": args.batch,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "runs": args.runs,
        }
        print(speed_table(result["speed"]), flush=True)
    result["wall_s"] = time.perf_counter() - started
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(section(result))
    if args.json:
        emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
