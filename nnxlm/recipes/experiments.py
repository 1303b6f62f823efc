"""Experiment recipes: fdl.Config(Trainer, ...) — `fdl.build(recipe)` gives a Trainer.

Each derives from `trainer()` by plain Python; `nnxlm train --recipe NAME` runs any of them.
"""

import fiddle as fdl

from nnxlm.data import PythonStdlib, Synthetic
from nnxlm.optim import AdamW
from nnxlm.recipes import models


def trainer(model: fdl.Partial, **settings) -> fdl.Config:
    """A Trainer recipe for `model` on the Python standard library's source files (no download)."""
    from nnxlm.trainer import Trainer  # here: nnxlm.trainer imports nnxlm.recipes (serialization)

    cfg = fdl.Config(
        Trainer,
        model=model,
        train_data=fdl.Config(PythonStdlib, split="train"),
        eval_data=fdl.Config(PythonStdlib, split="eval"),
        optimizer=fdl.Config(AdamW),
        mesh={"data": -1},
    )
    for name, value in settings.items():
        setattr(cfg, name, value)
    return cfg


def tiny() -> fdl.Config:
    """A 0.2 M-parameter model on synthetic tokens: 20 steps in a few seconds on a CPU."""
    cfg = trainer(models.llama_tiny(vocab_size=256), name="tiny", seq_len=64, batch_size=8, num_steps=20)
    cfg.train_data = fdl.Config(Synthetic, vocab_size=256, split="train", eval_fraction=0.1)
    cfg.eval_data = fdl.Config(Synthetic, vocab_size=256, split="eval", eval_fraction=0.1)
    cfg.optimizer.learning_rate = 3e-3
    cfg.optimizer.warmup_steps = 5
    cfg.eval_every = cfg.checkpoint_every = 10
    cfg.eval_batches = 2
    cfg.log_every = 5
    return cfg


def bench_llama_20m() -> fdl.Config:
    """bench/'s main training shape: a 20.6 M-parameter Llama (hidden 256, 4 layers, 4 heads of 64,
    MLP 1024, vocabulary 32000, untied head) on 4 rows of 256 synthetic tokens, fp32, AdamW: 75.9
    MFLOP per trained token (6 x 12.4 M matmul parameters + causal attention)."""
    model = models.llama(vocab_size=32_000, d_model=256, num_layers=4, num_heads=4, num_kv_heads=4, mlp_dim=1024)
    return _bench("bench_llama_20m", model, seq_len=256)


def bench_llama_57m() -> fdl.Config:
    """bench/'s larger training shape: a 56.9 M-parameter Llama (hidden 512, 8 layers, 8 query / 2
    key-value heads of 64, MLP 1536, vocabulary 32000, untied) on 4 rows of 512 synthetic tokens."""
    model = models.llama(vocab_size=32_000, d_model=512, num_layers=8, num_heads=8, num_kv_heads=2, mlp_dim=1536)
    return _bench("bench_llama_57m", model, seq_len=512)


def bench_llama_1b() -> fdl.Config:
    """bench/gpu.py's shape for one H100/H200: a 1.07 B-parameter Llama (hidden 2048, 20 layers, 16
    query / 8 key-value heads of 128, MLP 5632, vocabulary 32000, untied) on 8 rows of 2048 synthetic
    tokens, bfloat16 compute with float32 parameters and AdamW state: 6.56 GFLOP per trained token."""
    # parameters: 20 layers x (attention 2048 x (2048 + 1024 + 1024) + 2048 x 2048 = 12,582,912
    #                          + MLP 3 x 2048 x 5632 = 34,603,008 + two norms of 2048) = 943,800,320
    #           + embedding and head 2 x 32000 x 2048 = 131,072,000 + final norm 2048 = 1,074,874,368
    # FLOPs per token: 6 x (943,718,400 layer matmul weights + 65,536,000 head) = 6.056 G
    #                + attention 6 x 2048 tokens x 20 layers x 16 heads x 128 = 0.503 G: 6.559 GFLOP
    model = models.llama(vocab_size=32_000, d_model=2048, num_layers=20, num_heads=16, num_kv_heads=8, mlp_dim=5632)
    cfg = _bench("bench_llama_1b", model, seq_len=2048)
    cfg.model.dtype = "bfloat16"
    # Scanned layers: compile time independent of depth (the one-GPU check must fit in 10 minutes).
    cfg.model.scan_layers = True
    # Memory: `nnxlm inspect --recipe bench_llama_1b --compile` (XLA:CPU's analysis) puts a step's
    # per-device peak at 99.3 GiB without remat, 45.3 GiB with "dots" (matmul outputs kept, the rest
    # recomputed), 22.8 GiB with "full"; 59.6 GiB without remat at batch 4. "dots" at batch 8 fits
    # an 80 GB H100 with room, also under the 75 % of it that JAX takes by default.
    cfg.model.remat_policy = "dots"
    cfg.batch_size = 8
    return cfg


def _bench(name: str, model: fdl.Partial, seq_len: int) -> fdl.Config:
    """A throughput recipe: synthetic tokens (no tokenizer), no evaluation, one checkpoint at the end."""
    # Layers in a Python loop, without remat: on a 2-core CPU bench_llama_20m stepped in 0.280 s
    # against 0.289 s scanned and 0.286 / 0.298 s with "dots" / "full" remat (medians of 3 runs).
    model.scan_layers = False
    cfg = trainer(model, name=name, seq_len=seq_len, batch_size=4, num_steps=20)
    cfg.train_data = fdl.Config(Synthetic, vocab_size=32_000, num_documents=10_000, split="train")
    cfg.eval_data = None
    cfg.checkpoint_every = 0
    cfg.log_every = 5
    return cfg


def llama2_7b() -> fdl.Config:
    # 4 M tokens a step: 1024 rows x 4096 tokens
    return trainer(models.llama2_7b(), name="llama2_7b", seq_len=4096, batch_size=1024, num_steps=500_000)


def llama3_8b() -> fdl.Config:
    # 4 M tokens a step: 512 rows x 8192 tokens
    cfg = trainer(models.llama3_8b(), name="llama3_8b", seq_len=8192, batch_size=512, num_steps=500_000)
    cfg.model.scan_layers = True
    cfg.model.remat_policy = "full"
    return cfg


def _published(name: str, seq_len: int, batch_size: int) -> fdl.Config:
    """A pretraining-shaped recipe of a published model (scanned layers, full remat)."""
    cfg = trainer(getattr(models, name)(), name=name, seq_len=seq_len, batch_size=batch_size, num_steps=500_000)
    cfg.model.scan_layers = True
    cfg.model.remat_policy = "full"
    return cfg


def llama3_1_8b() -> fdl.Config:
    return _published("llama3_1_8b", 8192, 512)


def llama3_2_1b() -> fdl.Config:
    return _published("llama3_2_1b", 8192, 512)


def llama3_2_3b() -> fdl.Config:
    return _published("llama3_2_3b", 8192, 512)


def llama3_3_70b() -> fdl.Config:
    return _published("llama3_3_70b", 8192, 512)


def mistral_7b() -> fdl.Config:
    return _published("mistral_7b", 8192, 512)


def qwen2_5_0_5b() -> fdl.Config:
    return _published("qwen2_5_0_5b", 4096, 1024)


def qwen2_5_1_5b() -> fdl.Config:
    return _published("qwen2_5_1_5b", 4096, 1024)


def qwen2_5_7b() -> fdl.Config:
    return _published("qwen2_5_7b", 4096, 1024)


def qwen3_0_6b() -> fdl.Config:
    return _published("qwen3_0_6b", 4096, 1024)


def qwen3_8b() -> fdl.Config:
    return _published("qwen3_8b", 4096, 1024)


def qwen3_30b_a3b() -> fdl.Config:
    return _published("qwen3_30b_a3b", 4096, 1024)


def mixtral_8x7b() -> fdl.Config:
    return _published("mixtral_8x7b", 4096, 1024)


def mixtral_8x22b() -> fdl.Config:
    return _published("mixtral_8x22b", 4096, 1024)


def gemma_2b() -> fdl.Config:
    return _published("gemma_2b", 8192, 512)


def gemma_7b() -> fdl.Config:
    return _published("gemma_7b", 8192, 512)


def gemma2_2b() -> fdl.Config:
    return _published("gemma2_2b", 8192, 512)


def gemma2_9b() -> fdl.Config:
    return _published("gemma2_9b", 8192, 512)


def gemma2_27b() -> fdl.Config:
    return _published("gemma2_27b", 8192, 512)


def gemma3_1b() -> fdl.Config:
    return _published("gemma3_1b", 8192, 512)


def gemma3_4b() -> fdl.Config:
    return _published("gemma3_4b", 8192, 512)


def deepseek_v3() -> fdl.Config:
    # 4096-token rows, 15,360 a step (DeepSeek-V3's batch after its ramp-up): 63 M tokens
    return _published("deepseek_v3", 4096, 15_360)
