"""Decode speed: new tokens/s and time to first token of nnxlm.generate, against HF transformers.

    .venv/bin/python -m bench.decode            # or: python bench/decode.py [--runs 7] [--batch 1 8]

A 20.6 M-parameter Llama (hidden 256, 4 layers, 4 heads, MLP 1024, vocab 32000, fp32) with random
weights continues a 64-token prompt by 128 greedy tokens. Every figure is the median of --runs
timed runs after a warm-up (compilation is not timed). When torch and transformers import (the
`bench` extra), transformers' LlamaForCausalLM gets the same weights and runs `generate` with a KV
cache on as many threads as there are cores, interleaved with nnxlm's runs on the same machine at
the same time, and the ratio of the two is printed; so are how many of the greedy tokens agree.
"""

import argparse
import json
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fiddle as fdl
import jax
import numpy as np
from flax import nnx

from nnxlm.generation import stream
from nnxlm.recipes import models

SHAPE = dict(vocab_size=32_000, d_model=256, num_layers=4, num_heads=4, num_kv_heads=4, mlp_dim=1024)


def build_model(scan_layers: bool = True):
    cfg = models.llama(**SHAPE)
    cfg.scan_layers = scan_layers
    return fdl.build(cfg)(rngs=nnx.Rngs(0))


def time_nnxlm(model, prompts, new_tokens):
    """(seconds to the first new token, seconds for all, the new ids) of one generate call."""
    start = time.perf_counter()
    parts = stream(model, prompts, new_tokens)
    next(parts)  # the prefill's token, fetched to the host
    first = time.perf_counter() - start
    *_, out = parts
    return first, time.perf_counter() - start, out


def hf_model(model):
    """transformers' LlamaForCausalLM holding the weights of an nnxlm Llama (same rotary layout)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d, n, heads = SHAPE["d_model"], SHAPE["num_layers"], SHAPE["num_heads"]
    config = LlamaConfig(
        vocab_size=SHAPE["vocab_size"],
        hidden_size=d,
        intermediate_size=SHAPE["mlp_dim"],
        num_hidden_layers=n,
        num_attention_heads=heads,
        num_key_value_heads=SHAPE["num_kv_heads"],
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10_000.0,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    hf = LlamaForCausalLM(config).eval().float()
    params = nnx.to_pure_dict(nnx.state(model))

    def layer(i):
        return jax.tree.map(lambda x: np.asarray(x[i]), params["layers"]) if model.scan_layers else params["layers"][i]

    def tensor(x):
        return torch.from_numpy(np.array(x))  # a writable copy

    def t(x):  # nnxlm kernels are [in..., out...]; torch Linear weights are [out, in]
        return tensor(np.asarray(x).reshape(x.shape[0], -1).T)

    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(tensor(params["embedder"]["embedding"]))
        hf.lm_head.weight.copy_(t(params["head"]))
        hf.model.norm.weight.copy_(tensor(params["final_norm"]["scale"]))
        for i, block in enumerate(hf.model.layers):
            p = layer(i)
            attention = p["attention"]
            block.self_attn.q_proj.weight.copy_(t(attention["q_proj"]))
            block.self_attn.k_proj.weight.copy_(t(attention["k_proj"]))
            block.self_attn.v_proj.weight.copy_(t(attention["v_proj"]))
            o = np.asarray(attention["o_proj"])
            block.self_attn.o_proj.weight.copy_(t(o.reshape(-1, o.shape[-1])))
            block.mlp.gate_proj.weight.copy_(t(p["mlp"]["gate"]))
            block.mlp.up_proj.weight.copy_(t(p["mlp"]["up"]))
            block.mlp.down_proj.weight.copy_(t(p["mlp"]["down"]))
            block.input_layernorm.weight.copy_(tensor(p["attention_norm"]["scale"]))
            block.post_attention_layernorm.weight.copy_(tensor(p["mlp_norm"]["scale"]))
    return hf


def time_hf(hf, prompts, new_tokens):
    import torch

    ids = torch.from_numpy(np.asarray(prompts, np.int64))
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        start = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        first = time.perf_counter() - start
        start = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        total = time.perf_counter() - start
    return first, total, out[:, ids.shape[1] :].numpy()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--loop", action="store_true", help="unscanned layers (a Python loop) instead of nnx.scan")
    parser.add_argument("--no_hf", action="store_true", help="skip transformers even when installed")
    parser.add_argument("--json", action="store_true", help="end with the figures as one JSON line (python -m bench)")
    args = parser.parse_args(argv)

    model = build_model(scan_layers=not args.loop)
    hf = None
    if not args.no_hf:
        try:
            import torch

            torch.set_num_threads(os.cpu_count())
            hf = hf_model(model)
        except ImportError:
            print("torch/transformers not installed (pip install -e '.[bench]'): nnxlm only", file=sys.stderr)
    print(f"{jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} cores; jax {jax.__version__}")
    print(f"Llama 20.6 M, fp32, {args.prompt_len}-token prompt, {args.new_tokens} new tokens, median of {args.runs}")
    header = f"{'batch':>5} {'nnxlm tok/s':>12} {'TTFT ms':>8}"
    if hf is not None:
        header += f" {'HF tok/s':>9} {'TTFT ms':>8} {'ratio':>6} {'same tokens':>12}"
    print(header)
    figures = {}
    for batch in args.batch:
        rng = np.random.default_rng(batch)
        prompts = rng.integers(4, SHAPE["vocab_size"], (batch, args.prompt_len)).astype(np.int32)
        time_nnxlm(model, prompts, args.new_tokens)  # compiles
        if hf is not None:
            time_hf(hf, prompts, args.new_tokens)
        ours, theirs = [], []
        for _ in range(args.runs):
            ours.append(time_nnxlm(model, prompts, args.new_tokens))
            if hf is not None:
                theirs.append(time_hf(hf, prompts, args.new_tokens))
        rate = statistics.median(batch * args.new_tokens / total for _, total, _ in ours)
        ttft = statistics.median(first for first, _, _ in ours)
        line = f"{batch:>5} {rate:>12.0f} {ttft * 1e3:>8.1f}"
        figures[batch] = {"tokens_per_s": rate, "ttft_s": ttft}
        if hf is not None:
            hf_rate = statistics.median(batch * args.new_tokens / total for _, total, _ in theirs)
            hf_ttft = statistics.median(first for first, _, _ in theirs)
            agree = _agreement(ours[-1][2], theirs[-1][2])
            line += f" {hf_rate:>9.0f} {hf_ttft * 1e3:>8.1f} {rate / hf_rate:>5.2f}x {agree:>12}"
            figures[batch].update(hf_tokens_per_s=hf_rate, hf_ttft_s=hf_ttft, same_tokens=agree)
        print(line, flush=True)
    if args.json:
        print(json.dumps({"batches": figures, "runs": args.runs}), flush=True)
    return 0


def _agreement(a, b) -> str:
    """How many leading greedy tokens agree, summed over rows (ties can split fp32 paths later)."""
    same = [int(np.argmin(np.append(x == y, False))) for x, y in zip(a, b, strict=True)]
    return f"{sum(same)}/{a.size}"


if __name__ == "__main__":
    sys.exit(main())
