"""LoRA fine-tuning speed: nnxlm with LoRA against nnxlm full fine-tuning and against transformers
with peft (PyTorch eager, AdamW), on the same shape, in alternating blocks of steps; transformers'
full fine-tuning runs beside them, so the ratios of both kinds come from the same run.

    python -m bench.lora [--recipe bench_llama_57m] [--rank 16] [--rounds 5] [--no_hf]

Each configuration runs in a long-lived process of its own (bench.train's paired step protocol):
the parent asks each in turn for a block of steps, so all three see the same machine load. The
adapters are rank 16, alpha 32, on every projection (q, k, v, o, gate, up, down) in both
frameworks; the base weights are frozen. Reported: median step time and tokens/s, trainable
parameters, and the bytes of optimizer state each holds after its warm-up steps.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit, median
from bench.train import Server, hf_model, hf_training_step, serve, shape_of

TARGETS_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BLOCK_STEPS = 3


def nnxlm_stepper(recipe: str, rank: int):
    """The trainer's compiled step of `recipe`, with LoRA adapters of `rank` (0: full fine-tuning)."""
    import fiddle as fdl
    import jax

    from nnxlm.recipes import RECIPES, fiddlers

    cfg = RECIPES[recipe]()
    cfg.workdir = tempfile.mkdtemp(prefix="nnxlm-bench-")
    if rank:
        fiddlers.lora(cfg, rank=rank, alpha=2.0 * rank)
    trainer = fdl.build(cfg).setup()

    def step():
        batch = trainer._to_device(next(trainer.train_iterator))
        trainer.state, metrics = trainer._train_step(trainer.state, batch)
        jax.block_until_ready(metrics)

    def info():
        from flax import nnx

        trained = nnx.state(trainer.model, trainer.trainable_filter)
        optimizer = trainer.state["optimizer"]["opt_state"]
        return {
            "trainable": int(sum(x.size for x in jax.tree.leaves(trained))),
            "optimizer_bytes": int(sum(x.nbytes for x in jax.tree.leaves(optimizer))),
        }

    return step, lambda: shutil.rmtree(cfg.workdir, ignore_errors=True), info


def hf_stepper(shape: dict, rank: int):
    """transformers' LlamaForCausalLM of the same shape with peft LoRA adapters of `rank` (0: full
    fine-tuning, no peft), AdamW (fused)."""
    import torch

    model = hf_model(shape)
    if rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS_HF))
    trainable = [p for p in model.parameters() if p.requires_grad]
    step, optimizer = hf_training_step(model, trainable, shape)

    def info():
        states = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        return {
            "trainable": int(sum(p.numel() for p in trainable)),
            "optimizer_bytes": int(sum(t.numel() * t.element_size() for t in states)),
        }

    return step, lambda: None, info


def bench(recipe: str, rank: int, rounds: int, with_hf: bool, log=print) -> dict:
    """{configuration: {"blocks": [median step s of each block], "trainable", "optimizer_bytes",
    "tokens_per_s", ...}} for nnxlm-full, nnxlm-lora and (with_hf) hf-full and hf-peft."""
    shape = shape_of(recipe)
    scratch = tempfile.mkdtemp(prefix="nnxlm-bench-")
    servers = {
        "nnxlm-full": Server(["nnxlm", recipe, "0"], os.path.join(scratch, "full.log"), module="bench.lora"),
        "nnxlm-lora": Server(["nnxlm", recipe, str(rank)], os.path.join(scratch, "lora.log"), module="bench.lora"),
    }
    if with_hf:
        for name, hf_rank in (("hf-full", 0), ("hf-peft", rank)):
            log_path = os.path.join(scratch, f"{name}.log")
            servers[name] = Server(["hf", json.dumps(shape), str(hf_rank)], log_path, module="bench.lora")
    results = {name: {"blocks": [], **{k: server.ready[k] for k in ("trainable", "optimizer_bytes")}}
               for name, server in servers.items()}  # fmt: skip
    try:
        for block in range(rounds):
            for name, server in servers.items():
                results[name]["blocks"].append(median(server.steps(BLOCK_STEPS)))
            log(f"lora block {block + 1}: " + ", ".join(f"{n} {r['blocks'][-1]:.3f} s" for n, r in results.items()))
    finally:
        for name, server in servers.items():
            results[name]["peak_rss_mb"] = server.close()["peak_rss_mb"]
        shutil.rmtree(scratch, ignore_errors=True)
    tokens = shape["batch_size"] * shape["seq_len"]
    for result in results.values():
        result["step_s"] = median(result["blocks"])
        result["tokens_per_s"] = tokens / result["step_s"]
    return {"shape": shape, "rank": rank, "results": results}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="bench_llama_57m")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no_hf", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for python -m bench)")
    args = parser.parse_args(argv)
    out = bench(args.recipe, args.rank, args.rounds, not args.no_hf, log=lambda m: print(m, file=sys.stderr))
    if args.json:
        emit(out)
        return 0
    for name, r in out["results"].items():
        print(
            f"{name:>11}: {r['step_s']:.3f} s/step, {r['tokens_per_s']:,.0f} tokens/s, "
            f"{r['trainable']:,} trainable, optimizer state {r['optimizer_bytes'] / 2**20:.1f} MiB"
        )
    results = out["results"]
    print(
        f"nnxlm LoRA / nnxlm full: {results['nnxlm-lora']['tokens_per_s'] / results['nnxlm-full']['tokens_per_s']:.2f}x"
    )
    if "hf-peft" in results:
        for ours, theirs in (("nnxlm-lora", "hf-peft"), ("nnxlm-full", "hf-full")):
            ratio = results[ours]["tokens_per_s"] / results[theirs]["tokens_per_s"]
            print(f"{ours} / {theirs}: {ratio:.2f}x tokens/s")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        framework, what, rank = sys.argv[2], sys.argv[3], int(sys.argv[4])
        stepper = nnxlm_stepper(what, rank) if framework == "nnxlm" else hf_stepper(json.loads(what), rank)
        serve(*stepper)
    else:
        sys.exit(main())
