"""Interrupts one `nnxlm train` run again and again and restarts it each time (run as a script).

    python tests/interruptions.py WORKDIR [--recipe R]... POINTS...
                                                prints a JSON report on its last line

The run is `nnxlm train` of the tiny recipe for 150 steps, checkpointing every 6, or of the
--recipe arguments given (a recipe and its set: overrides, as nnxlm train takes them).

Each POINT says when the running training process is interrupted and how:
  kill@S      SIGKILL once metrics.jsonl reaches step S or later
  kill@write  SIGKILL while an asynchronous checkpoint is being written (its temporary directory exists)
  kill@saved  SIGKILL as soon as a new checkpoint is complete
  term@S      SIGTERM at step S: the run must save, exit with 143 and say so
  int@S       SIGINT (Ctrl-C) at step S: the same, exit 130
  term2@S     SIGTERM twice in a row: the run must exit at once (143) with nothing damaged
After the points, the run is restarted once more and trained to its end; an uninterrupted run of
the same recipe is trained beside it, in WORKDIR/reference. After every interruption each
checkpoint directory must be intact (nnxlm.resumption.checkpoint_damage).

Training runs in processes forked from this one, which has imported nnxlm but never started JAX's
runtime: a restart costs the run's own start-up, not Python's imports (about 2 s of 6 on 2 cores).
"""

import json
import multiprocessing
import os
import signal
import sys
import time

import nnxlm.recipes.directives  # noqa: F401  (imported here, once, for every forked run)
import nnxlm.sharding.distributed  # noqa: F401
import nnxlm.trainer  # noqa: F401
from nnxlm.cli import main
from nnxlm.metrics import read_metrics
from nnxlm.resumption import checkpoint_damage, checkpoint_steps

RECIPE = [
    "--recipe", "tiny", "--recipe", "set:num_steps=150", "--recipe", "set:checkpoint_every=6",
    "--recipe", "set:eval_every=0", "--recipe", "set:log_every=1000",
]  # fmt: skip


def command(workdir: str) -> list[str]:
    return ["train", *RECIPE, "--workdir", workdir]


def _train(workdir: str) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.stdout = sys.stderr = open(os.path.join(workdir, "log.txt"), "a", buffering=1)  # noqa: SIM115
    os._exit(main(command(workdir)))


def start(workdir: str):
    process = multiprocessing.get_context("fork").Process(target=_train, args=(workdir,))
    process.start()
    return process


def last_step(workdir: str) -> int:
    try:
        return max((r["step"] for r in read_metrics(workdir)), default=0)
    except FileNotFoundError:
        return 0


def wait_for(process, ready, timeout: float = 120.0) -> bool:
    """Polls `ready()` every millisecond; False if the process ended or time ran out first."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.is_alive():
        if ready():
            return True
        time.sleep(0.001)
    return False


def interrupt(workdir: str, point: str) -> dict:
    kind, _, when = point.partition("@")
    checkpoints = os.path.join(workdir, "checkpoints")
    before = set(checkpoint_steps(checkpoints))

    def ready() -> bool:
        if when == "write":
            return os.path.isdir(checkpoints) and any(".orbax-checkpoint-tmp" in d for d in os.listdir(checkpoints))
        if when == "saved":
            return bool(set(checkpoint_steps(checkpoints)) - before)
        return last_step(workdir) >= int(when)

    process = start(workdir)
    reached = wait_for(process, ready)
    at_step = last_step(workdir)
    number = {"kill": signal.SIGKILL, "int": signal.SIGINT}.get(kind, signal.SIGTERM)
    if process.is_alive():
        os.kill(process.pid, number)
    if kind == "term2":  # the second once the first was seen (two at once may arrive as one)
        log = os.path.join(workdir, "log.txt")
        wait_for(process, lambda: "SIGTERM: finishing" in open(log, encoding="utf-8").read(), timeout=30)
        if process.is_alive():
            os.kill(process.pid, signal.SIGTERM)
    process.join(120)
    damaged = {s: checkpoint_damage(checkpoints, s) for s in checkpoint_steps(checkpoints)}
    return {
        "point": point,
        "reached": reached,
        "at_step": at_step,
        "exitcode": process.exitcode,
        "latest_checkpoint": max(checkpoint_steps(checkpoints), default=None),
        "damaged": {s: why for s, why in damaged.items() if why},
        "log_tail": _tail(os.path.join(workdir, "log.txt")),  # what the run printed last, for a failure
    }


def _tail(path: str, chars: int = 1500) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""


def run(workdir: str, points: list[str]) -> dict:
    os.makedirs(workdir, exist_ok=True)
    reference = os.path.join(workdir, "reference")
    os.makedirs(reference, exist_ok=True)
    start(reference).join()
    interrupted = os.path.join(workdir, "interrupted")
    os.makedirs(interrupted, exist_ok=True)
    began = time.time()
    report = {"interruptions": [interrupt(interrupted, point) for point in points]}
    final = start(interrupted)
    final.join()
    report["seconds"] = time.time() - began
    report["final_exitcode"] = final.exitcode
    # the loss, and what a step sampled (GRPO's rewards and completion lengths), when it did
    compared = lambda r: (r["loss"], r.get("reward"), r.get("completion_length"))  # noqa: E731
    expected = {r["step"]: compared(r) for r in read_metrics(reference)}
    got = {r["step"]: compared(r) for r in read_metrics(interrupted)}
    report["steps"] = len(expected)
    report["differing_steps"] = sorted(s for s in expected if got.get(s) != expected[s])
    return report


if __name__ == "__main__":
    workdir, arguments = sys.argv[1], sys.argv[2:]
    if "--recipe" in arguments:
        RECIPE = []
        while arguments and arguments[0] == "--recipe":
            RECIPE += arguments[:2]
            arguments = arguments[2:]
    print(json.dumps(run(workdir, arguments)))
