"""bench/gpu.sh and bench/gpu.py, the one-GPU check, on a CPU: its recipe, its smoke run end to end,
the settings it falls back to, the section it writes, and the one line each missing piece gets."""

import json
import os
import subprocess
import sys
from importlib import metadata

import fiddle as fdl
import pytest
from flax import nnx

import nnxlm
from bench import gpu
from bench.common import REPO
from nnxlm import metrics

SCRIPT = os.path.join(REPO, "bench", "gpu.sh")


def test_bench_llama_1b_is_the_shape_and_flop_count_its_comment_derives():
    cfg = nnxlm.recipes.bench_llama_1b()
    model = nnx.eval_shape(lambda: fdl.build(cfg.model)(rngs=nnx.Rngs(0)))
    attention = cfg.model.block.attention
    assert (model.d_model, model.num_layers, attention.num_heads, attention.num_kv_heads, attention.head_dim) == (
        2048, 20, 16, 8, 128,
    )  # fmt: skip
    assert (cfg.model.block.mlp.hidden_dim, model.vocab_size, model.tie_embeddings) == (5632, 32_000, False)
    assert (cfg.seq_len, cfg.batch_size, cfg.model.dtype, cfg.model.remat_policy) == (2048, 8, "bfloat16", "dots")
    assert cfg.train_data.vocab_size == model.vocab_size  # synthetic tokens: no tokenizer
    assert metrics.parameter_count(model) == 1_074_874_368
    assert {p.dtype.name for _, p in nnx.iter_graph(model) if isinstance(p, nnx.Param)} == {"float32"}
    # 6 x (943,718,400 layer matmul weights + 65,536,000 head) + 6 x 2048 x 20 layers x 16 heads x 128
    assert metrics.training_flops_per_token(model, cfg.seq_len) == 6_558_842_880


def test_a_failed_setting_is_followed_by_the_one_that_can_run():
    out_of_memory = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3.1GiB")
    assert gpu.next_setting(out_of_memory, "cudnn", "dots") == ("cudnn", "full")
    assert gpu.next_setting(out_of_memory, "cudnn", "full") == ("auto", "full")
    assert gpu.next_setting(RuntimeError("cuDNN: no plan"), "cudnn", "dots") == ("auto", "dots")
    assert gpu.next_setting(out_of_memory, "auto", "full") is None
    assert gpu.next_setting(ValueError("bad"), "auto", "dots") is None


def test_the_section_replaces_its_own_and_leaves_the_others(tmp_path):
    path = tmp_path / "results.md"
    path.write_text(f"# nnxlm benchmarks\n\ntable\n\n{gpu.HEADING} (old)\n\nold figures\n\n## Quantization\n\nq\n")
    gpu.write_section(str(path), f"{gpu.HEADING} (new)\n\nnew figures\n")
    assert path.read_text() == (
        f"# nnxlm benchmarks\n\ntable\n\n{gpu.HEADING} (new)\n\nnew figures\n\n## Quantization\n\nq\n"
    )
    fresh = tmp_path / "fresh.md"
    fresh.write_text("# nnxlm benchmarks\n")
    gpu.write_section(str(fresh), f"{gpu.HEADING} (new)\n")
    assert fresh.read_text() == f"# nnxlm benchmarks\n\n{gpu.HEADING} (new)\n"


def test_smoke_run_of_the_script_trains_decodes_and_writes_its_section(tmp_path):
    # the whole path a GPU run takes, through gpu.sh, on a tiny model; cuDNN's kernel, which a CPU
    # lacks, is asked for first, so the fall-back to the blockwise attention runs too
    results = tmp_path / "results.md"
    results.write_text("# nnxlm benchmarks\n\n| table |\n")
    command = ["bash", SCRIPT, "--smoke", "--attention", "cudnn", "--output", str(results), "--json"]
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    train = result["train"]
    assert (train["attention"], train["remat"]) == ("auto", "dots")
    assert train["failed_settings"][0]["attention"] == "cudnn" and "GPU kernel" in train["failed_settings"][0]["error"]
    assert train["tokens_per_s"] > 0 and 0 < train["mfu"] < 1 and len(train["blocks_s"]) == 2
    assert train["flops_per_token"] > 0 and train["tokens_per_step"] == 2 * 64
    assert set(result["decode"]) == {"1", "32"} and all(d["tokens_per_s"] > 0 for d in result["decode"].values())
    text = results.read_text()
    assert text.startswith("# nnxlm benchmarks\n\n| table |\n\n" + gpu.HEADING) and "SMOKE RUN" in text
    assert "| decode, batch 32 | new tokens/s |" in text and "which failed: UserError" in text
    assert "jax " + metadata.version("jax") in text


def _fake_nvidia_smi(directory, listing: str) -> dict:
    """An environment whose nvidia-smi lists `listing` (nothing: no GPU) with a CUDA 13.0 driver."""
    script = directory / "nvidia-smi"
    header = "| NVIDIA-SMI 580.65.06   Driver Version: 580.65.06   CUDA Version: 13.0 |"
    script.write_text(
        f'#!/bin/sh\ncase "$1" in\n  --query-gpu=*) [ -n "{listing}" ] && echo "{listing}" || exit 9 ;;\n'
        f'  *) echo "{header}" ;;\nesac\n'
    )
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{directory}{os.pathsep}{os.environ['PATH']}", "PYTHON": sys.executable}


def _one_line(done) -> str:
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stdout + done.stderr
    return lines[0]


def test_without_a_gpu_the_script_says_so_in_one_line(tmp_path):
    done = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=_fake_nvidia_smi(tmp_path, ""))
    assert "nvidia-smi lists no GPU" in _one_line(done)


@pytest.mark.skipif(
    any(name.startswith("jax-cuda") for name in (d.metadata["Name"] or "" for d in metadata.distributions())),
    reason="this environment has jax's CUDA plugin",
)
def test_a_jax_without_cuda_is_named_with_the_package_to_install(tmp_path):
    env = _fake_nvidia_smi(tmp_path, "NVIDIA H100 80GB HBM3")
    line = _one_line(subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=env))
    version = metadata.version("jax")
    assert f"jax {version} is installed without CUDA" in line and f"'jax[cuda13]=={version}'" in line
    assert "bench/README.md" in line  # where the offline install is described
