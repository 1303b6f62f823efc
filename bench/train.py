"""Training speed: nnxlm against Hugging Face transformers on PyTorch eager, same shapes.

    python -m bench.train [--recipes bench_llama_20m bench_llama_57m] [--rounds 5] [--no_hf]

Two kinds of runs, both in fresh processes:

- Launches, as a user runs it: `python -m nnxlm train --recipe NAME` for a few steps. The moment the
  first record of its metrics.jsonl appears is its first finished step, timed from the start of the
  process (imports, model init, compilation, the step); its peak RSS comes from wait4. The peer's
  launch is the same: a fresh process that imports transformers, builds the model and optimizer
  and finishes one step. Launches alternate nnxlm, peer, nnxlm, ...
- Step time, paired: one long-lived process per framework holds the warmed-up model; the parent
  asks each in turn for a block of steps (nnxlm, peer, nnxlm, peer, ...), so both see the same
  machine load at nearly the same time, and a busy moment on the shared machine spoils one block
  of each instead of a whole run. A block's figure is the median of its steps; the table's, the
  median over blocks. nnxlm's steps are the trainer's compiled step on batches from its data
  pipeline (next batch, step, wait for the metrics).

The peer is transformers' LlamaForCausalLM of the same shape (SDPA attention, fp32) with
torch.optim.AdamW (the same hyperparameters, fused, as transformers' Trainer uses it) and gradient
clipping, on random tokens. Both frameworks get the huge-page malloc setting that `nnxlm train`
gives itself (nnxlm.launch), so the ratio compares frameworks, not allocators.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import REPO, emit, median, run_worker, wait_with_usage

WARMUP_STEPS = 2  # the first step compiles (nnxlm) or allocates (torch); the second settles
BLOCK_STEPS = {"bench_llama_20m": 5, "bench_llama_57m": 3}


def shape_of(recipe_name: str) -> dict:
    """The recipe's model and batch shape as plain numbers, and its training FLOPs per token (from
    nnxlm.metrics: the count the trainer logs its MFU with)."""
    import fiddle as fdl
    from flax import nnx

    from nnxlm import metrics
    from nnxlm.recipes import RECIPES

    cfg = RECIPES[recipe_name]()
    model, attention = cfg.model, cfg.model.block.attention
    abstract = nnx.eval_shape(lambda: fdl.build(cfg.model)(rngs=nnx.Rngs(0)))
    return dict(
        recipe=recipe_name,
        vocab_size=model.vocab_size,
        d_model=model.d_model,
        num_layers=model.num_layers,
        num_heads=attention.num_heads,
        num_kv_heads=attention.num_kv_heads,
        head_dim=attention.head_dim,
        mlp_dim=model.block.mlp.hidden_dim,
        rope_theta=attention.rope_theta,
        norm_eps=model.norm.eps,
        tie_embeddings=model.tie_embeddings,
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        parameters=metrics.parameter_count(abstract),
        flops_per_token=metrics.training_flops_per_token(abstract, cfg.seq_len),
        optimizer={k: getattr(cfg.optimizer, k) for k in ("b1", "b2", "eps", "weight_decay", "clip_norm")},
    )


def environment() -> dict[str, str]:
    """The environment of every benchmark process: with the malloc setting `nnxlm train` gives
    itself (it made transformers' step ~12 % faster too)."""
    from nnxlm.launch import huge_pages_apply, with_huge_pages

    return with_huge_pages(os.environ) if huge_pages_apply() else dict(os.environ)


# --------------------------------------------------------------------------------------------------
# Launches.


def launch_nnxlm(recipe: str, peak_flops: float, workdir: str, steps: int = 3, timeout: float = 600) -> dict:
    """`nnxlm train` in a fresh process: launch-to-first-step seconds, peak RSS (with the save at the
    end) and the FLOPs per token it logged its MFU with."""
    metrics_file = os.path.join(workdir, "metrics.jsonl")
    command = [sys.executable, "-m", "nnxlm", "train", "--recipe", recipe, "--workdir", workdir]
    command += ["--recipe", f"set:num_steps={steps}", "--recipe", f"set:peak_flops_per_device={peak_flops:.6g}"]
    launch_s = None

    def first_record():  # the trainer writes step 1's record once step 1 has finished
        nonlocal launch_s
        if launch_s is None and os.path.exists(metrics_file) and os.path.getsize(metrics_file):
            launch_s = time.perf_counter() - start

    with open(workdir + ".log", "w") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=environment())
        usage = wait_with_usage(process, timeout, tick=first_record)
    if process.returncode != 0:
        with open(workdir + ".log") as f:
            raise RuntimeError(f"nnxlm train --recipe {recipe} failed:\n{f.read()[-3000:]}")
    with open(metrics_file) as f:
        records = [json.loads(line) for line in f]
    last = records[-1]  # the FLOPs per token behind the MFU the trainer logged
    logged_flops = last["tflops_per_s"] * 1e12 / last["tokens_per_s"]
    return dict(launch_s=launch_s, peak_rss_mb=usage.ru_maxrss / 1024, logged_flops_per_token=logged_flops)


def launch_hf(shape: dict) -> dict:
    """The peer in a fresh process, for one step: launch-to-first-step seconds."""
    launched = time.time()
    result = run_worker(["bench.train", "hf-launch", json.dumps(shape)], env=environment())
    return dict(launch_s=result["first_step_epoch"] - launched)


# --------------------------------------------------------------------------------------------------
# Paired step times: `python -m bench.train serve nnxlm RECIPE` or `serve hf SHAPE_JSON` reads
# "steps N" lines and answers each with a JSON line of N step times; "quit" ends it.


def nnxlm_stepper(recipe: str):
    import fiddle as fdl
    import jax

    from nnxlm.recipes import RECIPES

    cfg = RECIPES[recipe]()
    cfg.workdir = tempfile.mkdtemp(prefix="nnxlm-bench-")
    trainer = fdl.build(cfg).setup()

    def step():
        batch = trainer._to_device(next(trainer.train_iterator))
        trainer.state, metrics = trainer._train_step(trainer.state, batch)
        jax.block_until_ready(metrics)

    return step, lambda: shutil.rmtree(cfg.workdir, ignore_errors=True)


def hf_model(shape: dict):
    """transformers' LlamaForCausalLM of the shape (SDPA attention, fp32), in training mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["d_model"],
        intermediate_size=shape["mlp_dim"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        head_dim=shape["head_dim"],
        rms_norm_eps=shape["norm_eps"],
        rope_theta=shape["rope_theta"],
        tie_word_embeddings=shape["tie_embeddings"],
        max_position_embeddings=max(2048, shape["seq_len"]),
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).float().train()


def hf_training_step(model, parameters: list, shape: dict):
    """(step, optimizer): one forward with labels, backward, clipping and AdamW (fused, as
    transformers' Trainer uses it) of `parameters`, on random tokens."""
    import torch

    opt = shape["optimizer"]
    betas, eps, decay = (opt["b1"], opt["b2"]), opt["eps"], opt["weight_decay"]
    optimizer = torch.optim.AdamW(parameters, lr=3e-4, betas=betas, eps=eps, weight_decay=decay, fused=True)
    generator = torch.Generator().manual_seed(0)

    def step():
        ids = torch.randint(3, shape["vocab_size"], (shape["batch_size"], shape["seq_len"]), generator=generator)
        loss = model(input_ids=ids, labels=ids).loss  # transformers shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, opt["clip_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    return step, optimizer


def hf_stepper(shape: dict):
    model = hf_model(shape)
    step, _ = hf_training_step(model, list(model.parameters()), shape)
    return step, lambda: None


def serve(step, close, info=None) -> None:
    """Warms up, then times blocks of steps on request (see above). info(), if given, is a dict
    added to the ready message after the warm-up (e.g. sizes of the state the steps made)."""
    for i in range(WARMUP_STEPS):
        step()
        if i == 0:
            first_step_epoch = time.time()
    ready = {"ready": True, "first_step_epoch": first_step_epoch, **(info() if info else {})}
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        if not line.startswith("steps"):
            break
        times = []
        for _ in range(int(line.split()[1])):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        print(json.dumps({"times": times}), flush=True)
    close()
    emit({})


class Server:
    """A serve() process: started, asked for blocks of steps, closed (giving its peak RSS)."""

    def __init__(self, args: list[str], log_path: str, module: str = "bench.train"):
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, "serve", *args],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=environment(),
        )
        self.ready = self._answer()

    def _answer(self) -> dict:
        for line in self.process.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"bench.train serve {self.process.args[4:]} ended; see {self.log.name}")

    def steps(self, n: int) -> list[float]:
        self.process.stdin.write(f"steps {n}\n")
        self.process.stdin.flush()
        return self._answer()["times"]

    def close(self) -> dict:
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        result = self._answer()
        self.process.wait()
        self.log.close()
        return result


def paired_steps(recipe: str, shape: dict, rounds: int, with_hf: bool, scratch: str, log=print) -> dict:
    """{"nnxlm": {"blocks": [median step s of each block], "peak_rss_mb": ...}, "hf": {...}}."""
    servers = {"nnxlm": Server(["nnxlm", recipe], os.path.join(scratch, f"{recipe}-serve-nnxlm.log"))}
    if with_hf:
        servers["hf"] = Server(["hf", json.dumps(shape)], os.path.join(scratch, f"{recipe}-serve-hf.log"))
    results = {name: {"blocks": []} for name in servers}
    try:
        for block in range(rounds):
            for name, server in servers.items():
                results[name]["blocks"].append(median(server.steps(BLOCK_STEPS.get(recipe, 3))))
            times = ", ".join(f"{name} {r['blocks'][-1]:.3f} s/step" for name, r in results.items())
            log(f"{recipe} block {block + 1}: {times}")
    finally:
        for name, server in servers.items():
            results[name]["peak_rss_mb"] = server.close()["peak_rss_mb"]
    return results


# --------------------------------------------------------------------------------------------------
# Where the launch time goes (python -m bench.train breakdown RECIPE), in a fresh process.


def breakdown_worker(recipe: str) -> dict:
    """Seconds spent in each phase before the first finished step, in the order `nnxlm train` goes
    through them (with a cold compilation cache)."""
    start = time.perf_counter()
    phases, last = {}, start

    def mark(name):
        nonlocal last
        now = time.perf_counter()
        phases[name] = now - last
        last = now

    import fiddle as fdl
    import jax

    import nnxlm.cli  # noqa: F401  (what `nnxlm train` imports)
    from nnxlm import metrics
    from nnxlm.recipes.directives import resolve

    mark("imports")
    workdir = tempfile.mkdtemp(prefix="nnxlm-bench-")
    try:
        cfg = resolve([recipe])
        cfg.workdir = workdir
        trainer = fdl.build(cfg)
        jax.devices()
        mark("recipe, devices")
        trainer.setup()
        mark("setup (model + AdamW init: compile, run; data; checkpointer)")
        metrics.device_peak_flops()
        mark("matmul peak for MFU")
        metrics.MetricsWriter(workdir).close()
        mark("metrics writer (TensorBoard)")
        batch = trainer._to_device(next(trainer.train_iterator))
        mark("first batch")
        lowered = trainer._train_step.lower(trainer.state, batch)
        mark("trace train step")
        compiled = lowered.compile()
        mark("compile train step")
        _, step_metrics = compiled(trainer.state, batch)
        jax.block_until_ready(step_metrics)
        mark("run step 1")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return dict(phases=phases, total_s=time.perf_counter() - start)


def run_breakdown(recipe: str) -> dict:
    return run_worker(["bench.train", "breakdown", recipe], env=environment())


# --------------------------------------------------------------------------------------------------


def bench(recipes, launches: int, rounds: int, peak_flops: float, with_hf: bool, log=print) -> dict:
    """Per recipe: its shape, nnxlm's and the peer's launches and paired step blocks."""
    results = {}
    scratch = tempfile.mkdtemp(prefix="nnxlm-bench-")
    try:
        for recipe in recipes:
            shape = shape_of(recipe)
            result = results[recipe] = {"shape": shape, "launch": {"nnxlm": [], "hf": []}}
            for i in range(launches):
                workdir = os.path.join(scratch, f"{recipe}-{i}")
                result["launch"]["nnxlm"].append(launch_nnxlm(recipe, peak_flops, workdir))
                if with_hf:
                    result["launch"]["hf"].append(launch_hf(shape))
                launched = ", ".join(f"{n} {r[-1]['launch_s']:.1f} s" for n, r in result["launch"].items() if r)
                log(f"{recipe} launch {i + 1}: {launched}")
            # the same command once more in the last run directory: its compilation cache is warm
            shutil.rmtree(os.path.join(workdir, "checkpoints"))
            os.remove(os.path.join(workdir, "metrics.jsonl"))
            result["relaunch_s"] = launch_nnxlm(recipe, peak_flops, workdir)["launch_s"]
            result["steps"] = paired_steps(recipe, shape, rounds, with_hf, scratch, log)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=list(BLOCK_STEPS))
    parser.add_argument("--launches", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no_hf", action="store_true")
    args = parser.parse_args(argv)
    from nnxlm.metrics import measure_matmul_peak

    results = bench(args.recipes, args.launches, args.rounds, measure_matmul_peak(), not args.no_hf)
    print(json.dumps(results, indent=1))
    return 0


def hf_launch_worker(shape: dict) -> dict:
    step, _ = hf_stepper(shape)
    step()
    return {"first_step_epoch": time.time()}


if __name__ == "__main__":
    command = sys.argv[1:2]
    if command == ["serve"]:
        framework, what = sys.argv[2], sys.argv[3]
        serve(*(nnxlm_stepper(what) if framework == "nnxlm" else hf_stepper(json.loads(what))))
    elif command == ["hf-launch"]:
        emit(hf_launch_worker(json.loads(sys.argv[2])))
    elif command == ["breakdown"]:
        emit(breakdown_worker(sys.argv[2]))
    else:
        sys.exit(main())
