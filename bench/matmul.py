"""The matmuls of bench.long_context's training step, one by one: XLA (what nnxlm's step runs) against
PyTorch (what transformers' step runs), on CPU.

    python -m bench.matmul [--seq_len 2048] [--rounds 5] [--json] [--output PATH]

The long-context step is made of matmuls: at 2,048 tokens, 85 % of its FLOPs are in the weights'
products and the attention's block products. This times each product the step computes, in the
layout each framework computes it (nnxlm: kernels [in, out], so a weight's gradient is x^T dy;
PyTorch: nn.Linear's weights [out, in], so it is dy^T x), and adds them up as often as one step
runs them, per part of the model, for each framework. The attention blocks are nnxlm's blockwise
attention's (nnxlm.modules.flash): 256 queries of the 2 heads sharing a key-value head (512 rows)
against 256 keys, 2 block pairs x 2 key-value heads a batch; forward QK^T and PV, backward QK^T,
dP = dO V^T, dV^T = dO^T P, dK^T = Q^T dS, dQ = dS K. PyTorch's SDPA runs its own blocks; the same
products in PyTorch show what its matmuls do with those shapes.

Each framework runs in processes of its own (PyTorch's OpenMP threads keep spinning after a product
and would slow XLA's): --rounds processes of each, alternating; a product's time is the median over
rounds of the fastest of RUNS runs.
"""

import argparse
import datetime
import json
import sys
import time

from bench.common import machine_line, median, report, run_worker
from bench.long_context import MODEL

BLOCK = 256  # flash's default block_size; 2 pairs a chunk (CHUNK_ELEMENTS at batch 1, 4 heads)
# runs of a product, one at a time, of which the fastest is its time: a block product takes 0.4 ms,
# and Python's dispatch of each (which a compiled step does not pay) slows a few; JAX's
# asynchronous dispatch of runs back to back would run them side by side, slower still
RUNS = 20


def products(seq_len: int) -> list[dict]:
    """[{part, name, nnxlm: (spec, lhs, rhs), torch: (spec, lhs, rhs), flops, count}]: each product
    of one training step of MODEL at seq_len tokens (one row), as each framework computes it, and
    how many times a step runs it."""
    d, f, v, layers = MODEL["d_model"], MODEL["mlp_dim"], MODEL["vocab_size"], MODEL["num_layers"]
    kv = MODEL["num_kv_heads"] * MODEL["head_dim"]
    t, out = seq_len, []
    weights = {"q": ("projections", d, d), "k, v": ("projections", d, kv), "o": ("projections", d, d)}
    weights |= {"gate, up": ("MLP", d, f), "down": ("MLP", f, d), "head": ("head", d, v)}
    counts = {"k, v": 2 * layers, "gate, up": 2 * layers, "head": 1}
    for name, (part, n_in, n_out) in weights.items():
        count, flops = counts.get(name, layers), 2 * t * n_in * n_out
        forms = {  # nnxlm: x [t, in] @ kernel [in, out]; torch: x @ weight[out, in]^T
            "forward": (("ti,io->to", (t, n_in), (n_in, n_out)), ("ti,oi->to", (t, n_in), (n_out, n_in))),
            "input gradient": (("to,io->ti", (t, n_out), (n_in, n_out)), ("to,oi->ti", (t, n_out), (n_out, n_in))),
            "weight gradient": (("ti,to->io", (t, n_in), (t, n_out)), ("to,ti->oi", (t, n_out), (t, n_in))),
        }
        for form, (ours, theirs) in forms.items():
            out.append(dict(part=part, name=f"{name} {form}", nnxlm=ours, torch=theirs, flops=flops, count=count))
    blocks = -(-seq_len // BLOCK)
    chunks = blocks * (blocks + 1) / 2 / 2  # causal block pairs, 2 a chunk
    group, dim = MODEL["num_heads"] // MODEL["num_kv_heads"], MODEL["head_dim"]
    batch, rows = 2 * MODEL["num_kv_heads"], group * BLOCK
    flops = 2 * batch * rows * BLOCK * dim
    attention = {  # (spec, lhs, rhs, times a chunk: forward + backward)
        "scores (QK^T; dP = dO V^T)": ("brh,bsh->brs", (batch, rows, dim), (batch, BLOCK, dim), 3),
        "PV; dQ = dS K": ("brs,bsh->brh", (batch, rows, BLOCK), (batch, BLOCK, dim), 2),
        "dV^T = dO^T P; dK^T = Q^T dS": ("bhr,brs->bhs", (batch, dim, rows), (batch, rows, BLOCK), 2),
    }
    for name, (spec, lhs, rhs, times) in attention.items():
        out.append(
            dict(
                part="attention blocks",
                name=name,
                nnxlm=(spec, lhs, rhs),
                torch=(spec, lhs, rhs),
                flops=flops,
                count=times * chunks * layers,
            )
        )
    return out


def operands_transposed(spec: str) -> tuple[bool, bool]:
    """For an einsum "[b]xy,[b]zw->[b]mn" whose output's rows come from the left operand and its
    columns from the right: whether each operand is the transpose of a plain matmul's ([b] m k, [b] k n)."""
    operands, out = spec.split("->")
    lhs, rhs = operands.split(",")
    return lhs[-1] == out[-2], rhs[-1] != out[-1]


def worker(framework: str, seq_len: int) -> dict:
    """{product name: seconds, the fastest of RUNS runs} for every product, in `framework`."""
    import numpy as np

    rng = np.random.default_rng(0)
    timings = {}
    for product in products(seq_len):
        spec, lhs, rhs = product[framework]
        a, b = (rng.standard_normal(shape, dtype=np.float32) for shape in (lhs, rhs))
        if framework == "torch":
            import torch

            # as autograd calls it: one matmul of (possibly transposed) views, no copies
            transpose_a, transpose_b = operands_transposed(spec)
            a, b = torch.from_numpy(a), torch.from_numpy(b)
            a, b = (x.transpose(-1, -2) if t else x for x, t in ((a, transpose_a), (b, transpose_b)))
            run = lambda a=a, b=b: torch.matmul(a, b)  # noqa: E731
        else:
            import jax
            import jax.numpy as jnp

            product_fn = jax.jit(lambda a, b, spec=spec: jnp.einsum(spec, a, b))
            a, b = jnp.asarray(a), jnp.asarray(b)
            run = lambda a=a, b=b, fn=product_fn: fn(a, b).block_until_ready()  # noqa: E731
        run()
        times = []
        for _ in range(RUNS):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        timings[product["name"]] = min(times)
    return timings


def bench(seq_len: int, rounds: int, log) -> dict:
    """{"products": [each with "seconds": {framework: median s}], "parts": {part: {framework: step
    matmul s}}, "flops": a step's matmul FLOPs}."""
    runs = {"nnxlm": [], "torch": []}
    for r in range(rounds):
        for framework in runs:
            runs[framework].append(run_worker(["bench.matmul", "worker", framework, str(seq_len)]))
        log(f"round {r + 1} of {rounds}")
    table, parts = products(seq_len), {}
    for product in table:
        product["seconds"] = {fw: median(run[product["name"]] for run in runs[fw]) for fw in runs}
        part = parts.setdefault(product["part"], {"flops": 0.0, **{fw: 0.0 for fw in runs}})
        part["flops"] += product["flops"] * product["count"]
        for fw in runs:
            part[fw] += product["seconds"][fw] * product["count"]
    return {"seq_len": seq_len, "rounds": rounds, "products": table, "parts": parts}


def section(result: dict) -> str:
    rate = lambda flops, seconds: f"{flops / seconds / 1e9:,.0f}"  # noqa: E731
    lines = [
        f"## The step's matmuls, XLA against PyTorch (`python -m bench.matmul`, {result['date']})",
        "",
        f"{result['machine']}.",
        "",
        f"Every matmul of bench.long_context's training step at {result['seq_len']:,} tokens, timed alone in each "
        f"framework's own layout (median over {result['rounds']} processes of each, alternating, of the fastest "
        f"of {RUNS} runs), and added up as often as one step runs it.",
        "",
        "| product | shapes (nnxlm) | a step | XLA GFLOP/s | PyTorch GFLOP/s | XLA / PyTorch time |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for p in result["products"]:
        spec, lhs, rhs = p["nnxlm"]
        ours, theirs = p["seconds"]["nnxlm"], p["seconds"]["torch"]
        shapes = f"{spec} {'x'.join(map(str, lhs))} · {'x'.join(map(str, rhs))}"
        lines.append(
            f"| {p['part']}: {p['name']} | `{shapes}` | {p['count']:g} | {rate(p['flops'], ours)} | "
            f"{rate(p['flops'], theirs)} | {ours / theirs:.2f} |"
        )
    lines += ["", "| part of the step | GFLOP | XLA s | PyTorch s | XLA − PyTorch |", "|---|---:|---:|---:|---:|"]
    total = {"flops": 0.0, "nnxlm": 0.0, "torch": 0.0}
    for name, part in result["parts"].items():
        for key in total:
            total[key] += part[key]
        lines.append(
            f"| {name} | {part['flops'] / 1e9:,.1f} | {part['nnxlm']:.3f} | {part['torch']:.3f} | "
            f"{(part['nnxlm'] - part['torch']) * 1e3:+,.0f} ms |"
        )
    lines.append(
        f"| **all** | {total['flops'] / 1e9:,.1f} | {total['nnxlm']:.3f} | {total['torch']:.3f} | "
        f"{(total['nnxlm'] - total['torch']) * 1e3:+,.0f} ms |"
    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5, help="processes of each framework, alternating")
    parser.add_argument("--json", action="store_true", help="end with the result as one JSON line")
    parser.add_argument("--output", help="also write the markdown section for bench/results.md here")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    result = bench(args.seq_len, args.rounds, log)
    result.update(date=f"{datetime.datetime.now():%Y-%m-%d}", machine=machine_line(skip=("flax", "transformers")))
    report(result, section(result), args.output, args.json)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        print(json.dumps(worker(sys.argv[2], int(sys.argv[3]))))
    else:
        sys.exit(main())
