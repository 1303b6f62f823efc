"""What bench/ relies on: the benchmark recipes, the FLOP count they are measured against, the
results table, and the huge-page restart of `nnxlm train`. (The speeds themselves live in bench/.)"""

import math
import subprocess
import sys

import fiddle as fdl
import pytest
from flax import nnx

import nnxlm
from bench.common import Row, results_markdown
from nnxlm import launch, metrics


def _abstract_model(cfg):
    return nnx.eval_shape(lambda: fdl.build(cfg.model)(rngs=nnx.Rngs(0)))


def test_bench_llama_20m_counts_the_flops_the_benchmark_is_measured_against():
    cfg = nnxlm.recipes.bench_llama_20m()
    model = _abstract_model(cfg)
    assert (cfg.seq_len, cfg.batch_size, model.vocab_size, model.tie_embeddings) == (256, 4, 32_000, False)
    assert metrics.parameter_count(model) == 20_580_608
    # 6 x (4 layers x 1,048,576 + 256 x 32000 head) matmul parameters + 6 x 256 x 4 x 4 x 64 attention
    assert metrics.training_flops_per_token(model, cfg.seq_len) == 75_890_688


def test_bench_llama_57m_has_the_larger_shape():
    cfg = nnxlm.recipes.bench_llama_57m()
    model = _abstract_model(cfg)
    attention = cfg.model.block.attention
    assert (model.num_layers, model.d_model, attention.num_heads, attention.num_kv_heads) == (8, 512, 8, 2)
    assert (cfg.model.block.mlp.hidden_dim, cfg.seq_len) == (1536, 512)
    assert metrics.parameter_count(model) == 56_893_952


def test_results_table_puts_each_figure_beside_its_peer_with_the_ratio_pointing_to_the_better():
    rows = [
        Row("train", "tokens/s", 3000.0, 1500.0, repeats=3),
        Row("train", "step time s", 0.25, 0.5, "{:.2f}", higher_is_better=False, repeats=3),
        Row("data", "tokens/s delivered", 1e6, note="300× training"),
    ]
    table = results_markdown("nnxlm benchmarks", ["a CPU"], rows).splitlines()
    assert table[0] == "# nnxlm benchmarks" and "- a CPU" in table
    assert "| train | tokens/s | 3,000 | 1,500 | 2.00× | 3 |" in table
    assert "| train | step time s | 0.25 | 0.50 | 2.00× | 3 |" in table
    assert "| data | tokens/s delivered (300× training) | 1,000,000 | — | — | — |" in table


def test_huge_pages_are_added_to_the_users_glibc_tunables_or_turned_off(monkeypatch):
    ours = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"
    assert launch.with_huge_pages({})["GLIBC_TUNABLES"] == ours
    assert launch.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:" + ours
    )
    # a setting of the user's is kept, not doubled
    mine = launch.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"})["GLIBC_TUNABLES"]
    assert mine == "glibc.malloc.trim_threshold=0:glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432"
    monkeypatch.setenv("NNXLM_HUGE_PAGES", "0")
    assert not launch.huge_pages_apply()
    monkeypatch.setenv("NNXLM_HUGE_PAGES", "1")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    assert not launch.huge_pages_apply()  # already set: no second restart


@pytest.mark.parametrize(
    "argv, orig_argv, restarts",
    [
        (["/venv/bin/nnxlm", "train", "--recipe", "tiny"], ["/venv/bin/python", "/venv/bin/nnxlm", "train"], True),
        (["-m", "train", "--recipe", "tiny"], ["python", "-X", "importtime", "-m", "nnxlm", "train"], True),
        (["/venv/bin/nnxlm", "inspect", "--recipe", "tiny"], ["python", "/venv/bin/nnxlm", "inspect"], False),
        (["/venv/bin/pytest", "train"], ["python", "/venv/bin/pytest", "train"], False),
        (["-m", "train"], ["python", "-m", "pytest", "train"], False),
    ],
)
def test_only_the_train_command_restarts_itself(monkeypatch, argv, orig_argv, restarts):
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    assert launch._is_train_command() == restarts


def test_flops_per_token_are_the_same_for_scanned_and_looped_layers():
    looped = nnxlm.recipes.bench_llama_20m()
    scanned = nnxlm.recipes.bench_llama_20m()
    scanned.model.scan_layers = True
    flops = [metrics.training_flops_per_token(_abstract_model(cfg), 256) for cfg in (looped, scanned)]
    assert flops[0] == flops[1]


def test_the_metrics_writer_does_not_import_torch(tmp_path):
    # tensorboardX imports torch when installed: 0.7-1.5 s that `nnxlm train` must not spend
    code = (
        "import sys; from nnxlm.metrics import MetricsWriter; MetricsWriter(sys.argv[1]).close(); print(*sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    modules = done.stdout.split()
    assert "tensorboardX" in modules and "torch" not in modules


def test_dpo_bench_steps_both_references_and_lora_keeps_less_state_beside_the_model():
    from bench import dpo

    # a 1-layer tiny model, one block of one step: both step processes, their reports and the table
    out = dpo.bench(["tiny", "set:model.num_layers=1"], rank=4, rounds=1, steps=1, log=lambda _: None)
    table = dpo.table(out)
    assert all(label in table for label in dpo.LABELS.values()) and "LoRA / full, same run" in table
    full, lora = out["results"]["dpo-full"], out["results"]["dpo-lora"]
    assert (full["reference_mode"], lora["reference_mode"]) == ("copy", "adapters")
    assert full["reference_bytes"] == full["model_bytes"] and lora["reference_bytes"] == 0
    assert lora["beyond_model_bytes"] < full["beyond_model_bytes"] and lora["trainable"] < full["trainable"]
    for result in (full, lora):  # the policy starts as its reference: the DPO loss is ln 2
        assert result["first_loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert len(result["blocks"]) == 1 and result["step_s"] > 0 and result["step_peak_bytes"] > 0


def test_grpo_bench_measures_sampling_inside_training_and_alone():
    from bench import grpo

    result = grpo.bench(steps=3, max_new_tokens=4, rounds=1)
    assert result["in_training_tokens_per_s"] > 0 and result["generate_tokens_per_s"] > 0
    assert result["rows"] == 128 and 0 < result["mean_completion_length"] <= 4
    assert "ratio, same run" in grpo.table(result)


def test_serve_bench_streams_to_concurrent_clients_and_times_the_transformers_loop():
    import importlib.util

    from bench import serve

    with_hf = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
    # the tiny recipe, 4 requests of 8 tokens to 1 and then 2 streaming clients: server, clients, peer, table
    result = serve.bench(
        ["tiny"], clients=(1, 2), requests=4, max_tokens=8, rounds=1, hf_requests=2, with_hf=with_hf, slots=2,
        log=lambda _: None,
    )  # fmt: skip
    tiny = result["recipes"]["tiny"]
    assert list(tiny["clients"]) == [1, 2] and (tiny["requests"], tiny["rounds"]) == (4, 1)
    for figures in tiny["clients"].values():
        assert figures["tokens_per_s"] > 0 and 0 < figures["ttft_ms"]["p50"] <= figures["ttft_ms"]["p99"]
        assert figures["itl_ms"]["p50"] >= 0 and figures["tokens_per_chunk"] >= 1
    assert tiny["clients"][1]["speedup"] == 1.0
    if with_hf:
        assert tiny["hf"]["tokens_per_s"] > 0 and tiny["hf"]["same_tokens"].endswith("/16")
    table = serve.table(result)
    assert "| 0.2 M | 1 (one at a time) | 4 |" in table and ("transformers `generate`" in table) == with_hf


def test_matmul_bench_times_every_product_of_the_long_context_step_once_per_use():
    import numpy as np

    from bench import long_context, matmul
    from nnxlm.modules.flash import chunk_schedule
    from nnxlm.recipes import models

    seq_len, layers = 2048, long_context.MODEL["num_layers"]
    table = matmul.products(seq_len)
    model = nnx.eval_shape(lambda: fdl.build(models.llama(**long_context.MODEL))(rngs=nnx.Rngs(0)))
    kernels = sum(math.prod(x.shape) for path, x in nnx.to_flat_state(nnx.state(model, nnx.Param)) if "kernel" in path)
    # forward, input gradient and weight gradient: 6 FLOPs a kernel parameter a token
    weights = sum(p["flops"] * p["count"] for p in table if p["part"] != "attention blocks")
    assert weights == 6 * seq_len * kernels
    # the attention's block products: 3 + 2 + 2 a chunk of 2 causal block pairs, as flash walks them
    pairs = sum(size * len(starts) for size, starts in chunk_schedule(seq_len // matmul.BLOCK, 2))
    assert pairs == 36
    assert [p["count"] for p in table if p["part"] == "attention blocks"] == [
        3 * layers * pairs / 2,
        2 * layers * pairs / 2,
        2 * layers * pairs / 2,
    ]
    # in each framework's layout, the same product; PyTorch's run as one matmul of transposed views
    rng, small = np.random.default_rng(0), dict(zip("tiobrsh", (6, 5, 7, 2, 4, 3, 5), strict=True))
    for p in table:
        (ours, *_), (theirs, *_) = p["nnxlm"], p["torch"]
        for spec in (ours, theirs):
            a, b = (rng.standard_normal([small[c] for c in side]) for side in spec.split("->")[0].split(","))
            flip_a, flip_b = matmul.operands_transposed(spec)
            as_matmul = (a.swapaxes(-1, -2) if flip_a else a) @ (b.swapaxes(-1, -2) if flip_b else b)
            assert np.allclose(np.einsum(spec, a, b), as_matmul), spec
        assert sorted(theirs.replace(",", "").replace("->", "")) == sorted(ours.replace(",", "").replace("->", ""))
