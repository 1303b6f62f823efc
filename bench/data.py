"""Data pipeline speed: tokens/s that nnxlm's grain pipeline delivers from text.

    python -m bench.data [--seconds 3] [--runs 3]

The pipeline is the one the trainer builds (nnxlm.data.make_dataset, in process as the trainer's
default num_workers=0): the Python standard library's source files read from disk, shuffled,
tokenized by a SentencePiece BPE tokenizer, packed into rows of 257 tokens and batched 4 rows at a
time, as for bench_llama_20m. The tokenizer (8192 pieces: the stdlib holds too little text for
32000) is trained first and not timed. Each run iterates a fresh pipeline (another shuffle seed)
for --seconds after 5 warm-up batches; the figure is the median over runs.
"""

import argparse
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit, median

SEQ_LEN, BATCH_SIZE, VOCAB_SIZE = 256, 4, 8192


def tokens_per_second(
    source, tokenizer, seed: int, seconds: float, seq_len: int = SEQ_LEN, batch_size: int = BATCH_SIZE
) -> float:
    """Tokens/s the pipeline delivers over `seconds`, after 5 warm-up batches."""
    from nnxlm.data import make_dataset

    iterator = iter(make_dataset(source, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed))
    for _ in range(5):
        next(iterator)
    batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(iterator)
        batches += 1
    return batches * batch_size * seq_len / (time.perf_counter() - start)


def run(seconds: float, runs: int) -> dict:
    from nnxlm.data import PythonStdlib, SentencePieceTokenizer

    source = PythonStdlib(split="train")
    texts = (source.load(doc) for doc in source.documents())
    tokenizer = SentencePieceTokenizer.train(texts, VOCAB_SIZE, max_chars=5_000_000)
    rates = [tokens_per_second(source, tokenizer, seed, seconds) for seed in range(runs)]
    return dict(tokens_per_s=median(rates), runs=rates)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    emit(run(args.seconds, args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
