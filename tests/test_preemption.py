import json
import os
import signal
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# When the interruptions of tests/interruptions.py strike, spread over a 150-step run that saves
# every 6 steps: 20 SIGKILLs (at steps, during asynchronous checkpoint writes, right after a
# checkpoint completes), two SIGTERMs, a Ctrl-C and a double SIGTERM.
POINTS = [
    "kill@3", "kill@write", "kill@saved", "kill@14", "kill@write", "term@22", "kill@25", "kill@saved",
    "kill@write", "int@40", "kill@43", "kill@write", "kill@saved", "kill@56", "term2@60", "kill@64",
    "kill@write", "kill@75", "kill@saved", "term@84", "kill@write", "kill@93", "kill@100", "kill@write",
]  # fmt: skip


def test_a_run_interrupted_at_24_points_ends_bit_identical_to_an_uninterrupted_one(tmp_path):
    assert sum(p.startswith("kill@") for p in POINTS) == 20
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "interruptions.py"), str(tmp_path), *POINTS],
        env=env, capture_output=True, text=True, cwd=REPO, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    expected_exit = {"kill": -signal.SIGKILL, "term": 143, "int": 130, "term2": 143}
    for interruption in report["interruptions"]:
        point = interruption["point"]
        assert interruption["reached"], f"{point}: the run ended before it could be interrupted"
        assert interruption["exitcode"] == expected_exit[point.split("@")[0]], interruption
        assert not interruption["damaged"], interruption  # no checkpoint was ever unreadable
        if point.startswith(("term@", "int@")):  # saved where it stopped, at or after the signal
            assert interruption["latest_checkpoint"] >= interruption["at_step"], interruption
    progress = [i["latest_checkpoint"] or 0 for i in report["interruptions"]]
    assert progress == sorted(progress) and progress[-1] >= 84  # the kills spread over the run
    assert report["final_exitcode"] == 0
    assert report["steps"] == 150 and report["differing_steps"] == []


def test_a_second_signal_exits_at_once():
    script = (
        "import os, signal, time\n"
        "from nnxlm.preemption import StopRequests\n"
        "with StopRequests() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.1)\n"
        "    assert stop.signal == signal.SIGTERM\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "print('not reached')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 143 and "not reached" not in done.stdout
    assert "SIGTERM again: exiting now" in done.stderr


def test_signals_that_arrive_in_the_middle_of_a_write_to_stderr_still_stop_and_exit():
    """The handler runs between two bytecodes of the main thread, which may be inside a write to
    stderr (progress output; the first signal's own message when the second one comes quickly):
    its message must not write to that stream again (RuntimeError: reentrant call, exit code 1)."""
    script = (
        "import io, os, signal, sys, time\n"
        "from nnxlm.preemption import StopRequests\n"
        "class Raw(io.RawIOBase):  # stderr, where a SIGTERM arrives inside the buffered stream's write\n"
        "    signals = 0\n"
        "    def writable(self):\n"
        "        return True\n"
        "    def fileno(self):\n"
        "        return 2\n"
        "    def write(self, data):\n"
        "        if self.signals:\n"
        "            self.signals -= 1\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n"
        "            time.sleep(0.1)  # the handler runs here, while the stream holds its lock\n"
        "        return os.write(2, data)\n"
        "raw = Raw()\n"
        "sys.stderr = io.TextIOWrapper(io.BufferedWriter(raw), line_buffering=True)\n"
        "with StopRequests() as stop:\n"
        "    raw.signals = 1\n"
        "    print('progress', file=sys.stderr)\n"
        "    assert stop.signal == signal.SIGTERM\n"
        "    raw.signals = 1\n"
        "    print('more progress', file=sys.stderr)\n"
        "    time.sleep(5)\n"
        "print('not reached')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 143 and "not reached" not in done.stdout, done.stderr[-3000:]
    assert "SIGTERM: finishing this step" in done.stderr and "SIGTERM again: exiting now" in done.stderr


def test_outside_fit_the_signal_handlers_are_the_ones_before():
    from nnxlm.preemption import StopRequests

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopRequests():
        assert signal.getsignal(signal.SIGTERM) != before[0]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


RECIPE_FILE = """
import fiddle as fdl

import nnxlm.recipes
from nnxlm import rewards
from nnxlm.data import JsonlFiles
from nnxlm.objectives import DPO, GRPO
from nnxlm.recipes import models


def close_to_twelve(prompts, completions, **fields):  # a reward function of the recipe's own
    return [1.0 - min(abs(len(c) - 12), 12) / 12 for c in completions]


def run():
    cfg = nnxlm.recipes.tiny()
    cfg.model = models.llama_tiny(vocab_size=1000)
    cfg.tokenizer_path = {tokenizer!r}
    cfg.train_data = fdl.Config(JsonlFiles, globs=[{data!r}], field=None)
    cfg.eval_data = None
    cfg.objective = {objective}
    cfg.seq_len, cfg.batch_size, cfg.num_steps = 32, 8, 12
    cfg.checkpoint_every, cfg.eval_every, cfg.log_every = 2, 0, 1000
    cfg.optimizer.learning_rate = 1e-2
    return cfg
"""
OBJECTIVES = {  # DPO with its reference log-probabilities cached in the run directory
    "dpo": "fdl.Config(DPO, cache_reference=True)",
    "grpo": "fdl.Config(GRPO, rewards=[close_to_twelve, rewards.exact_match], group_size=4, max_new_tokens=8)",
}


@pytest.mark.parametrize("objective", ["dpo", "grpo"])
def test_killed_dpo_and_grpo_runs_resume_bit_identical(tmp_path, small_tokenizer, objective):
    words = ["def", "class", "return", "import", "yield", "lambda", "while", "assert"]
    if objective == "dpo":
        records = [{"prompt": f"say {w}:", "chosen": w, "rejected": w[::-1]} for w in words]
    else:
        records = [{"prompt": f"say {w}:", "answer": w} for w in words]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    small_tokenizer.save(str(tmp_path / "tokenizer.model"))
    recipe = tmp_path / "recipe.py"
    text = RECIPE_FILE.format(
        tokenizer=str(tmp_path / "tokenizer.model"), data=str(data), objective=OBJECTIVES[objective]
    )
    recipe.write_text(text, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "interruptions.py"), str(tmp_path / "runs"),
         "--recipe", f"{recipe}:run", "kill@3", "kill@saved", "kill@8"],
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for interruption in report["interruptions"]:
        assert interruption["reached"] and interruption["exitcode"] == -signal.SIGKILL, interruption
    assert report["final_exitcode"] == 0
    assert report["steps"] == 12 and report["differing_steps"] == []
    if objective == "dpo":  # the cache was built once and reused by every restart
        assert len(os.listdir(tmp_path / "runs" / "interrupted" / "reference_logps")) == 1
