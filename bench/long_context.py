"""Long-context training: nnxlm's blockwise attention against its dense path and against transformers
with PyTorch's scaled_dot_product_attention, at 2048 and 4096 tokens a row, on CPU.

    python -m bench.long_context [--lengths 2048 4096] [--rounds 3] [--steps 3] [--probes 2]
                                 [--block_size 256] [--no_hf] [--quick] [--json] [--output PATH]

The model: a 3.95 M-parameter Llama (hidden 256, 4 layers, 4 query / 2 key-value heads of 64, MLP
688, vocabulary 2048, untied head, fp32), small enough that the dense path at 4096 tokens steps in
seconds on 2 cores, and small beside its attention: at 4096 tokens causal attention is 25.2 of the
45.7 training MFLOP a token (at 2048, 12.6 of 33.1). One row a step; AdamW (nnxlm.optim's
defaults: betas 0.9 / 0.95, eps 1e-8, weight decay 0.1, clipping at 1.0) on both sides. Configurations:

- nnxlm blockwise: the attention's default implementation ("auto", blockwise past 1024 tokens),
  --block_size tokens per block of queries and of keys;
- nnxlm dense: implementation="dense" (the [length x length] scores and their gradient);
- transformers: LlamaForCausalLM(attn_implementation="sdpa") with torch.optim.AdamW(fused=True) and
  gradient clipping, bench.train's peer, on random tokens.

nnxlm's step is the Trainer's compiled train step (loss, gradient, optax AdamW update, one jitted
function), compiled ahead so that the executable timed is the one XLA's memory analysis describes;
its batch is one row of random tokens, one document, as transformers gets (no data pipeline).

Each (configuration, length) is a long-lived process of its own (bench.train's paired protocol):
the three of a length are asked in turn for a block of --steps steps, --rounds times, so a busy
moment on the shared machine spoils one block of each, not one configuration's run. Figures:

- tokens/s: tokens a row / step time; step time is the median over rounds of each block's median.
- compiled step temporaries (nnxlm only): memory_analysis().temp_size_in_bytes of the compiled
  step (activations kept for the backward pass, gradients, workspace; not the train state).
- step RSS rise: what a step adds to the process's resident memory at its peak, the comparable
  figure for PyTorch, which has no compiled plan. Before each of --probes untimed steps, once the
  last step's memory is back and freed heap returned to the system (malloc_trim), the kernel's
  high-water mark is reset (5 into /proc/self/clear_refs); the rise is VmHWM after the step minus
  VmRSS before it; the median.
- peak RSS: the process's high-water mark over its whole life (imports, initialisation,
  compilation, every step).
"""

import argparse
import ctypes
import datetime
import os
import shutil
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import Row, machine_line, median, report
from bench.train import Server, hf_model, hf_training_step, serve

MODEL = dict(vocab_size=2048, d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, mlp_dim=688)
CONFIGS = {
    "blockwise": "nnxlm, blockwise attention (default)",
    "dense": "nnxlm, dense attention",
    "hf": "transformers, SDPA",
}


# --------------------------------------------------------------------------------------------------
# The step processes: `python -m bench.long_context serve CONFIG SEQ_LEN BLOCK_SIZE PROBES`.


def _status_mb() -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (its high-water mark) of this process, MB."""
    with open("/proc/self/status", encoding="ascii") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def resting_rss_mb() -> float:
    """Resident MB once the last step's memory is back. XLA's threads free a step's temporaries
    just after its results are ready (a gigabyte was still resident when the loss had arrived), and
    glibc keeps freed heap unless trimmed: trim until two reads 0.2 s apart agree."""
    libc, last = ctypes.CDLL("libc.so.6"), None
    for _ in range(25):
        libc.malloc_trim(0)
        now = _status_mb()["VmRSS"]
        if last is not None and abs(now - last) < 1:
            break
        last = now
        time.sleep(0.2)
    return now


def step_rss_rise(step, probes: int) -> dict:
    """The median over `probes` untimed steps of what one adds to resident memory at its peak (see
    the module docstring), and the high-water mark before the first reset: resetting it resets
    getrusage's max RSS as well, so the process's peak is the larger of this and its final one."""
    peak_before = _status_mb()["VmHWM"]
    rises = []
    for _ in range(probes):
        before = resting_rss_mb()
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        step()
        rises.append(_status_mb()["VmHWM"] - before)
    return {"step_rss_rise_mb": median(rises), "step_rss_rises_mb": rises, "peak_rss_before_probes_mb": peak_before}


def shape(seq_len: int) -> dict:
    """MODEL, the row and AdamW's hyperparameters in the form bench.train's peer takes them."""
    from nnxlm.optim import AdamW

    optimizer = {k: getattr(AdamW(), k) for k in ("b1", "b2", "eps", "weight_decay", "clip_norm")}
    return dict(
        MODEL,
        rope_theta=10_000.0,
        norm_eps=1e-5,
        tie_embeddings=False,
        seq_len=seq_len,
        batch_size=1,
        optimizer=optimizer,
    )


def nnxlm_stepper(config: str, seq_len: int, block_size: int, probes: int):
    import fiddle as fdl
    import numpy as np

    from nnxlm.data import Synthetic
    from nnxlm.metrics import parameter_count
    from nnxlm.modules.blockwise import use_blockwise
    from nnxlm.recipes import models, trainer

    model = models.llama(**MODEL)
    model.scan_layers = False  # as the bench recipes (nnxlm.recipes.experiments._bench)
    implementation = "dense" if config == "dense" else "auto"
    model.block.attention.implementation, model.block.attention.block_size = implementation, block_size
    cfg = trainer(model, name=f"long-context-{config}", seq_len=seq_len, batch_size=1, num_steps=100)
    cfg.train_data = fdl.Config(Synthetic, vocab_size=MODEL["vocab_size"])  # never read: the batch is below
    cfg.eval_data = None
    tr = fdl.build(cfg).plan()  # no data pipeline, tokenizer or checkpointer
    tr.state = tr._fresh_state()
    # one row of random tokens, one document: what transformers gets
    ids = np.random.default_rng(0).integers(3, MODEL["vocab_size"], (1, seq_len + 1), dtype=np.int32)
    row = dict(
        inputs=ids[:, :-1],
        targets=ids[:, 1:],
        segment_ids=np.ones((1, seq_len), np.int32),
        positions=np.arange(seq_len, dtype=np.int32)[None],
        loss_mask=np.ones((1, seq_len), np.float32),
    )
    batch = tr._to_device(row)
    compiled = tr._train_step.lower(tr.state, batch).compile()

    def step():
        tr.state, metrics = compiled(tr.state, batch)
        float(metrics["loss"])  # waits for the step

    def info():
        return {
            "attention": "blockwise" if use_blockwise(implementation, seq_len) else "dense",
            "parameters": parameter_count(tr.model),
            "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
            **step_rss_rise(step, probes),
        }

    return step, lambda: None, info


def hf_stepper(seq_len: int, probes: int):
    model = hf_model(shape(seq_len))
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    step, _ = hf_training_step(model, list(model.parameters()), shape(seq_len))

    def info():
        return {
            "attention": "sdpa",
            "parameters": sum(p.numel() for p in model.parameters()),
            **step_rss_rise(step, probes),
        }

    return step, lambda: None, info


# --------------------------------------------------------------------------------------------------
# The parent: one length at a time, its three processes asked in turn.


def bench(lengths, rounds: int, steps: int, probes: int, block_size: int, with_hf: bool, log) -> dict:
    """{"lengths": {seq_len: {config: figures}}, "ratios": {seq_len: {...}}, and the settings}."""
    configs = [c for c in CONFIGS if with_hf or c != "hf"]
    scratch = tempfile.mkdtemp(prefix="nnxlm-bench-long-")
    out = {"lengths": {}, "ratios": {}}
    for seq_len in lengths:
        servers = {}
        try:
            for config in configs:  # one at a time: each compiles and probes on both cores
                args = [config, str(seq_len), str(block_size), str(probes)]
                log_path = os.path.join(scratch, f"{config}-{seq_len}.log")
                servers[config] = Server(args, log_path, module="bench.long_context")
                ready = servers[config].ready
                rise = ready["step_rss_rise_mb"]
                log(f"{seq_len} {config}: ready ({ready['attention']}), step RSS rise {rise:,.0f} MB")
            results = {config: {**server.ready, "blocks": []} for config, server in servers.items()}
            for r in range(rounds):
                for config, server in servers.items():
                    results[config]["blocks"].append(median(server.steps(steps)))
                log(
                    f"{seq_len} round {r + 1}: " + ", ".join(f"{c} {x['blocks'][-1]:.3f} s" for c, x in results.items())
                )
        except BaseException:
            log(f"bench.long_context failed; the step processes' logs are in {scratch}")
            raise
        finally:
            finals = {config: server.close()["peak_rss_mb"] for config, server in servers.items()}
        for config, result in results.items():
            result["step_s"] = median(result["blocks"])
            result["tokens_per_s"] = seq_len / result["step_s"]
            result["peak_rss_mb"] = max(finals[config], result.pop("peak_rss_before_probes_mb"))
            result.pop("ready", None)
            result.pop("first_step_epoch", None)
        out["lengths"][seq_len] = results
        out["ratios"][seq_len] = ratios(results)
    shutil.rmtree(scratch, ignore_errors=True)
    out.update(rounds=rounds, steps=steps, probes=probes, block_size=block_size, model=MODEL)
    return out


def ratios(results: dict) -> dict:
    """The same run's comparisons: temporaries and RSS rise dense / blockwise (how many times
    smaller blockwise's are), tokens/s blockwise / dense and blockwise / transformers."""
    blockwise, dense, hf = results["blockwise"], results["dense"], results.get("hf")
    out = {
        "temp_dense_over_blockwise": dense["temp_bytes"] / blockwise["temp_bytes"],
        "rss_rise_dense_over_blockwise": dense["step_rss_rise_mb"] / blockwise["step_rss_rise_mb"],
        "tokens_per_s_blockwise_over_dense": blockwise["tokens_per_s"] / dense["tokens_per_s"],
    }
    if hf:
        out["tokens_per_s_blockwise_over_hf"] = blockwise["tokens_per_s"] / hf["tokens_per_s"]
        # the fastest blocks: a busy moment on a shared machine slows nnxlm's step more than PyTorch's
        out["fastest_blockwise_over_hf"] = min(hf["blocks"]) / min(blockwise["blocks"])
        out["rss_rise_hf_over_blockwise"] = hf["step_rss_rise_mb"] / blockwise["step_rss_rise_mb"]
    return out


# --------------------------------------------------------------------------------------------------
# Reports: the markdown section of results.md, and the rows of its main table.


def section(result: dict) -> str:
    mib = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
    lengths = result["lengths"]
    parameters = next(iter(next(iter(lengths.values())).values()))["parameters"]
    lines = [
        f"## Long-context training (`python -m bench.long_context`, {result['date']})",
        "",
        f"{result['machine']}; whole run {result['wall_s'] / 60:.1f} min.",
        "",
        f"A {parameters / 1e6:.2f} M-parameter Llama (hidden 256, 4 layers, 4 query / 2 key-value heads of 64, "
        "MLP 688, vocabulary 2048, untied, fp32), one row a step, AdamW with clipping; nnxlm's Trainer step "
        f"(blockwise: the default attention, blocks of {result['block_size']} tokens; dense: "
        '`implementation="dense"`) against transformers\' LlamaForCausalLM with `attn_implementation="sdpa"` '
        "and `torch.optim.AdamW(fused=True)`. Step time: median over "
        f"{result['rounds']} rounds of each block's median ({result['steps']} steps a block), the "
        "configurations asked in turn. Temporaries: XLA's memory analysis of the compiled step. Step RSS "
        "rise: resident memory a step adds at its peak (the high-water mark reset once the previous step's "
        f"memory is back and freed heap trimmed; median of {result['probes']} steps). Peak RSS: each process "
        "over its whole life.",
        "",
        "| tokens a row | configuration | step s | blocks s, fastest – slowest | tokens/s | compiled step temporaries "
        "| step RSS rise | peak RSS |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for seq_len, results in lengths.items():
        for config, r in results.items():
            temp = mib(r["temp_bytes"]) if "temp_bytes" in r else "—"
            lines.append(
                f"| {int(seq_len):,} | {CONFIGS[config]} | {r['step_s']:.3f} "
                f"| {min(r['blocks']):.3f} – {max(r['blocks']):.3f} | {r['tokens_per_s']:,.0f} | {temp} "
                f"| {r['step_rss_rise_mb']:,.0f} MB | {r['peak_rss_mb']:,.0f} MB |"
            )
    lines.append("")
    for seq_len, q in result["ratios"].items():
        line = (
            f"{int(seq_len):,} tokens, same run: blockwise's temporaries {q['temp_dense_over_blockwise']:.1f}× "
            f"below dense's, step RSS rise {q['rss_rise_dense_over_blockwise']:.1f}× below; tokens/s "
            f"{q['tokens_per_s_blockwise_over_dense']:.2f}× dense's"
        )
        if "tokens_per_s_blockwise_over_hf" in q:
            line += f", {q['tokens_per_s_blockwise_over_hf']:.2f}× transformers'"
            line += f" ({q['fastest_blockwise_over_hf']:.2f}× in each one's fastest block)"
        lines.append(line + ".")
    return "\n".join(lines) + "\n"


def rows(result: dict) -> list[Row]:
    """Rows of results.md's table: blockwise tokens/s beside transformers', per length."""
    out = []
    for seq_len, results in result["lengths"].items():
        blockwise, hf = results["blockwise"], results.get("hf")
        what = f"train {blockwise['parameters'] / 1e6:.2f} M, 1 × {int(seq_len):,} tokens (blockwise attention)"
        note = f"peer with SDPA attention; nnxlm dense {results['dense']['tokens_per_s']:,.0f}"
        out.append(
            Row(
                what,
                "tokens/s",
                blockwise["tokens_per_s"],
                hf and hf["tokens_per_s"],
                repeats=result["rounds"],
                note=note,
            )
        )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--rounds", type=int, default=3, help="alternating blocks of steps")
    parser.add_argument("--steps", type=int, default=3, help="timed steps a block (after 2 warm-up steps)")
    parser.add_argument("--probes", type=int, default=2, help="untimed steps whose RSS rise is measured")
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--no_hf", action="store_true", help="skip transformers")
    parser.add_argument("--quick", action="store_true", help="a check run: 1 round of 2 steps, 1 probe")
    parser.add_argument("--json", action="store_true", help="end with the result as one JSON line (python -m bench)")
    parser.add_argument("--output", help="also write the markdown section for bench/results.md here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.probes = 1, 2, 1
    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    result = bench(args.lengths, args.rounds, args.steps, args.probes, args.block_size, not args.no_hf, log)
    result["date"] = f"{datetime.datetime.now():%Y-%m-%d}"
    result["machine"] = machine_line()
    result["wall_s"] = time.perf_counter() - started
    report(result, section(result), args.output, args.json)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        config, seq_len, block_size, probes = sys.argv[2], *map(int, sys.argv[3:6])
        if config == "hf":
            serve(*hf_stepper(seq_len, probes))
        else:
            serve(*nnxlm_stepper(config, seq_len, block_size, probes))
    else:
        sys.exit(main())
