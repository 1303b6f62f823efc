"""DPO step time and memory: LoRA (the reference is the base model with its adapters switched off,
no copy) against full fine-tuning (the reference is a frozen copy of the starting parameters kept
in the train state), on the same recipe, in alternating blocks of steps.

    python -m bench.dpo [--recipe bench_llama_57m] [--rank 16] [--rounds 4] [--steps 3] [--json]

--recipe may be repeated as for `nnxlm train` (a recipe, then set: and fiddler: edits), e.g.
`--recipe tiny --recipe set:model.num_layers=1`; the objective is then set to DPO.

Each configuration runs in a long-lived process of its own (bench.train's paired step protocol):
the parent asks each in turn for a block of steps, so both see the same machine load, and the
ratios come from the same run. The objective is nnxlm.objectives.DPO (sigmoid, beta 0.1), so the
trainer's reference path runs inside the compiled step; the adapters are rank 16, alpha 32, on
every projection (fiddler:lora). Batches are synthetic preference pairs laid out as
nnxlm.data.preferences lays them out (rows 2i chosen / 2i + 1 rejected, sharing a prompt of a
quarter of the row; only the response carries loss), fed straight to the trainer's compiled step.

Reported per configuration: median step time (median over blocks of each block's median), pairs/s
and tokens/s, trainable parameters, bytes of the train state beyond the model (optimizer state,
reference copy, RNG key), XLA's memory analysis of the compiled step (arguments + outputs - donated
+ temporaries, as `nnxlm inspect --compile` reports it), the process's peak RSS, and the DPO loss
of the first step (ln 2 = 0.693: the policy starts as its reference).
"""

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit, median
from bench.train import Server, serve

LABELS = {
    "dpo-full": "DPO, full fine-tuning (reference: frozen copy)",
    "dpo-lora": "DPO, LoRA (reference: adapters off)",
}


def preference_batches(count: int, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> list[dict]:
    """`count` batches of random pairs as nnxlm.data.preferences lays them out: rows 2i (chosen) and
    2i + 1 (rejected) share a prompt of seq_len // 4 tokens (bos first) and continue with responses
    of their own that fill the row; targets from the response's first token on carry loss."""
    import numpy as np

    rng = np.random.default_rng(seed)
    prompt_len = seq_len // 4
    ids = rng.integers(3, vocab_size, (count, batch_size, seq_len + 1), dtype=np.int32)
    ids[:, 1::2, :prompt_len] = ids[:, 0::2, :prompt_len]  # a pair's rows share the prompt
    ids[:, :, 0] = 1  # bos
    loss_mask = np.zeros((batch_size, seq_len), np.float32)
    loss_mask[:, prompt_len - 1 :] = 1.0
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len))
    segment_ids = np.ones((batch_size, seq_len), np.int32)
    return [
        dict(inputs=x[:, :-1], targets=x[:, 1:], segment_ids=segment_ids, positions=positions, loss_mask=loss_mask)
        for x in ids
    ]


def dpo_stepper(recipe: list[str], rank: int):
    """The trainer's compiled DPO step on `recipe` (directives), with LoRA adapters of `rank` (0: full
    fine-tuning)."""
    import fiddle as fdl
    import jax

    from nnxlm.objectives import DPO
    from nnxlm.recipes import fiddlers
    from nnxlm.recipes.directives import resolve

    cfg = resolve(recipe)
    cfg.workdir = tempfile.mkdtemp(prefix="nnxlm-bench-")
    cfg.objective = fdl.Config(DPO)
    if rank:
        fiddlers.lora(cfg, rank=rank, alpha=2.0 * rank)
    trainer = fdl.build(cfg).plan()  # no data pipeline or checkpointer: the batches come from here
    trainer.state = trainer._fresh_state()
    trainer._start_reference()  # "copy": the frozen copy; "adapters": folds the adapters (B = 0)
    batches = itertools.cycle(preference_batches(4, trainer.batch_size, trainer.seq_len, trainer.model_vocab_size))
    # compiled ahead: the executable timed is the one whose memory XLA analyses
    compiled = trainer._train_step.lower(trainer.state, trainer._to_device(next(batches))).compile()
    losses = []

    def step():
        batch = trainer._to_device(next(batches))
        trainer.state, metrics = compiled(trainer.state, batch)
        losses.append(float(metrics["loss"]))  # waits for the step

    def info():
        from flax import nnx

        def nbytes(tree):
            return int(sum(x.nbytes for x in jax.tree.leaves(tree)))

        beyond = {part: nbytes(trainer.state[part]) for part in trainer.state if part != "model"}
        memory = compiled.memory_analysis()  # as `nnxlm inspect --compile` reports it
        peak = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
        return {
            "reference_mode": trainer.reference_mode,
            "batch_size": trainer.batch_size,
            "seq_len": trainer.seq_len,
            "trainable": int(sum(x.size for x in jax.tree.leaves(nnx.state(trainer.model, trainer.trainable_filter)))),
            "model_bytes": nbytes(trainer.state["model"]),
            "beyond_model_bytes": sum(beyond.values()),
            "optimizer_bytes": beyond.get("optimizer", 0),
            "reference_bytes": beyond.get("reference", 0),
            "step_peak_bytes": peak + memory.temp_size_in_bytes,
            "step_temp_bytes": memory.temp_size_in_bytes,
            "first_loss": losses[0],
        }

    return step, lambda: shutil.rmtree(cfg.workdir, ignore_errors=True), info


def bench(recipe: list[str], rank: int, rounds: int, steps: int, log=print) -> dict:
    """{"results": {configuration: {"blocks": [median step s of each block], "step_s",
    "pairs_per_s", "tokens_per_s", "peak_rss_mb", and dpo_stepper's info}}, "ratios": {...}}."""
    scratch = tempfile.mkdtemp(prefix="nnxlm-bench-")
    servers = {}

    def start(name: str, lora_rank: int) -> Server:
        return Server([json.dumps(recipe), str(lora_rank)], os.path.join(scratch, f"{name}.log"), module="bench.dpo")

    try:
        with ThreadPoolExecutor() as pool:  # the processes start (import, initialize, compile) side by side
            starting = {name: pool.submit(start, name, r) for name, r in (("dpo-full", 0), ("dpo-lora", rank))}
        servers = {name: future.result() for name, future in starting.items() if not future.exception()}
        for future in starting.values():
            future.result()  # raises a failed start's error (the others are closed below)
        results = {name: {**server.ready, "blocks": []} for name, server in servers.items()}
        for block in range(rounds):
            for name, server in servers.items():
                results[name]["blocks"].append(median(server.steps(steps)))
            log(f"dpo block {block + 1}: " + ", ".join(f"{n} {r['blocks'][-1]:.3f} s" for n, r in results.items()))
    except BaseException:
        log(f"bench.dpo failed; the step processes' logs are in {scratch}")
        raise
    finally:
        peaks = {name: server.close()["peak_rss_mb"] for name, server in servers.items()}
    shutil.rmtree(scratch, ignore_errors=True)
    for name, result in results.items():
        result["peak_rss_mb"] = peaks[name]
        result["step_s"] = median(result["blocks"])
        result["pairs_per_s"] = result["batch_size"] / 2 / result["step_s"]
        result["tokens_per_s"] = result["batch_size"] * result["seq_len"] / result["step_s"]
    full, lora = results["dpo-full"], results["dpo-lora"]
    ratios = {
        "speed": lora["pairs_per_s"] / full["pairs_per_s"],
        "beyond_model_bytes": lora["beyond_model_bytes"] / full["beyond_model_bytes"],
        "step_peak_bytes": lora["step_peak_bytes"] / full["step_peak_bytes"],
        "peak_rss": lora["peak_rss_mb"] / full["peak_rss_mb"],
    }
    return {"recipe": recipe, "rank": rank, "rounds": rounds, "steps": steps, "results": results, "ratios": ratios}


def table(out: dict) -> str:
    """The markdown table of bench()'s result, and the ratios of the same run."""
    mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
    lines = [
        "| configuration | step time s | pairs/s | tokens/s | trainable parameters | state beyond the model "
        "(optimizer + reference) | compiled step peak (temporaries) | peak RSS | first loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in out["results"].items():
        lines.append(
            f"| {LABELS[name]} | {r['step_s']:.3f} | {r['pairs_per_s']:.2f} | {r['tokens_per_s']:,.0f} "
            f"| {r['trainable']:,} | {mib(r['beyond_model_bytes'])} ({mib(r['optimizer_bytes'])} + "
            f"{mib(r['reference_bytes'])}) | {mib(r['step_peak_bytes'])} ({mib(r['step_temp_bytes'])}) "
            f"| {r['peak_rss_mb']:,.0f} MB | {r['first_loss']:.4f} |"
        )
    ratios = out["ratios"]
    lines += [
        "",
        f"LoRA / full, same run: {ratios['speed']:.2f}× pairs/s; state beyond the model "
        f"{ratios['beyond_model_bytes']:.3f}×; compiled step peak {ratios['step_peak_bytes']:.2f}×; "
        f"peak RSS {ratios['peak_rss']:.2f}×.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", action="append", help="a recipe, then set:/fiddler: edits (bench_llama_57m)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4, help="alternating blocks of steps")
    parser.add_argument("--steps", type=int, default=3, help="steps a block")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    out = bench(
        args.recipe or ["bench_llama_57m"], args.rank, args.rounds, args.steps, log=lambda m: print(m, file=sys.stderr)
    )
    if args.json:
        emit(out)
    else:
        print(table(out))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(*dpo_stepper(json.loads(sys.argv[2]), int(sys.argv[3])))
    else:
        sys.exit(main())
