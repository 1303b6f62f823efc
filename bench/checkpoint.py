"""Checkpoint speed: how long an asynchronous save blocks training, and how long a restore takes.

    python -m bench.checkpoint [--recipe bench_llama_57m] [--runs 3]

The trainer's own path: Trainer.save() (orbax, asynchronous: it returns once the arrays are
copied off the device and the write continues in the background) of the recipe's full train state
(model, AdamW moments, step, RNG, data-iterator position), then Checkpointer.restore() of the
same state onto the trainer's abstract state, after one training step (so that the AdamW moments
are not zeros, which compress). That step ends with a first save, orbax's warm-up; the figures are
medians over --runs more saves and restores, on the local disk of a temporary directory.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit, median


def run(recipe: str, runs: int) -> dict:
    import fiddle as fdl
    import jax

    from nnxlm.recipes import RECIPES

    workdir = tempfile.mkdtemp(prefix="nnxlm-bench-")
    try:
        cfg = RECIPES[recipe]()
        cfg.workdir = workdir
        cfg.keep_checkpoints = runs + 2
        cfg.num_steps = 1  # one step, so that the AdamW moments hold numbers (zeros compress)
        cfg.peak_flops_per_device = 1.0  # not measured: no MFU is reported here
        trainer = fdl.build(cfg)
        trainer.fit()  # ends with a save: orbax's warm-up
        trainer.checkpointer.wait()
        blocking, total, restore = [], [], []
        for step in range(2, runs + 2):
            trainer.step = step
            start = time.perf_counter()
            trainer.save()
            blocking.append(time.perf_counter() - start)
            trainer.checkpointer.wait()
            total.append(time.perf_counter() - start)
            start = time.perf_counter()
            restored, _ = trainer.checkpointer.restore(step, trainer.abstract_state)
            jax.block_until_ready(restored)
            restore.append(time.perf_counter() - start)
        last = os.path.join(trainer.checkpointer.directory, str(runs + 1))
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(last) for f in files)
        return dict(
            save_blocking_s=median(blocking),
            save_total_s=median(total),
            restore_s=median(restore),
            checkpoint_mb=size / 2**20,
            runs=runs,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="bench_llama_57m")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    emit(run(args.recipe, args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
