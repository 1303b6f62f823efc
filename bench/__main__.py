"""`python -m bench` (what `make bench` runs): every benchmark of bench/, then bench/results.md.

    python -m bench [--launches 3] [--rounds 5] [--no_hf] [--only train data checkpoint decode serve quantize moe
                    long_context]

In order: the fp32 matmul peak; training (bench.train: fresh launches and alternating blocks of
steps of nnxlm and, with the bench extra installed, transformers) and where nnxlm's launch time
goes; the data pipeline (bench.data); checkpointing (bench.checkpoint); decoding (bench.decode);
serving to 1, 4 and 16 streaming clients (bench.serve); int8 quantization against float32
(bench.quantize: quality, decode speed, memory; a section of its own after the table); mixture-of-experts
training, nnxlm's sorted and dense dispatches and transformers' Mixtral (bench.moe: a section of its
own); long-context training at 2048 and 4096 tokens, nnxlm's blockwise and dense attention and
transformers' SDPA (bench.long_context: a section of its own, and blockwise's tokens/s in the table);
the peak again.
Every benchmark runs in a process of its own. The MFU of both frameworks divides by the same peak:
the best of the two measurements, so a busy machine at one of them does not inflate it. --output
(default bench/results.md) is where the table goes.
"""

import argparse
import datetime
import importlib.util
import os
import platform
import sys
import time

from bench import train
from bench.common import REPO, Row, cpu_model, median, results_markdown, run_worker, versions

PARTS = ("train", "data", "checkpoint", "decode", "serve", "quantize", "moe", "long_context")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=3, help="fresh `nnxlm train` launches of each recipe")
    parser.add_argument("--rounds", type=int, default=5, help="alternating blocks of training steps")
    parser.add_argument("--no_hf", action="store_true", help="skip transformers even when installed")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=PARTS)
    parser.add_argument("--output", default=os.path.join(REPO, "bench", "results.md"))
    args = parser.parse_args(argv)
    with_hf = not args.no_hf and all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
    if not with_hf and not args.no_hf:
        print("torch/transformers not installed (pip install -e '.[bench]'): nnxlm only", file=sys.stderr)
    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    peaks = [run_worker(["bench.common", "peak", "jax"])["flops"]]
    log(f"fp32 matmul peak {peaks[0] / 1e9:.0f} GFLOP/s")
    results, notes = {}, []
    if "train" in args.only:
        recipes = list(train.BLOCK_STEPS)
        results["train"] = train.bench(recipes, args.launches, args.rounds, peaks[0], with_hf, log=log)
        breakdown = train.run_breakdown("bench_llama_20m")
        log(f"launch breakdown: {breakdown['phases']}")
        phases = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in breakdown["phases"].items())
        notes.append(f"Launch of `nnxlm train --recipe bench_llama_20m`, phase by phase (one run): {phases}.")
    if "data" in args.only:
        results["data"] = run_worker(["bench.data"])
        log(f"data pipeline {results['data']['tokens_per_s']:,.0f} tokens/s")
    if "checkpoint" in args.only:
        results["checkpoint"] = run_worker(["bench.checkpoint", "--recipe", "bench_llama_57m"])
        log(f"checkpoint {results['checkpoint']}")
    if "decode" in args.only:
        results["decode"] = run_worker(["bench.decode", "--runs", "3", "--json"] + ([] if with_hf else ["--no_hf"]))
        log(f"decode {results['decode']['batches']}")
    if "serve" in args.only:
        from bench import serve

        results["serve"] = run_worker(["bench.serve", "--json"] + ([] if with_hf else ["--no_hf"]), timeout=1200)
        log("serve\n" + serve.table(results["serve"]))
    if "quantize" in args.only:  # its tables compare int8 with float32, not with a peer: a section of its own
        from bench import quantize

        results["quantize"] = run_worker(["bench.quantize", "--json"], timeout=2400)
        log("quantize\n" + quantize.section(results["quantize"]))
    if "moe" in args.only:  # three implementations, not nnxlm against one peer: a section of its own
        from bench import moe

        results["moe"] = run_worker(["bench.moe", "--json"] + ([] if with_hf else ["--no_hf"]), timeout=2400)
        log("moe\n" + moe.section(results["moe"]))
    if "long_context" in args.only:  # three configurations: a section of its own, blockwise's row in the table
        from bench import long_context

        command = ["bench.long_context", "--json"] + ([] if with_hf else ["--no_hf"])
        results["long_context"] = run_worker(command, timeout=2400)
        log("long_context\n" + long_context.section(results["long_context"]))
    torch_peak = run_worker(["bench.common", "peak", "torch"])["flops"] if with_hf else None
    peaks.append(run_worker(["bench.common", "peak", "jax"])["flops"])
    peak = max(peaks)
    log(f"fp32 matmul peak again {peaks[1] / 1e9:.0f} GFLOP/s; MFU uses {peak / 1e9:.0f}")
    rows = table_rows(results, peak, notes)

    machine = [
        f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        ", ".join(f"{name} {version}" for name, version in versions().items()),
        f"fp32 matmul peak {peak / 1e9:.0f} GFLOP/s, measured with XLA in this run (best of 10 products of "
        "1536² and 2048² matrices, at the start and the end); MFU of both frameworks divides by it"
        + (f"; PyTorch's own matmul reached {torch_peak / 1e9:.0f} GFLOP/s" if torch_peak else ""),
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}, whole run {time.perf_counter() - started:.0f} s; "
        "figures are medians over the repeats shown (blocks of steps, launches, runs), nnxlm and its peer "
        "alternating in the same run",
    ]
    notes.insert(0, "How each figure is taken: bench/README.md.")
    markdown = results_markdown("nnxlm benchmarks", machine, rows, notes)
    if "quantize" in results:
        markdown += "\n" + quantize.section(results["quantize"])
    if "moe" in results:
        markdown += "\n" + moe.section(results["moe"])
    if "long_context" in results:
        markdown += "\n" + long_context.section(results["long_context"])
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(markdown)
    print(markdown)
    return 0


def table_rows(results: dict, peak: float, notes: list[str]) -> list[Row]:
    """The table's rows from the benchmarks' results (appending to notes what fits no row)."""
    rows = []
    for name, result in results.get("train", {}).items():
        rows += train_rows(result, peak)
        logged = median(r["logged_flops_per_token"] for r in result["launch"]["nnxlm"])
        notes.append(
            f"`nnxlm train --recipe {name}` logged its MFU with {logged / 1e6:.2f} MFLOP/token; "
            f"the table uses {result['shape']['flops_per_token'] / 1e6:.2f}."
        )
    if "long_context" in results:  # blockwise attention's tokens/s beside transformers' SDPA
        from bench import long_context

        rows += long_context.rows(results["long_context"])
    if "data" in results:
        rate, note = results["data"]["tokens_per_s"], ""
        if "train" in results:  # tokens a step over the median step time
            consumed = 256 * 4 / median(results["train"]["bench_llama_20m"]["steps"]["nnxlm"]["blocks"])
            note = f"{rate / consumed:,.0f}× what bench_llama_20m training consumes"
        rows.append(Row("data pipeline (stdlib text → 4 × 256)", "tokens/s delivered", rate, note=note, repeats=3))
    if "checkpoint" in results:
        checkpoint = results["checkpoint"]
        what = f"checkpoint 56.9 M ({checkpoint['checkpoint_mb']:,.0f} MB train state)"
        rows.append(Row(what, "async save: blocking s", checkpoint["save_blocking_s"], fmt="{:.3f}", repeats=3))
        rows.append(Row(what, "save, written to disk s", checkpoint["save_total_s"], fmt="{:.2f}", repeats=3))
        rows.append(Row(what, "restore s", checkpoint["restore_s"], fmt="{:.2f}", repeats=3))
    if "decode" in results:
        runs = results["decode"]["runs"]
        for batch, figures in results["decode"]["batches"].items():
            what = f"decode 20.6 M, batch {batch}"
            rate = (figures["tokens_per_s"], figures.get("hf_tokens_per_s"))
            rows.append(Row(what, "new tokens/s", *rate, repeats=runs))
            ttft = (figures["ttft_s"] * 1e3, figures.get("hf_ttft_s", 0) * 1e3 or None)
            rows.append(Row(what, "time to first token ms", *ttft, fmt="{:.1f}", higher_is_better=False, repeats=runs))
    if "serve" in results:
        rows += serve_rows(results["serve"])
        notes.append(
            "serve: nnxlm's OpenAI-compatible server (Engine with 16 slots) streaming to 1, 4 and 16 concurrent "
            "clients; its peer, on the 1-client rows only, is transformers' `generate` in a loop, one request at "
            "a time, on the same weights; ITL: inter-token latency (gap between chunks / tokens in the chunk)."
        )
    return rows


def serve_rows(result: dict) -> list[Row]:
    rows = []
    for figures in result["recipes"].values():
        hf = figures.get("hf")
        for clients, f in figures["clients"].items():
            what = f"serve {figures['parameters'] / 1e6:.1f} M, {clients} streaming client{'s' * (int(clients) > 1)}"
            peer = hf if int(clients) == 1 else None
            repeats = figures["rounds"]
            speedup = f"{f['speedup']:.2f}× one client" if int(clients) > 1 and "speedup" in f else ""
            rows.append(
                Row(what, "tokens/s", f["tokens_per_s"], peer and peer["tokens_per_s"], repeats=repeats, note=speedup)
            )
            for metric, key in (("time to first token p50 ms", "ttft_ms"), ("inter-token latency p50 ms", "itl_ms")):
                rows.append(
                    Row(
                        what,
                        metric,
                        f[key]["p50"],
                        peer and peer[key]["p50"],
                        fmt="{:.1f}",
                        higher_is_better=False,
                        repeats=repeats,
                        note=f"p99 {f[key]['p99']:.1f}" + (f", peer's {peer[key]['p99']:.1f}" if peer else ""),
                    )
                )
    return rows


def train_rows(result: dict, peak: float) -> list[Row]:
    shape, steps, launches = result["shape"], result["steps"], result["launch"]
    tokens = shape["batch_size"] * shape["seq_len"]
    what = f"train {shape['parameters'] / 1e6:.1f} M ({shape['batch_size']} × {shape['seq_len']} tokens a step)"
    step_s = {name: median(r["blocks"]) for name, r in steps.items()}
    rate = {name: tokens / s for name, s in step_s.items()}
    mfu = {name: r * shape["flops_per_token"] / peak for name, r in rate.items()}
    launch = {name: median(r["launch_s"] for r in runs) for name, runs in launches.items() if runs}
    rss = {name: r["peak_rss_mb"] for name, r in steps.items()}
    blocks, n_launches = len(steps["nnxlm"]["blocks"]), len(launches["nnxlm"])
    return [
        Row(what, "tokens/s", rate["nnxlm"], rate.get("hf"), repeats=blocks),
        Row(what, "step time s", step_s["nnxlm"], step_s.get("hf"), "{:.3f}", False, blocks),
        Row(
            what,
            "MFU",
            mfu["nnxlm"],
            mfu.get("hf"),
            "{:.1%}",
            repeats=blocks,
            note=f"{shape['flops_per_token'] / 1e6:.1f} MFLOP/token",
        ),
        Row(what, "launch → first step s", launch["nnxlm"], launch.get("hf"), "{:.1f}", False, n_launches),
        Row(
            what,
            "relaunch → first step s",
            result["relaunch_s"],
            fmt="{:.1f}",
            repeats=1,
            note="same run directory: compilation cache warm",
        ),
        Row(what, "peak RSS MB", rss["nnxlm"], rss.get("hf"), "{:,.0f}", False, 1),
    ]


if __name__ == "__main__":
    sys.exit(main())
