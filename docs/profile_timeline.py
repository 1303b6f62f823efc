"""Draws a still timeline of an nnxlm profile, as docs/profile_demo.png shows one of the demo.

    python docs/profile_timeline.py runs/demo/profile docs/profile_demo.png

It reads the Chrome trace (<host>.trace.json.gz) of the newest trace under the profile directory
and draws, from the first traced step to the end of the trace: the "train" step annotations, what
the host's Python thread does (load the batch, dispatch the step, wait for the step's metrics,
write the trace), when XLA:CPU executes each step, and the ops it runs on its worker threads
(matmuls apart). A trace of an accelerator has its device lanes besides, which this leaves out.
To explore a trace, open it in TensorBoard or ui.perfetto.dev (README, "Profiling").
"""

import gzip
import json
import sys

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402
from etils import epath  # noqa: E402

# Host events drawn, by name (matched at the end: the Python tracer prefixes "$file.py:line "),
# with their legend label and colour.
HOST = (
    ("_BatchDatasetIterator.__next__", "load the batch", "tab:green"),
    ("PjitFunction(_train_step_fn)", "dispatch the step", "tab:blue"),
    ("np.asarray(jax.Array)", "wait for the step's metrics", "lightgray"),
    (" stop_trace", "write the trace", "tab:red"),
)
# Worker-thread events that are bookkeeping, not ops.
NOT_OPS = ("ThreadpoolListener", "end: ", "ThunkExecutor", "SlinkyThreadPool")


def newest_trace(profile_dir: str) -> dict:
    sessions = sorted(epath.Path(profile_dir).glob("plugins/profile/*"))
    if not sessions:
        raise SystemExit(f"no trace under {profile_dir}/plugins/profile: run with profile_steps > 0")
    (trace_file,) = sessions[-1].glob("*.trace.json.gz")
    return json.loads(gzip.decompress(trace_file.read_bytes()))


def draw(trace: dict, output: str) -> None:
    events = trace["traceEvents"]
    threads = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "thread_name"}
    spans = [e for e in events if e.get("ph") == "X"]
    steps = sorted((e for e in spans if e["name"] == "train"), key=lambda e: e["ts"])
    start, end = steps[0]["ts"], max(e["ts"] + e["dur"] for e in spans)
    host = next(tid for tid, name in threads.items() if name == "python" and any(e["tid"] == tid for e in steps))
    workers = sorted(tid for tid, name in threads.items() if "XLAEigen" in name)

    def ms(ts):
        return (ts - start) / 1e3

    figure, axes = plt.subplots(figsize=(10, 3.4), dpi=100)
    lanes = ["steps (marked)", "host (Python)", "steps (executed)"]
    lanes += [f"XLA:CPU worker {i + 1}" for i in range(len(workers))]
    row = {name: len(lanes) - 1 - i for i, name in enumerate(lanes)}  # top to bottom

    def bars(items, lane, **style):
        if items:
            axes.broken_barh(items, (row[lane] - 0.35, 0.7), **style)

    # XLA:CPU's client thread spans each execution of a program; the train step's is the first
    # execution to begin after the step's dispatch (the host runs one step ahead)
    executions = sorted(
        (e for e in spans if e["name"] == "ThunkExecutor::Execute (wait for completion)" and e["dur"] > 1e3),
        key=lambda e: e["ts"],
    )
    for step in steps:
        bars([(ms(step["ts"]), step["dur"] / 1e3)], "steps (marked)", color="black")
        axes.axvline(ms(step["ts"]), color="black", lw=0.6, ls=":")
        name = f"train {step['args']['step_num']}"
        axes.text(ms(step["ts"]) + 8, row["steps (marked)"], name, va="center", fontsize=9)
        run = next((e for e in executions if e["ts"] > step["ts"]), None)
        if run:
            bars([(ms(run["ts"]), run["dur"] / 1e3)], "steps (executed)", color="tab:cyan", edgecolor="white")
            middle = ms(run["ts"] + run["dur"] / 2)
            axes.text(middle, row["steps (executed)"], name, ha="center", va="center", fontsize=9)
    for suffix, label, color in HOST:
        found = [e for e in spans if e["tid"] == host and e["name"].endswith(suffix) and e["ts"] >= start]
        bars([(ms(e["ts"]), e["dur"] / 1e3) for e in found], "host (Python)", color=color, label=label)
    for i, tid in enumerate(workers):
        ops = [e for e in spans if e["tid"] == tid and e["ts"] >= start and not e["name"].startswith(NOT_OPS)]
        matmuls = [(ms(e["ts"]), e["dur"] / 1e3) for e in ops if e["name"].startswith(("dot", "ynn_fusion"))]
        others = [(ms(e["ts"]), e["dur"] / 1e3) for e in ops if not e["name"].startswith(("dot", "ynn_fusion"))]
        lane = f"XLA:CPU worker {i + 1}"
        bars(matmuls, lane, color="tab:orange", label="matmul ops" if i == 0 else None)
        bars(others, lane, color="tab:purple", label="other ops" if i == 0 else None)

    axes.set_yticks(range(len(lanes)), lanes[::-1])
    axes.set_xlim(-20, ms(end) + 20)
    axes.set_xlabel("ms from the first traced step")
    axes.set_title("nnxlm profile of the demo (recipes/demo.py), one CPU process", fontsize=10)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=6, fontsize=8, frameon=False)
    figure.tight_layout()
    figure.savefig(output)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    draw(newest_trace(sys.argv[1]), sys.argv[2])
