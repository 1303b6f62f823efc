"""Serving throughput and latency: nnxlm's OpenAI-compatible server under 1, 4 and 16 concurrent
streaming clients, against transformers' `generate` in a loop on the same weights.

    python -m bench.serve [--recipes bench_llama_20m bench_llama_57m] [--clients 1 4 16]
                          [--requests 64 48] [--max_tokens 64] [--rounds 3 2] [--hf_requests 8] [--no_hf]

For each recipe (random weights, `fdl.build(cfg.model)(rngs=nnx.Rngs(0))`) a server process of its
own builds the model, `Engine(slots=16, max_length=256, steps=8, chunk=64)`, warms it up and serves
`create_app(engine)` under uvicorn on 127.0.0.1; it also writes the same weights as a Hugging Face
directory (nnxlm.convert.to_hf) for the peer. This process is the client side: the same --requests
prompts (32 to 128 random token ids each) go to /v1/completions with `stream=True`, temperature 0,
max_tokens new tokens and `stream_options.include_usage`, through the `openai` client (asyncio). With
C clients, each sends its share of the requests back to back: C = 1 is the same requests one at a
time. The tokenizer has no end token, so every request generates max_tokens. --requests and
--rounds take one value per recipe, the last one repeating (64 requests and 3 rounds for
bench_llama_20m, 48 and 2 for bench_llama_57m, so that 16 clients send several requests each and
the slots stay full: the whole run takes about 6 minutes on 2 cores).

Figures for each C, per round: tokens/s = completion tokens (from the usage chunks) / wall time from
the first request sent to the last stream closed. Per request: time to first token (sent to the
first chunk with text); per token, the inter-token latency (the gap between two chunks with text
divided by the tokens the later one carries: the engine hands out up to `steps` tokens a turn, so
a stream's chunks carry several; the gaps between chunks are reported as well). The tokenizer
writes one character per token (token i is U+4E00 + i), so a chunk's tokens are its characters.

The peer, in this process between the rounds (the server idle): transformers' LlamaForCausalLM with
the same weights (SDPA attention, fp32, torch on every core) runs `generate` greedy, one request at
a time, on the first --hf_requests prompts, with a streamer timing each new token; how many of its
greedy tokens agree with the server's is reported too (ties may split the fp32 paths late).
tokens/s are medians over rounds; latency percentiles pool every round's samples.
"""

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import Worker, emit, median

RECIPES = ("bench_llama_20m", "bench_llama_57m")
MODEL_NAME = "bench"
OFFSET = 0x4E00  # token i is the character U+4E00 + i (below the surrogates for vocabularies up to 39,936)


class CharTokenizer:
    """One character per token and no special tokens: text and token counts match one to one, and
    with no end token every request runs to max_tokens."""

    bos_id = eos_id = None
    pad_id = 0

    def __init__(self, vocab_size: int):
        if OFFSET + vocab_size > 0xD800:
            raise ValueError(f"a vocabulary of {vocab_size} runs into the surrogates")
        self.vocab_size = vocab_size

    def decode(self, ids) -> str:
        return "".join(chr(OFFSET + int(i)) for i in ids)

    def encode(self, text: str) -> list[int]:
        return [ord(c) - OFFSET for c in text]

    def encode_with_offsets(self, text: str):
        return self.encode(text), [(i, i + 1) for i in range(len(text))]


def percentiles(values, qs=(50, 99)) -> dict:
    import numpy as np

    values = [v for v in values if v is not None]
    return {f"p{q}": float(np.percentile(values, q)) if values else float("nan") for q in qs}


# --------------------------------------------------------------------------------------------------
# The server process: python -m bench.serve server --recipe NAME [--hf_dir DIR]


def server_worker(recipe: str, hf_dir: str | None, slots: int, max_length: int, steps: int, chunk: int) -> None:
    """Builds the recipe's model with random weights, warms an Engine up and serves it; prints
    {"url", ...} when ready and stops at "quit" (or the end of stdin), printing its peak RSS."""
    import fiddle as fdl
    from flax import nnx

    import nnxlm
    from nnxlm.metrics import parameter_count
    from nnxlm.serving import Engine
    from nnxlm.serving.api import create_app, serve_in_thread

    start = time.perf_counter()
    model = fdl.build(nnxlm.recipes.RECIPES[recipe]().model)(rngs=nnx.Rngs(0))
    if hf_dir:
        from nnxlm.convert import to_hf

        to_hf(model, hf_dir)
    engine = Engine(
        model, CharTokenizer(model.vocab_size), slots=slots, max_length=max_length, steps=steps, chunk=chunk
    )
    built = time.perf_counter()
    engine.warm_up()
    warm = time.perf_counter()
    with engine, serve_in_thread(create_app(engine, MODEL_NAME)) as url:
        ready = {"url": url, "parameters": parameter_count(model), "vocab_size": model.vocab_size}
        print(json.dumps({**ready, "build_s": built - start, "warm_up_s": warm - built}), flush=True)
        for line in sys.stdin:
            if line.strip() == "quit":
                break
    emit({})


# --------------------------------------------------------------------------------------------------
# The clients.


async def _stream(client, prompt: list[int], max_tokens: int) -> dict:
    """One streamed completion: when each chunk with text arrived, its text, the usage."""
    sent = time.perf_counter()
    stream = await client.completions.create(
        model=MODEL_NAME,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    arrivals, pieces, usage = [], [], None
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        text = "".join(choice.text for choice in chunk.choices)
        if text:
            arrivals.append(now)
            pieces.append(text)
    return {"sent": sent, "arrivals": arrivals, "pieces": pieces, "usage": usage, "done": time.perf_counter()}


async def _clients(url: str, prompts: list[list[int]], clients: int, max_tokens: int) -> tuple[list[dict], float]:
    """`clients` concurrent clients, client c sending prompts c, c + clients, ... back to back:
    (the streams in prompt order, wall seconds)."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600) as client:
        out: list[dict | None] = [None] * len(prompts)

        async def one_client(c: int) -> None:
            for i in range(c, len(prompts), clients):
                out[i] = await _stream(client, prompts[i], max_tokens)

        start = time.perf_counter()
        await asyncio.gather(*(one_client(c) for c in range(clients)))
        wall = time.perf_counter() - start
    return out, wall


def run_clients(url: str, prompts: list[list[int]], clients: int, max_tokens: int) -> dict:
    """One round of `clients` concurrent streaming clients over all prompts."""
    streams, wall = asyncio.run(_clients(url, prompts, clients, max_tokens))
    ttft, itl, gaps = [], [], []
    for s in streams:
        if s["usage"] != max_tokens or sum(len(p) for p in s["pieces"]) != max_tokens:
            raise RuntimeError(f"a stream gave {s['usage']} tokens ({''.join(s['pieces'])!r}), not {max_tokens}")
        ttft.append(s["arrivals"][0] - s["sent"])
        for before, after, piece in zip(s["arrivals"], s["arrivals"][1:], s["pieces"][1:], strict=False):
            gaps.append(after - before)
            itl += [(after - before) / len(piece)] * len(piece)
    tokens = sum(s["usage"] for s in streams)
    return {
        "tokens_per_s": tokens / wall,
        "wall_s": wall,
        "ttft": ttft,
        "itl": itl,
        "gaps": gaps,
        "latency": [s["done"] - s["sent"] for s in streams],
        "tokens": [[ord(c) - OFFSET for c in "".join(s["pieces"])] for s in streams],
    }


# --------------------------------------------------------------------------------------------------
# The peer: transformers' generate, one request at a time.


def hf_model(hf_dir: str):
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(os.cpu_count())
    hf = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32, attn_implementation="sdpa").eval()
    hf.generation_config.eos_token_id = None  # like the server's tokenizer: no end token
    hf.generation_config.pad_token_id = 0
    return hf


def run_hf(hf, prompts: list[list[int]], max_tokens: int) -> dict:
    """generate() greedy on each prompt in turn, a streamer timing every new token."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):  # the prompt first, then each new token
            self.times.append(time.perf_counter())

        def end(self):
            pass

    ttft, itl, latency, tokens = [], [], [], []
    start = time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt], dtype=torch.long)
            clock = Clock()
            sent = time.perf_counter()
            out = hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False, streamer=clock
            )
            new = out[0, ids.shape[1] :].tolist()
            if len(new) != max_tokens:
                raise RuntimeError(f"transformers generated {len(new)} tokens, not {max_tokens}")
            stamps = clock.times[1:]
            ttft.append(stamps[0] - sent)
            itl += [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
            latency.append(time.perf_counter() - sent)
            tokens.append(new)
    wall = time.perf_counter() - start
    return {
        "tokens_per_s": len(prompts) * max_tokens / wall,
        "ttft": ttft,
        "itl": itl,
        "latency": latency,
        "tokens": tokens,
    }


def _agreement(ours: list[list[int]], theirs: list[list[int]]) -> tuple[int, int]:
    """Leading greedy tokens that agree, summed over requests, and the tokens compared."""
    same = 0
    for a, b in zip(ours, theirs, strict=True):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        same += n
    return same, sum(len(b) for b in theirs)


# --------------------------------------------------------------------------------------------------


def prompts_for(vocab_size: int, count: int, low: int = 32, high: int = 128, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, int(n)).tolist() for n in rng.integers(low, high + 1, count)]


def bench_recipe(
    recipe: str,
    clients: list[int],
    requests: int,
    max_tokens: int,
    rounds: int,
    hf_requests: int,
    with_hf: bool,
    engine_args: dict,
    scratch: str,
    log=print,
) -> dict:
    hf_dir = os.path.join(scratch, f"{recipe}-hf") if with_hf else None
    args = ["--recipe", recipe] + (["--hf_dir", hf_dir] if hf_dir else [])
    args += [f"--{name}={value}" for name, value in engine_args.items()]
    started = time.perf_counter()
    server = Worker("bench.serve", ["server", *args], os.path.join(scratch, f"{recipe}-server.log"))
    ready = server.ready
    log(f"{recipe}: server ready in {time.perf_counter() - started:.1f} s (warm-up {ready['warm_up_s']:.1f} s)")
    url, vocab = ready["url"], ready["vocab_size"]
    prompts = prompts_for(vocab, requests, high=min(128, engine_args["max_length"] - max_tokens))
    per_clients = {c: [] for c in clients}
    peer = []
    try:
        hf = hf_model(hf_dir) if with_hf else None
        run_clients(url, prompts_for(vocab, 4, seed=1), 4, min(8, max_tokens))  # the HTTP path, warm
        if hf is not None:
            run_hf(hf, prompts_for(vocab, 1, seed=1), min(8, max_tokens))
        for r in range(rounds):
            for c in clients:
                per_clients[c].append(run_clients(url, prompts, c, max_tokens))
            line = ", ".join(f"{c} clients {per_clients[c][-1]['tokens_per_s']:,.0f}" for c in clients)
            if hf is not None:
                peer.append(run_hf(hf, prompts[:hf_requests], max_tokens))
                line += f", transformers loop {peer[-1]['tokens_per_s']:,.0f}"
            log(f"{recipe} round {r + 1}: tokens/s {line}")
    finally:
        closed = server.close()
    out = {
        "parameters": ready["parameters"],
        "server_peak_rss_mb": closed["peak_rss_mb"],
        "warm_up_s": ready["warm_up_s"],
        "clients": {c: _summary(runs) for c, runs in per_clients.items()},
    }
    if 1 in per_clients:
        for c in clients:
            out["clients"][c]["speedup"] = out["clients"][c]["tokens_per_s"] / out["clients"][1]["tokens_per_s"]
    if peer:
        out["hf"] = _summary(peer)
        if 1 in per_clients:
            same, compared = _agreement(per_clients[1][0]["tokens"][:hf_requests], peer[0]["tokens"])
            out["hf"]["same_tokens"] = f"{same}/{compared}"
    return out


def _summary(runs: list[dict]) -> dict:
    pooled = {key: [v for run in runs for v in run.get(key, [])] for key in ("ttft", "itl", "gaps", "latency")}
    out = {
        "tokens_per_s": median(run["tokens_per_s"] for run in runs),
        "rounds_tokens_per_s": [run["tokens_per_s"] for run in runs],
        "ttft_ms": {k: v * 1e3 for k, v in percentiles(pooled["ttft"]).items()},
        "itl_ms": {k: v * 1e3 for k, v in percentiles(pooled["itl"]).items()},
        "latency_s": percentiles(pooled["latency"]),
    }
    if pooled["gaps"]:
        out["chunk_gap_ms"] = {k: v * 1e3 for k, v in percentiles(pooled["gaps"]).items()}
        out["tokens_per_chunk"] = len(pooled["itl"]) / len(pooled["gaps"])
    return out


def bench(
    recipes=RECIPES,
    clients=(1, 4, 16),
    requests=(64, 48),
    max_tokens: int = 64,
    rounds=(3, 2),
    hf_requests: int = 8,
    with_hf: bool = True,
    slots: int = 16,
    max_length: int = 256,
    steps: int = 8,
    chunk: int = 64,
    log=print,
) -> dict:
    def of(values, i: int) -> int:  # the recipe's value of a per-recipe list (the last repeats)
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        return values[min(i, len(values) - 1)]

    engine_args = dict(slots=slots, max_length=max_length, steps=steps, chunk=chunk)
    scratch = tempfile.mkdtemp(prefix="nnxlm-bench-serve-")
    results = {}
    try:
        for i, recipe in enumerate(recipes):
            n, count = of(rounds, i), of(requests, i)
            results[recipe] = bench_recipe(
                recipe, list(clients), count, max_tokens, n, hf_requests, with_hf, engine_args, scratch, log
            )
            results[recipe].update(rounds=n, requests=count)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "recipes": results,
        "max_tokens": max_tokens,
        "hf_requests": hf_requests if with_hf else 0,
        "engine": engine_args,
    }


def table(result: dict) -> str:
    """The markdown of results.md's section."""
    engine = result["engine"]
    lines = [
        f"Streamed /v1/completions requests (prompts of 32-128 random ids) of {result['max_tokens']} greedy "
        "tokens each, the same requests at every number of clients; "
        f"Engine(slots={engine['slots']}, max_length={engine['max_length']}, steps={engine['steps']}, "
        f"chunk={engine['chunk']}) under uvicorn, the clients in another process on the same machine",
        "",
        "| model | clients | requests | tokens/s | × one client | TTFT p50 / p99 ms | ITL p50 / p99 ms "
        "| chunk gap p50 / p99 ms | rounds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def pair(figures: dict | None) -> str:
        return "—" if not figures else f"{figures['p50']:,.1f} / {figures['p99']:,.1f}"

    for r in result["recipes"].values():
        size = f"{r['parameters'] / 1e6:.1f} M"
        for c, f in r["clients"].items():
            who = f"{c} (one at a time)" if int(c) == 1 else str(c)
            speedup = f"{f['speedup']:.2f}×" if "speedup" in f else "—"
            lines.append(
                f"| {size} | {who} | {r['requests']} | {f['tokens_per_s']:,.0f} | {speedup} | {pair(f['ttft_ms'])} | "
                f"{pair(f['itl_ms'])} | {pair(f.get('chunk_gap_ms'))} | {r['rounds']} |"
            )
        if "hf" in r:
            f = r["hf"]
            one = r["clients"].get(1) or r["clients"].get("1")
            ratio = f" (nnxlm 1 client: {one['tokens_per_s'] / f['tokens_per_s']:.2f}×)" if one else ""
            same = f.get("same_tokens", "—")
            lines.append(
                f"| {size} | transformers `generate`, one at a time (same greedy tokens {same}){ratio} "
                f"| {result['hf_requests']} | {f['tokens_per_s']:,.0f} | — | {pair(f['ttft_ms'])} | "
                f"{pair(f['itl_ms'])} | — | {r['rounds']} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["server"]:
        parser = argparse.ArgumentParser()
        parser.add_argument("--recipe", required=True)
        parser.add_argument("--hf_dir")
        for name, default in (("slots", 16), ("max_length", 256), ("steps", 8), ("chunk", 64)):
            parser.add_argument(f"--{name}", type=int, default=default)
        a = parser.parse_args(argv[1:])
        server_worker(a.recipe, a.hf_dir, a.slots, a.max_length, a.steps, a.chunk)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, nargs="+", default=[64, 48], help="requests of a round, per recipe")
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument(
        "--rounds", type=int, nargs="+", default=[3, 2], help="rounds of each recipe (the last repeats)"
    )
    parser.add_argument("--hf_requests", type=int, default=8, help="requests of transformers' loop each round")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--no_hf", action="store_true", help="skip transformers even when installed")
    parser.add_argument("--json", action="store_true", help="end with the result as one JSON line (python -m bench)")
    args = parser.parse_args(argv)
    with_hf = not args.no_hf
    if with_hf:
        import importlib.util

        if not all(importlib.util.find_spec(m) for m in ("torch", "transformers")):
            print("torch/transformers not installed (pip install -e '.[bench]'): nnxlm only", file=sys.stderr)
            with_hf = False
    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    result = bench(
        args.recipes,
        args.clients,
        args.requests,
        args.max_tokens,
        args.rounds,
        args.hf_requests,
        with_hf,
        args.slots,
        args.max_length,
        args.steps,
        args.chunk,
        log=log,
    )
    result["wall_s"] = time.perf_counter() - started
    print(table(result), flush=True)
    if args.json:
        emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
