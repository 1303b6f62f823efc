"""`nnxlm data bench`: a recipe's input pipeline alone, without a model.

It builds the batches exactly as `nnxlm train` would (the recipe's source, tokenizer, data shards
and num_workers), times the first batch (start-up: indexing the documents, starting workers) and
then iterates for a fixed time. When the run directory holds a training run's metrics, it also
says how many times faster the pipeline is than the train step consumed tokens: below 1× the
accelerator waits for data.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from nnxlm.data.show import training_batches


def bench(trainer, seconds: float = 10.0, warmup_batches: int = 2) -> str:
    """The report: start-up time, then batches/s and tokens/s over `seconds` after warm-up."""
    start = time.perf_counter()
    batches = training_batches(trainer)
    next(batches)
    first = time.perf_counter() - start
    for _ in range(warmup_batches):
        next(batches)
    count, tokens, loss_tokens = 0, 0, 0.0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or count == 0:
        batch = next(batches)
        count += 1
        tokens += batch["inputs"].size
        loss_tokens += float(np.sum(batch["loss_mask"]))
    elapsed = time.perf_counter() - start
    source = type(trainer.train_data).__name__
    lines = [
        f"data of the recipe: {source}, {trainer.batch_size} rows × {trainer.seq_len} tokens a batch, "
        f"num_workers {trainer.num_workers}",
        f"first batch after {first:.2f} s (start-up: finding and indexing the documents, starting workers)",
        f"{count} batches in {elapsed:.1f} s: {count / elapsed:,.2f} batches/s, {tokens / elapsed:,.0f} tokens/s "
        f"({loss_tokens / max(tokens, 1):.0%} of them carry loss)",
    ]
    consumed = _consumed_tokens_per_s(trainer.workdir)
    if consumed:
        lines.append(
            f"the last training run in {trainer.workdir} consumed {consumed:,.0f} tokens/s: "
            f"the pipeline delivers {tokens / elapsed / consumed:,.1f}× that"
        )
    return "\n".join(lines)


def _consumed_tokens_per_s(workdir) -> float | None:
    """The median tokens/s of the run directory's training steps, if it has a run."""
    from nnxlm.metrics import read_metrics

    try:
        records = read_metrics(workdir)
    except (OSError, ValueError, KeyError):
        return None
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    return statistics.median(rates) if rates else None
