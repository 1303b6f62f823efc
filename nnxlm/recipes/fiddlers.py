"""Fiddlers: functions that edit a recipe in place, usable as `--recipe fiddler:NAME(args)`."""

import fiddle as fdl

from nnxlm.data import Synthetic


def loop_layers(cfg: fdl.Config) -> None:
    """Apply layers in a Python loop instead of nnx.scan (slower to compile, easier to debug)."""
    cfg.model.scan_layers = False


def remat(cfg: fdl.Config, policy: str = "full") -> None:
    """Recompute activations in the backward pass: "full", "dots" or "none"."""
    cfg.model.remat_policy = policy


def bfloat16(cfg: fdl.Config) -> None:
    """Compute in bfloat16, keep float32 parameters and optimizer state."""
    cfg.model.dtype = "bfloat16"


def synthetic_data(cfg: fdl.Config, num_documents: int = 2000) -> None:
    """Train and evaluate on synthetic token documents sized to the model's vocabulary (no tokenizer)."""
    vocab = cfg.model.vocab_size
    cfg.train_data = fdl.Config(
        Synthetic, num_documents=num_documents, vocab_size=vocab, split="train", eval_fraction=0.1
    )
    cfg.eval_data = fdl.Config(
        Synthetic, num_documents=num_documents, vocab_size=vocab, split="eval", eval_fraction=0.1
    )


def quick(cfg: fdl.Config, steps: int = 20) -> None:
    """A short smoke run: `steps` steps, checkpoint and evaluate at the end, small batches."""
    cfg.num_steps = steps
    cfg.checkpoint_every = steps
    cfg.eval_every = steps
    cfg.eval_batches = 2
    cfg.optimizer.warmup_steps = min(cfg.optimizer.warmup_steps, steps // 4)
