"""Mixture-of-experts training speed: nnxlm's sorted dispatch against its dense dispatch and
transformers' MixtralForCausalLM, same shapes, same tokens a step.

    python -m bench.moe [--rounds 5] [--block_steps 3] [--no_hf] [--json] [--output PATH]

The model: a Mixtral in miniature (hidden 256, 4 layers, 4 query / 2 key-value heads of 64, 8
experts of hidden 512, top-2 routing, vocabulary 2048, untied), fp32, on 4 rows of 512 tokens.
A training step is forward, backward, gradient clipping and AdamW, with the load-balancing loss:
nnxlm's trainer step (NextToken: 0.01 x the sum over layers of each layer's balance loss) on its
synthetic-token pipeline; transformers' MixtralForCausalLM (attn_implementation="eager") with
output_router_logits and router_aux_loss_coef = 0.01 x layers / k (its loss is k times nnxlm's
per layer and averages the layers), torch.optim.AdamW(fused=True), random tokens.

Three long-lived processes hold their warmed-up models: nnxlm with dispatch="sorted" (the
default: each expert multiplies only its own token-slots, nnxlm.modules.grouped), nnxlm with
dispatch="dense" (every expert on every token, E / k = 4x the expert FLOPs) and transformers. The
parent asks each in turn for a block of --block_steps steps, --rounds times (sorted, dense,
transformers, sorted, ...): a busy moment spoils one block of each, not one process's whole run. A
block's figure is the median of its steps, the table's the median over blocks; tokens/s = 4 x 512
/ that step time; the ratios divide medians from the same run. Every process gets the huge-page
malloc setting that `nnxlm train` gives itself (bench.train.environment).
"""

import argparse
import datetime
import os
import shutil
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit, machine_line, median

SHAPE = dict(
    vocab_size=2048,
    d_model=256,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    num_experts=8,
    num_experts_per_token=2,
    expert_hidden_dim=512,
    seq_len=512,
    batch_size=4,
    rope_theta=1_000_000.0,
    norm_eps=1e-5,
)
RUNNERS = {  # what the table calls each process
    "sorted": "nnxlm, sorted dispatch (grouped matmul)",
    "dense": "nnxlm, dense dispatch (all experts on all tokens)",
    "hf": "transformers MixtralForCausalLM (eager)",
}


def nnxlm_config(dispatch: str, workdir: str):
    """The trainer recipe of SHAPE with MoE dispatch `dispatch`, on synthetic tokens."""
    import fiddle as fdl

    from nnxlm.data import Synthetic
    from nnxlm.recipes import models
    from nnxlm.recipes.experiments import trainer

    s = SHAPE
    model = models.mixtral(
        mlp_dim=s["expert_hidden_dim"],
        vocab_size=s["vocab_size"],
        num_experts=s["num_experts"],
        d_model=s["d_model"],
        num_layers=s["num_layers"],
        num_heads=s["num_heads"],
        num_kv_heads=s["num_kv_heads"],
        head_dim=s["head_dim"],
    )
    model.block.mlp.dispatch = dispatch
    model.scan_layers = False  # as the bench_llama recipes: a Python loop of layers steps faster on CPU
    cfg = trainer(model, name=f"bench_moe_{dispatch}", seq_len=s["seq_len"], batch_size=s["batch_size"])
    cfg.num_steps = 100_000
    cfg.train_data = fdl.Config(Synthetic, vocab_size=s["vocab_size"], num_documents=10_000, split="train")
    cfg.eval_data = None
    cfg.checkpoint_every = 0
    cfg.log_every = 100_000
    cfg.workdir = workdir
    return cfg


def nnxlm_stepper(dispatch: str):
    import fiddle as fdl
    import jax

    workdir = tempfile.mkdtemp(prefix="nnxlm-bench-moe-")
    trainer = fdl.build(nnxlm_config(dispatch, workdir)).setup()

    def step():
        batch = trainer._to_device(next(trainer.train_iterator))
        trainer.state, metrics = trainer._train_step(trainer.state, batch)
        jax.block_until_ready(metrics)

    return step, lambda: shutil.rmtree(workdir, ignore_errors=True)


def optimizer_settings() -> dict:
    """nnxlm's AdamW defaults, which transformers' optimizer is given too."""
    from nnxlm.optim import AdamW

    defaults = AdamW()
    return {name: getattr(defaults, name) for name in ("b1", "b2", "eps", "weight_decay", "clip_norm")}


def hf_stepper():
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from bench.train import hf_training_step

    s = SHAPE
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=s["vocab_size"],
        hidden_size=s["d_model"],
        intermediate_size=s["expert_hidden_dim"],
        num_hidden_layers=s["num_layers"],
        num_attention_heads=s["num_heads"],
        num_key_value_heads=s["num_kv_heads"],
        head_dim=s["head_dim"],
        num_local_experts=s["num_experts"],
        num_experts_per_tok=s["num_experts_per_token"],
        output_router_logits=True,
        router_aux_loss_coef=0.01 * s["num_layers"] / s["num_experts_per_token"],
        rms_norm_eps=s["norm_eps"],
        rope_theta=s["rope_theta"],
        tie_word_embeddings=False,
        max_position_embeddings=max(2048, s["seq_len"]),
        attn_implementation="eager",
    )
    model = MixtralForCausalLM(config).float().train()
    step, _ = hf_training_step(model, list(model.parameters()), {**s, "optimizer": optimizer_settings()})
    return step, lambda: None


def bench(rounds: int, block_steps: int, with_hf: bool, log=print) -> dict:
    """{runner: {"blocks": [median step s of each block], "peak_rss_mb": ...}}, asked in turn."""
    from bench.train import Server

    scratch = tempfile.mkdtemp(prefix="nnxlm-bench-moe-")
    runners = ("sorted", "dense", "hf") if with_hf else ("sorted", "dense")
    servers, results = {}, {runner: {"blocks": []} for runner in runners}
    try:
        for runner in runners:
            servers[runner] = Server([runner], os.path.join(scratch, f"{runner}.log"), module="bench.moe")
            log(f"{runner}: warmed up")
        for block in range(rounds):
            for runner, server in servers.items():
                results[runner]["blocks"].append(median(server.steps(block_steps)))
            log(f"block {block + 1}: " + ", ".join(f"{r} {v['blocks'][-1]:.3f} s/step" for r, v in results.items()))
    except Exception:
        for runner in runners:  # the workers' own words, before their logs are removed
            path = os.path.join(scratch, f"{runner}.log")
            if os.path.exists(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    log(f"{runner} log:\n{f.read()[-3000:]}")
        raise
    finally:
        for runner, server in servers.items():
            if server.process.poll() is None:
                results[runner]["peak_rss_mb"] = server.close()["peak_rss_mb"]
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def section(result: dict) -> str:
    """The markdown section of bench/results.md."""
    s, runs = result["shape"], result["runners"]
    tokens = s["batch_size"] * s["seq_len"]
    step = {runner: median(r["blocks"]) for runner, r in runs.items()}
    rate = {runner: tokens / seconds for runner, seconds in step.items()}

    def ratio(runner, other):
        return f"{rate[runner] / rate[other]:.2f}×" if other in rate else "—"

    lines = [
        f"## Mixture of experts (`python -m bench.moe`, {result['date']})",
        "",
        f"{result['machine']}; whole run {result['wall_s'] / 60:.1f} min.",
        "",
        f"Training a Mixtral in miniature: hidden {s['d_model']}, {s['num_layers']} layers, "
        f"{s['num_heads']} query / {s['num_kv_heads']} key-value heads of {s['head_dim']}, {s['num_experts']} experts "
        f"of hidden {s['expert_hidden_dim']}, top-{s['num_experts_per_token']}, vocabulary {s['vocab_size']:,}, "
        f"fp32, {s['batch_size']} × {s['seq_len']} tokens a step (forward, backward, clipping, AdamW, "
        f"load-balancing loss). Medians over {result['rounds']} blocks of {result['block_steps']} steps, the "
        "processes asked in turn; ratios from the same run.",
        "",
        "| implementation | tokens/s | step s | × nnxlm dense | × transformers | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for runner, r in runs.items():
        rss = f"{r['peak_rss_mb']:,.0f}" if "peak_rss_mb" in r else "—"
        lines.append(
            f"| {RUNNERS[runner]} | {rate[runner]:,.0f} | {step[runner]:.3f} | {ratio(runner, 'dense')} "
            f"| {ratio(runner, 'hf')} | {rss} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # a worker: python -m bench.moe serve sorted|dense|hf
        from bench.train import serve

        runner = argv[1]
        serve(*(hf_stepper() if runner == "hf" else nnxlm_stepper(runner)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="blocks of steps of every process")
    parser.add_argument("--block_steps", type=int, default=3, help="steps a block")
    parser.add_argument("--no_hf", action="store_true", help="nnxlm's two dispatches only")
    parser.add_argument("--json", action="store_true", help="end with the result as one JSON line (python -m bench)")
    parser.add_argument("--output", help="also write the markdown section for bench/results.md here")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    result = {
        "date": f"{datetime.datetime.now():%Y-%m-%d}",
        "machine": machine_line(),
        "shape": SHAPE,
        "rounds": args.rounds,
        "block_steps": args.block_steps,
    }
    result["runners"] = bench(args.rounds, args.block_steps, not args.no_hf, log)
    result["wall_s"] = time.perf_counter() - started
    markdown = section(result)
    print(markdown, flush=True)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(markdown)
    if args.json:
        emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
