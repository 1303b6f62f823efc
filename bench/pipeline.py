"""Pipeline parallelism on 8 fake CPU devices: step time of pipeline=2 and 4 against data
parallelism, and the bubble fraction measured from step times at several micro-batch counts.

    python -m bench.pipeline [--steps 4] [--json]

Each configuration runs in a process of its own (run_worker): one process for all of them grew
past 19 GB and was killed on a 23 GB machine.

The shape: bench_llama_20m with scanned layers, fp32, 8 rows of 256 synthetic tokens a step (the
recipe's 4 rows cannot split over 8 data devices; bench_llama_57m at 8 x 512 ran out of memory
with 8 fake devices on this 23 GB machine). Honest caveat: the 8 "devices" are XLA's fake CPU devices sharing
this machine's cores, so no two stages ever run at the same time and a pipeline cannot be faster
than data parallelism here; what the figures show is the schedule's overhead (the bubble, which
this GSPMD schedule spends computing on padding, and the stage shifts) and that it follows the
formula. On real accelerators the stages run concurrently.

Measured bubble: with S stages and M micro-batches a step costs o + a (M + S - 1) / M (o: the
embedding, head, optimizer and whatever does not scale with the iterations; a: the layers' work
on the whole batch; every one of the M + S - 1 iterations costs a / M). A least-squares fit of
(o, a) to the step times at M = 1, 2, 4 gives the measured bubble a (S - 1) / M / (t(M) - o),
next to the computed (S - 1) / (M + S - 1). A step time is the median of --steps steps after the
compiling one.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import run_worker  # noqa: E402

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

# bench_llama_57m at 8 x 512 tokens ran out of memory at pipeline=4, M=1 (16 GB for 8 fake devices:
# every stage computes the embedding and the 32000-way head); the 20 M shape at 8 x 256 fits.
RECIPE, SEQ_LEN = "bench_llama_20m", 256
RUNS = {  # name: (mesh, Trainer fields)
    "data=8": ({"data": 8}, {}),
    "pipeline=2 data=4, M=2": ({"pipeline": 2, "data": 4}, {"pipeline_microbatches": 2}),
    "pipeline=4 data=2, M=1": ({"pipeline": 4, "data": 2}, {"pipeline_microbatches": 1}),
    "pipeline=4 data=2, M=2": ({"pipeline": 4, "data": 2}, {"pipeline_microbatches": 2}),
    "pipeline=4 data=2, M=4": ({"pipeline": 4, "data": 2}, {"pipeline_microbatches": 4}),
}


def step_time(mesh: dict, fields: dict, steps: int) -> float:
    """The median step time of one configuration, in a fresh process."""
    return run_worker(["bench.pipeline", "--worker", json.dumps([mesh, fields, steps])])["step_time_s"]


def worker(mesh: dict, fields: dict, steps: int) -> float:
    import fiddle as fdl

    from nnxlm import recipes

    cfg = getattr(recipes, RECIPE)()
    cfg.model.scan_layers = True
    cfg.batch_size, cfg.seq_len, cfg.mesh, cfg.num_steps = 8, SEQ_LEN, mesh, steps + 1
    cfg.workdir, cfg.log_every = tempfile.mkdtemp(prefix="nnxlm-bench-pipeline-"), 1000
    for field, value in fields.items():
        setattr(cfg, field, value)
    trainer = fdl.build(cfg)
    history = trainer.fit()
    trainer.checkpointer.close()
    return statistics.median(record["step_time_s"] for record in history[1:])


def measured_bubbles(times: dict[int, float], stages: int) -> dict[int, float]:
    """{M: a (S - 1) / M / (t(M) - o)} from the least-squares fit t(M) = o + a (M + S - 1) / M."""
    import numpy as np

    ms = sorted(times)
    design = np.array([[1.0, (m + stages - 1) / m] for m in ms])
    (overhead, work), *_ = np.linalg.lstsq(design, np.array([times[m] for m in ms]), rcond=None)
    return {m: work * (stages - 1) / m / (times[m] - overhead) for m in ms}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps a configuration (after the first)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # [mesh, fields, steps]: one configuration
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps({"step_time_s": worker(*json.loads(args.worker))}))
        return 0
    from nnxlm.modules.pipeline import bubble_fraction

    started = time.time()
    times = {name: step_time(mesh, fields, args.steps) for name, (mesh, fields) in RUNS.items()}
    base = times["data=8"]
    by_m = {int(name.split("M=")[1]): t for name, t in times.items() if name.startswith("pipeline=4")}
    measured = measured_bubbles(by_m, stages=4)
    result = {
        "step_time_s": times,
        "vs_data_parallel": {name: t / base for name, t in times.items()},
        "bubble_pipeline4": {m: {"measured": measured[m], "computed": bubble_fraction(4, m)} for m in measured},
        "wall_s": time.time() - started,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{RECIPE}, scanned, fp32, 8 x {SEQ_LEN} tokens a step, 8 fake CPU devices (sharing the cores)")
    for name, t in times.items():
        print(f"  {name:24s} step {t:7.3f} s  ({t / base:.2f}x data=8)")
    print("pipeline=4 bubble fraction, measured (fit of step times over M) vs computed (S - 1) / (M + S - 1):")
    for m, figures in result["bubble_pipeline4"].items():
        print(f"  M={m}: measured {figures['measured']:.1%}, computed {figures['computed']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
