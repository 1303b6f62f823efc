"""GRPO sampling speed: the tokens a GRPO run samples per second inside training, against
nnxlm.generate alone on the same model, prompts and settings.

    python -m bench.grpo [--steps 12] [--max_new_tokens 32] [--rounds 5]

The model is the GRPO demo's (recipes/grpo.py: 1 M parameters, vocabulary 512) freshly initialised,
so that it rarely ends a completion early and every row samples max_new_tokens; the prompts are
the demo's sums. Inside training, each step samples batch_size / group_size prompts x group_size
completions with the live weights (GRPO.rollout); alone, generate() samples the same rows with the
same weights. Both figures are medians; the first two training steps (compilation) are left out.
"""

import argparse
import os
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import REPO, emit, median


def bench(steps: int = 12, max_new_tokens: int = 32, rounds: int = 5) -> dict:
    import fiddle as fdl
    import numpy as np

    from nnxlm.data import SentencePieceTokenizer
    from nnxlm.data.sources import PythonStdlib
    from nnxlm.generation import generate
    from nnxlm.recipes.directives import resolve

    workdir = tempfile.mkdtemp(prefix="nnxlm-bench-grpo-")
    texts = [open(p, encoding="utf-8").read() for p in PythonStdlib().documents()[:40]]
    SentencePieceTokenizer.train(texts, 512, max_chars=300_000).save(os.path.join(workdir, "tokenizer.model"))
    cfg = resolve([os.path.join(REPO, "recipes", "grpo.py") + ":grpo"])
    cfg.load_parameters_path, cfg.workdir, cfg.num_steps = None, workdir, steps
    cfg.eval_data, cfg.checkpoint_every, cfg.log_every = None, 0, 1000
    cfg.objective.max_new_tokens, cfg.seq_len = max_new_tokens, max_new_tokens + 16
    trainer = fdl.build(cfg)
    history = trainer.fit()
    in_training = [r["sample_tokens_per_s"] for r in history[2:]]
    step_s = [r["step_time_s"] for r in history[2:]]

    prompts = next(iter(trainer._dataset(trainer.train_data, shuffle=True, repeat=True)))
    group, objective, eos = cfg.objective.group_size, trainer.objective, trainer.tokenizer.eos_id
    ids = [row[:n].tolist() for row, n in zip(prompts["prompt_ids"], prompts["prompt_length"], strict=True)]
    ids = [p for p in ids for _ in range(group)]
    alone = []
    for seed in range(rounds + 1):  # the first call compiles
        start = time.perf_counter()
        new = generate(trainer.model, ids, max_new_tokens, objective.temperature, seed=seed, eos_id=eos, pad_id=eos)
        elapsed = time.perf_counter() - start
        tokens = sum(row.index(eos) + 1 if eos in row else len(row) for row in new.tolist())
        if seed:
            alone.append(tokens / elapsed)
    return {
        "rows": len(ids),
        "max_new_tokens": max_new_tokens,
        "in_training_tokens_per_s": median(in_training),
        "generate_tokens_per_s": median(alone),
        "ratio": median(in_training) / median(alone),
        "step_time_s": median(step_s),
        "mean_completion_length": float(np.mean([r["completion_length"] for r in history])),
    }


def table(result: dict) -> str:
    return "\n".join(
        [
            f"GRPO demo model, {result['rows']} rows (prompts x group) of up to {result['max_new_tokens']} new tokens "
            f"(mean completion {result['mean_completion_length']:.1f} tokens)",
            "",
            "| sampling | tokens/s |",
            "|---|---:|",
            f"| inside GRPO training (rollout on the live weights) | {result['in_training_tokens_per_s']:,.0f} |",
            f"| nnxlm.generate alone, same model and rows | {result['generate_tokens_per_s']:,.0f} |",
            f"| ratio, same run | {result['ratio']:.2f} |",
            "",
            f"Median GRPO step (sampling, rewards and update): {result['step_time_s']:.3f} s",
        ]
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the raw result as JSON")
    args = parser.parse_args(argv)
    result = bench(args.steps, args.max_new_tokens, args.rounds)
    if args.json:
        emit(result)
    else:
        print(table(result))


if __name__ == "__main__":
    main()
